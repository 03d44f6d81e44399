"""The package's structure, as the architecture promises it: no import cycle among its modules, the
CPU/CUDA decision made only in the backend registry, no private name imported across modules, and
modules of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "dsconv_tvm"
MAX_LINES = 480          # "about 400": the two largest (remote/bench.py, deploy/runtime.py) are one concept each


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, Path]):
    """module -> [(imported module, names, line, function-local)] (every import, local ones too)."""
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(name, path.name == "__init__.py", node)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    dest = sub if sub in modules else target
                    edges.append((dest, alias.name, node.lineno, id(node) in local))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    edges.append((alias.name, alias.name, node.lineno, id(node) in local))
        graph[name] = [e for e in edges if e[0] in modules]
    return graph


def _parents(module: str, modules) -> list[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in modules]


def test_no_import_cycle():
    modules = _modules()
    graph = {m: sorted({d for d, *_ in edges} | set(_parents(m, modules)) - {m})
             for m, edges in _imports(modules).items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in graph.get(m, []):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "backends" and parts[2] in ("cpu", "cuda"):
        return f"backends/{parts[2]}"
    return parts[1] if len(parts) > 1 else parts[0]


def test_data_flows_one_way_between_rooms():
    """No two rooms (scheme/, frontend/, rewrite/, backends/, driver/ ...) import each other, even
    through others: the package is layered, scheme at the bottom, cli at the top."""
    edges: dict[str, set] = {}
    for m, imported in _imports(_modules()).items():
        for d, *_ in imported:
            if _room(m) != _room(d) and _room(d) != "dsconv_tvm":
                edges.setdefault(_room(m), set()).add(_room(d))

    def reach(a, seen):
        for b in edges.get(a, ()):
            if b not in seen:
                seen.add(b)
                reach(b, seen)
        return seen

    both_ways = sorted(f"{a} <-> {b}" for a in edges for b in reach(a, set()) if a in reach(b, set()) and a < b)
    assert not both_ways, both_ways


def test_no_private_name_imported_across_modules():
    bad = [f"{m}:{line} imports {name} from {d}" for m, edges in _imports(_modules()).items()
           for d, name, line, _ in edges if name.startswith("_") and not name.startswith("__") and d != m]
    assert not bad, bad


def test_the_cpu_cuda_decision_is_made_in_the_backend_registry_only():
    """Only backends/ looks at a target's kind or its CUDA options; everything else asks the spec's
    backend (target.py maps a kind to a backend through backends/base.py's REGISTRY)."""
    bad = []
    for name, path in _modules().items():
        if name.startswith("dsconv_tvm.backends"):
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if "kind.name" in code or ".cuda is" in code or "spec.cuda" in code or '== "cuda"' in code:
                bad.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert not bad, bad


def test_package_modules_are_imported_at_the_top():
    """Function-local imports are for heavy third-party imports (tvm, onnx, onnxruntime ...), never to
    break cycles.  The only package modules imported lazily are the CLI verbs' drivers (so that
    ``dsconv-tvm --help`` and the services do not import TVM), the backends of the registry, and the
    CPU backend's TVM-heavy kernel modules (so that reading the target files does not import TVM)."""
    lazy_ok = ("dsconv_tvm.cli.", "dsconv_tvm.backends.base", "dsconv_tvm.backends.cpu.backend")
    local = sorted({(m, d) for m, edges in _imports(_modules()).items() for d, _, _, is_local in edges
                    if is_local and not m.startswith(lazy_ok)})
    assert not local, local


def test_module_sizes():
    big = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, big
