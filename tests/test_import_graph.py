"""The installed package's import graph: no cycles, and every module imports only its layer and the
layers below it (the data path of README "Layout").

The graph is built statically: every .py file of every package setup.py installs, found where the
installed package finds it (megatron_fp4.kernels -> kernels/, megatron_fp4.patches -> patches/,
megatron_fp4.recipes -> recipes/, as setup.py maps them), and every import statement in it — module
level and inside functions alike, absolute and relative. `from P import name` is an edge to P.name
when that is a module, else to P. Importing a submodule also runs its parents' __init__, but those
are not edges: the parents' own imports are (megatron_fp4/__init__ imports the patches only inside
install()).
"""
import ast
import collections
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP = "megatron_fp4"

# Lowest first. A module may import modules of its own layer and of the layers before it. Patterns
# are module names; "name.*" also covers the package's submodules.
LAYERS = [
    ("numerics", ["megatron_fp4.format", "megatron_fp4.rng", "megatron_fp4.hadamard", "megatron_fp4.tensor"]),
    ("torch twins and reference GEMM", ["megatron_fp4.quantizers", "megatron_fp4.gemm"]),
    ("kernels", ["megatron_fp4.kernels", "megatron_fp4.kernels.*"]),   # but the dispatch, next layer
    ("backend", ["megatron_fp4.backend", "megatron_fp4.kernels.dispatch", "megatron_fp4.stats"]),
    ("recipes", ["megatron_fp4.recipe", "megatron_fp4.registry", "megatron_fp4.recipes", "megatron_fp4.errors"]),
    ("data", ["megatron_fp4.data", "megatron_fp4.data.*"]),   # corpus, tokenizer (their errors: errors.py)
    ("stabilizer numerics", ["megatron_fp4.outcontrol", "megatron_fp4.oscireset"]),
    ("autograd linear", ["megatron_fp4.linear"]),
    ("Megatron glue", ["megatron_fp4.megatron", "megatron_fp4.megatron.*", "megatron_fp4.patches",
                       "megatron_fp4.patches.*"]),   # but the CPU driver, which builds models from the spec
    ("spec", ["megatron_fp4.spec"]),
    ("launcher", ["megatron_fp4", "megatron_fp4.defaults", "megatron_fp4.summary", "megatron_fp4.report", "megatron_fp4.pretrain_gpt", "megatron_fp4.pretrain_support",
                  "megatron_fp4.megatron.driver"]),
]
TESTING = "megatron_fp4.testing"        # outside the layers: it may import anything but the launcher
LAUNCHER = ("megatron_fp4.pretrain_gpt", "megatron_fp4.pretrain_support")


def _setup_packages():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    return ast.literal_eval(kw["packages"]), ast.literal_eval(kw["package_dir"])


def installed_modules() -> dict:
    """{module name: file} over the installed packages, each package's directory checked against
    setup.py's mapping."""
    packages, package_dir = _setup_packages()
    modules = {}
    for package in packages:
        prefix = max((p for p in package_dir if package == p or package.startswith(p + ".")), key=len)
        mapped = os.path.join(ROOT, package_dir[prefix], *package[len(prefix):].split(".")[1:])
        spec = importlib.util.find_spec(package)
        assert spec is not None, f"{package} (setup.py) is not importable: reinstall with `pip install -e .`"
        found = os.path.realpath(spec.submodule_search_locations[0])
        assert found == os.path.realpath(mapped), f"{package} installs from {found}, setup.py maps {mapped}"
        for name in sorted(os.listdir(found)):
            if name.endswith(".py"):
                module = package if name == "__init__.py" else f"{package}.{name[:-3]}"
                modules[module] = os.path.join(found, name)
    return modules


def _resolve(module: str, is_package: bool, level: int, target) -> str:
    if level == 0:
        return target or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_edges(modules: dict) -> dict:
    """{module: {imported module: first line}} for imports of the package's own modules."""
    edges = {}
    for module, path in modules.items():
        is_package = path.endswith("__init__.py")
        out = edges.setdefault(module, {})
        for node in ast.walk(ast.parse(open(path).read(), path)):
            names = []
            if isinstance(node, ast.Import):
                for alias in node.names:   # the longest prefix that is a module
                    parts = alias.name.split(".")
                    names += [next((".".join(parts[:i]) for i in range(len(parts), 0, -1)
                                    if ".".join(parts[:i]) in modules), "")]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module)
                for alias in node.names:
                    names.append(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            for name in names:
                if name in modules and name != module:
                    out.setdefault(name, node.lineno)
    return edges


def find_cycles(edges: dict) -> list:
    """One cycle (a list of modules, first == last) per strongly connected component (Tarjan)."""
    index, low, stack, on_stack, components, counter = {}, {}, [], set(), [], [0]

    def strongconnect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return [_shortest_cycle(min(c), c, edges) for c in components]


def _shortest_cycle(start, component, edges) -> list:
    parents, queue = {start: None}, collections.deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(edges[v]):
            if w == start:
                path = [v]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return path[::-1] + [start]
            if w in component and w not in parents:
                parents[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start}")


def _describe(cycle, edges, modules) -> str:
    steps = [f"  {a} -> {b}  ({os.path.relpath(modules[a], ROOT)}:{edges[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return "\n".join(steps)


def layer_of(module: str):
    """(rank, layer name) of a module: an exact pattern beats a wildcard, a longer wildcard a shorter."""
    best = None
    for rank, (layer, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if module == pattern:
                score = (2, len(pattern))
            elif pattern.endswith(".*") and module.startswith(pattern[:-1]):
                score = (1, len(pattern))
            else:
                continue
            if best is None or score > best[0]:
                best = (score, rank, layer)
    return None if best is None else best[1:]


def test_installed_package_has_no_import_cycles():
    modules = installed_modules()
    assert {"megatron_fp4.kernels.dispatch", "megatron_fp4.patches.megatron_args", "megatron_fp4.recipe"} <= set(modules)
    edges = import_edges(modules)
    cycles = find_cycles(edges)
    assert not cycles, "import cycles in the installed package (a shortest cycle per strongly connected " \
        "set of modules):\n" + "\n\n".join(_describe(c, edges, modules) for c in cycles)


def test_every_module_imports_only_its_layer_and_the_layers_below():
    modules = installed_modules()
    edges = import_edges(modules)
    unplaced = sorted(m for m in modules if not m.startswith(TESTING) and layer_of(m) is None)
    assert not unplaced, f"modules in no layer of tests/test_import_graph.py LAYERS: {unplaced}; add each to its layer"
    wrong = []
    for src, targets in sorted(edges.items()):
        for dst, line in sorted(targets.items()):
            where = f"{os.path.relpath(modules[src], ROOT)}:{line}"
            if src.startswith(TESTING):
                if dst in LAUNCHER:
                    wrong.append(f"{where}: {src} (testing) imports the launcher {dst}")
                continue
            if dst.startswith(TESTING):
                continue   # the CPU shim; cycles through it are caught by the cycle test
            (rs, ls), (rd, ld) = layer_of(src), layer_of(dst)
            if rd > rs:
                wrong.append(f"{where}: {src} ({ls}) imports {dst} ({ld}), a layer above it")
    assert not wrong, "imports against the layering (lowest first: " + " < ".join(l for l, _ in LAYERS) + "):\n" + \
        "\n".join(wrong)


def test_the_graph_builder_sees_relative_function_level_and_mapped_imports():
    """The builder itself, on imports whose targets are known: a relative import inside a function
    (pretrain_gpt's `from .data import corpus`), a mapped top-level directory imported by absolute
    name (kernels/gemm.py: `from megatron_fp4.tensor import ...`), `from . import x` of a submodule
    (megatron/diagnostics.py: `from . import state`), and the cycle finder on a made-up graph."""
    modules = installed_modules()
    edges = import_edges(modules)
    assert modules["megatron_fp4.kernels.dispatch"] == os.path.join(ROOT, "kernels", "dispatch.py")
    assert "megatron_fp4.data.corpus" in edges["megatron_fp4.pretrain_gpt"]
    assert "megatron_fp4.tensor" in edges["megatron_fp4.kernels.gemm"]
    assert "megatron_fp4.megatron.state" in edges["megatron_fp4.megatron.diagnostics"]
    assert "megatron_fp4.kernels.rtn" in edges["megatron_fp4.kernels.dispatch"]   # function-level `from .rtn`
    made_up = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}, "e": {"e2": 1}, "e2": {"e": 1}}
    assert sorted(map(tuple, find_cycles(made_up))) == [("a", "b", "c", "a"), ("e", "e2", "e")]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []
