"""pipeline/data is a one-way spine: each module imports only modules below it, never one above.

The order, bottom first (docs/architecture.md draws it):

    errors -> shard_format -> storage -> manifest -> sources -> shards -> prepare
           -> transforms -> plan -> stream -> eval_stream

Every module of the folder must have a place in it (a new module is placed here on purpose), and
no data module imports inside a function what it could not import at the top: that is how the
old circle between manifest, shards, sources, storage and stream was held together.
"""

from __future__ import annotations

import ast
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "pipeline" / "data"
ORDER = ["errors", "shard_format", "storage", "manifest", "sources", "shards", "prepare",
         "transforms", "plan", "stream", "eval_stream"]
# what data/ may never import: the layers above it, and the tools built on it
ABOVE = ("stages", "tools", "pipeline.cli", "pipeline.train", "pipeline.export", "pipeline.eval",
         "pipeline.track", "pipeline.model")


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), filename=str(p)) for p in sorted(DATA.glob("*.py"))
            if p.stem != "__init__"}


def _imports(tree: ast.Module) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) of every import in `tree`."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [f"{child.module}.{a.name}" for a in child.names]
                # `from pipeline.data import storage` names a module; `from pipeline.data.x import y` a symbol
                found.extend((n, in_function, child.lineno)
                             for n in (names if child.module == "pipeline.data" else [child.module]))
            visit(child, inner)

    visit(tree, False)
    return found


def _data_edges() -> dict[str, list[tuple[str, bool, int]]]:
    edges = {}
    for name, tree in _modules().items():
        edges[name] = [(m.split(".")[2], inside, line) for m, inside, line in _imports(tree)
                       if m.startswith("pipeline.data.")]
    return edges


def test_every_data_module_has_a_place_in_the_order():
    missing = sorted(set(_modules()) - set(ORDER))
    gone = sorted(set(ORDER) - set(_modules()))
    assert not missing, f"place {missing} in tests/test_layering.py ORDER (and docs/architecture.md)"
    assert not gone, f"{gone} no longer exist in pipeline/data; remove them from ORDER"


def test_data_modules_import_only_downward():
    upward = [f"pipeline/data/{name}.py:{line} imports {target} (above it)"
              for name, targets in _data_edges().items() for target, _, line in targets
              if target in ORDER and ORDER.index(target) >= ORDER.index(name)]
    assert not upward, "\n".join(upward)


def test_data_has_no_import_cycle():
    edges = {name: {t for t, _, _ in targets} for name, targets in _data_edges().items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if state.get(nxt) is None and (found := cycle_from(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if state.get(start) is None:
            found = cycle_from(start, [])
            assert found is None, " -> ".join(found)


def test_no_data_module_imports_another_inside_a_function():
    hidden = [f"pipeline/data/{name}.py:{line} imports pipeline.data.{target} inside a function"
              for name, targets in _data_edges().items() for target, inside, line in targets if inside]
    assert not hidden, "\n".join(hidden)


def test_data_imports_nothing_above_it():
    up = [f"pipeline/data/{name}.py:{line} imports {m}"
          for name, tree in _modules().items() for m, _, line in _imports(tree)
          if any(m == a or m.startswith(a + ".") for a in ABOVE)]
    assert not up, "\n".join(up)


def test_the_checks_see_a_cycle_and_an_upward_edge():
    """The walker itself: a planted upward import inside a function is found by all three checks."""
    planted = DATA / "errors.py"
    tree = ast.parse(planted.read_text() + "\n\ndef _f():\n    from pipeline.data.stream import train_stream\n")
    modules = {**_modules(), "errors": tree}
    globals_ = globals()
    original = globals_["_modules"]
    globals_["_modules"] = lambda: modules
    try:
        edges = _data_edges()
        assert ("stream", True, edges["errors"][-1][2]) in edges["errors"]
        for check in (test_data_modules_import_only_downward, test_data_has_no_import_cycle,
                      test_no_data_module_imports_another_inside_a_function):
            try:
                check()
            except AssertionError:
                continue
            raise AssertionError(f"{check.__name__} missed the planted import")
    finally:
        globals_["_modules"] = original
