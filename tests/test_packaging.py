"""setup.py ships every package of the source tree (a wheel, unlike the editable install the tests
use, contains only the packages listed)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_keywords():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: k.value for k in call.keywords}


def test_every_source_package_is_listed():
    kw = _setup_keywords()
    packages = set(ast.literal_eval(kw["packages"]))
    package_dir = ast.literal_eval(kw["package_dir"])
    on_disk = set()
    for top, name in (("megatron_fp4", "megatron_fp4"), ("kernels", "megatron_fp4.kernels"),
                      ("patches", "megatron_fp4.patches"), ("recipes", "megatron_fp4.recipes")):
        assert package_dir[name] == top
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, os.path.join(ROOT, top))
                on_disk.add(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    assert on_disk - packages == set(), f"packages missing from setup.py: {sorted(on_disk - packages)}"
    assert packages - on_disk == set()
