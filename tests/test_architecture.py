"""The layout's rules, checked on the source: no import cycles, arrows one way, nothing heavy at import."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "index", "service")
# The rooms of `training` the service may use: it serves a model, it does not fit or evaluate one.
SERVICE_MAY_USE = ("training.data", "training.model", "training.io", "training.errors")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every project module `module` imports, at module level or inside functions (a lazy import is
    still an arrow), except under `if TYPE_CHECKING:` (annotations only, never run)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


@cache
def import_graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        imported = _imports(ast.parse(path.read_text(encoding="utf-8")), module, path.name == "__init__.py")
        # `from a.b import c` names module a.b.c when that file exists, else an attribute of a.b.
        graph[module] = {name for name in imported if name in files and name != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_lazy_imports_count_as_arrows() -> None:
    tree = ast.parse("def f():\n    from training.model import embedder\nif TYPE_CHECKING:\n    import index.build\n")
    assert _imports(tree, "training.x", False) == {"training.model", "training.model.embedder"}


def test_no_import_cycles() -> None:
    graph = import_graph()
    # The graph is the real one: the checkpoint module sits above the embedder it builds.
    assert "training.model.embedder" in graph["training.model.checkpoint"]
    assert _cycles(graph) == []


def _arrows_from(prefix: str) -> dict[str, set[str]]:
    return {module: targets for module, targets in import_graph().items()
            if module == prefix or module.startswith(prefix + ".")}


def test_training_imports_neither_index_nor_service() -> None:
    bad = {m: sorted(t for t in ts if t.split(".")[0] in {"index", "service"})
           for m, ts in _arrows_from("training").items()}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_index_never_imports_service() -> None:
    bad = {m: sorted(t for t in ts if t.split(".")[0] == "service") for m, ts in _arrows_from("index").items()}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_service_uses_only_the_model_and_data_rooms_of_training() -> None:
    def allowed(target: str) -> bool:
        return target == "training" or any(target == room or target.startswith(room + ".") for room in SERVICE_MAY_USE)

    bad = {m: sorted(t for t in ts if t.split(".")[0] == "training" and not allowed(t))
           for m, ts in _arrows_from("service").items()}
    assert {m: ts for m, ts in bad.items() if ts} == {}


@pytest.mark.parametrize("modules", [
    # What `python -m training --help`, `python -m index --help` and the service's start-up read first.
    ["training.__main__", "index.__main__", "training.cli", "training.errors", "training.io"],
    ["training.data.stl", "training.data.split", "training.data.popularity", "service.settings"],
    # What a torch-free server runs an exported model with (issue 14).
    ["training.model.arrays", "training.model.runtimes", "training.model.runtimes.openvino_runtime",
     "training.model.runtimes.onnx_runtime"],
])
def test_light_modules_do_not_import_torch_or_faiss(modules: list[str]) -> None:
    code = (f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(n for n in ('torch', 'faiss', 'timm', 'torchvision') if n in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_the_service_package_imports_neither_torch_nor_timm() -> None:
    # Every service module (faiss is fine: it serves the indexes); torch comes only with the torch runtime.
    modules = sorted(f"service.{path.stem}" for path in (ROOT / "service").glob("*.py") if path.stem != "__init__")
    code = (f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(n for n in ('torch', 'timm', 'torchvision') if n in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
