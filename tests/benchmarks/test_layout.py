"""The user-facing layout of benchmarks/ and tools/: packages run from the repo root as
`python -m benchmarks.NAME` / `python -m tools.NAME`, never installed, with no sys.path edits anywhere
in them or in the tests; every harness answers --help; the commands and paths the README and the
device scripts name exist."""
import ast
import json
import os
import re
import subprocess
import sys

import benchmarks
import tools

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PATH_EDIT = re.compile(r"\bsys\.path\.(insert|append|extend)\b|\bsys\.path\s*[+]?=")
COMMAND = re.compile(r"python3? -m ((benchmarks|tools)\.[a-z_][a-z0-9_]*)\b")   # not placeholders (NAME)


def _sources(*tops, ext=(".py",)):
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            yield from (os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(ext))


def _entry_points(package):
    """Modules of the package with a `__main__` block: the commands it offers."""
    folder = os.path.dirname(package.__file__)
    return {f"{package.__name__}.{f[:-3]}" for f in os.listdir(folder)
            if f.endswith(".py") and 'if __name__ == "__main__":' in open(os.path.join(folder, f)).read()}


def test_no_sys_path_edits_in_benchmarks_tools_or_tests():
    found = [f"{os.path.relpath(p, ROOT)}:{i}" for p in _sources("benchmarks", "tools", "tests")
             for i, line in enumerate(open(p), 1) if PATH_EDIT.search(line)]
    assert found == [], f"sys.path edited (import benchmarks.X / tools.X, see pytest.ini's pythonpath): {found}"


def test_benchmarks_and_tools_are_not_installed():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    packages = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "packages"))
    assert [p for p in packages if p.split(".")[0] in ("benchmarks", "tools")] == []


def test_package_docstrings_list_every_command():
    for package in (benchmarks, tools):
        listed = {m for m, _ in COMMAND.findall(package.__doc__ or "")}
        assert listed == _entry_points(package) and listed, package.__name__


_HELP = """
import contextlib, io, json, runpy, sys
codes = {}
for name in sys.argv[1:]:
    sys.argv = [name, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(name, run_name="__main__", alter_sys=True)
        codes[name] = "no exit"
    except SystemExit as e:
        codes[name] = e.code if "usage:" in out.getvalue() else f"exit {e.code}, no usage"
print("CODES=" + json.dumps(codes))
"""


def test_every_command_answers_help_from_the_repo_root():
    """`python -m NAME --help` for every harness and tool, run as `-m` runs them (runpy) in one process
    from the repo root, so the imports (torch, triton, megatron-core) are paid once."""
    names = sorted(_entry_points(benchmarks) | _entry_points(tools))
    proc = subprocess.run([sys.executable, "-c", _HELP, *names], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.splitlines()[-1][len("CODES="):])
    assert codes == {n: 0 for n in names}, proc.stderr[-3000:]


def test_one_harness_runs_as_python_m():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.grad_quality", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--train-steps" in proc.stdout, proc.stderr[-2000:]


def test_commands_and_paths_named_by_readme_and_device_scripts_exist():
    texts = {p: open(p).read() for p in [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "examples", "README.md"),
                                         *_sources("tools", ext=(".sh",))]}
    missing = []
    for p, text in texts.items():
        for module, _ in COMMAND.findall(text):
            if not os.path.exists(os.path.join(ROOT, *module.split(".")) + ".py"):
                missing.append(f"{os.path.relpath(p, ROOT)}: python -m {module}")
        for path in re.findall(r"(?<![\w/])((?:benchmarks|tools)/[\w/.]+\.(?:py|sh))\b", text):
            if not os.path.exists(os.path.join(ROOT, path)):
                missing.append(f"{os.path.relpath(p, ROOT)}: {path}")
    assert missing == []
