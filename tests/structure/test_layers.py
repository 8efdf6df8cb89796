"""Structural rules of the code base, pinned as tests (the shape of httpx's
``tests/test_exported_members.py``): the core and the engines know no transport, and no module
imports itself back through others."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "server"
CLIENT = ROOT / "client"
TRANSPORT_FREE = (
    "embedd_server.core",
    "embedd_server.engines",
    "embedd_server.model",
    "embedd_server.compute",
)
TRANSPORT = ("grpc", "embedd.v1", "embedd_server.rpc", "embedd_server.run", "embedd_server.cli")
# The ONNX engine's graphs are protobuf messages of the ONNX format (the onnx package), which
# is not a transport; every other module of the core and the engines loads no protobuf at all.
# The ONNX modules are the engine, the BERT graph, the per-architecture table and each
# family's graph (engines/onnx_<family>.py).
ONNX_PREFIX = "embedd_server.engines.onnx"
ONNX_MODULES = ("embedd_server.engines.onnx", "embedd_server.engines.onnx_graph")


def _modules(base: Path, package: str) -> Iterator[tuple[str, Path]]:
    """(dotted name, file) of every module of ``package`` under ``base``, generated stubs aside."""
    for path in sorted((base / package.replace(".", "/")).rglob("*.py")):
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        parts = path.relative_to(base).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _loaded_after_importing(names: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """The modules starting with one of ``prefixes`` that a fresh interpreter holds after
    importing ``names``."""
    probe = (
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        f"print('\\n'.join(m for m in sys.modules if m.startswith({prefixes!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_core_and_engines_import_no_transport() -> None:
    names = [name for package in TRANSPORT_FREE for name, _ in _modules(SERVER, package)]
    assert len(names) > 10  # the walk found the modules
    assert set(ONNX_MODULES) <= set(names)
    assert _loaded_after_importing(names, TRANSPORT) == []
    plain = [name for name in names if not name.startswith(ONNX_PREFIX)]
    assert _loaded_after_importing(plain, ("google.protobuf", *TRANSPORT)) == []


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The known modules that module ``name`` imports anywhere in its file (lazy imports too:
    a cycle hidden in a function is still a cycle)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for statement in node.body
        for inner in ast.walk(statement)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue  # `if TYPE_CHECKING:` never runs: names for the type checker only
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            # `from pkg import module` names a module; `from module import name` its module.
            module = target
            while module and module not in known:
                module = module.rpartition(".")[0]
            if module and module != name:
                found.add(module)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_no_import_cycles() -> None:
    files = dict(_modules(SERVER, "embedd_server")) | dict(_modules(CLIENT, "embedd"))
    # A module importing its own package (its __init__ runs first anyway) is no cycle.
    known = set(files)
    graph = {
        name: {t for t in _imports(name, path, known) if not name.startswith(t + ".")}
        for name, path in files.items()
    }
    assert len(graph) > 40
    assert _cycles(graph) == []


def _package_imports(package: str) -> set[str]:
    """Every server module that some module of ``package`` imports (lazy imports too)."""
    files = dict(_modules(SERVER, "embedd_server"))
    known = set(files)
    return {
        target
        for name, path in files.items()
        if name == package or name.startswith(package + ".")
        for target in _imports(name, path, known)
    }


def test_core_and_engines_do_not_import_each_other() -> None:
    """The core schedules work and the engines compute it; what both need (the engine
    protocol, FloatMatrix, the Pack, the model's description, the errors) lives in
    ``compute``, ``model`` and ``errors``, so neither imports the other's internals."""
    core = _package_imports("embedd_server.core")
    engines = _package_imports("embedd_server.engines")
    assert "embedd_server.compute.engine" in core  # the walk sees the core's imports
    assert [m for m in core if m.startswith("embedd_server.engines")] == []
    assert [m for m in engines if m.startswith("embedd_server.core")] == []
    for shared in ("embedd_server.model", "embedd_server.compute"):
        found = _package_imports(shared)
        assert [
            m for m in found if m.startswith(("embedd_server.core", "embedd_server.engines"))
        ] == []


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
