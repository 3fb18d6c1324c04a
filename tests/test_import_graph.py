"""The import graph of pipeline/, stages/ and tools/: layers point one way, nothing imports in a circle.

Every import counts, at module level or inside a function: an import inside a function is still a
dependency, only a later one. The layers, bottom first (docs/architecture.md draws the same map):

  0 base        pipeline.{atomic, tables, memory, folder_lock, run_layout, schema, progress} and the package itself:
                no knowledge of images, models or processes
  1 model       pipeline.model: the ViT, its weights and its own schema (torch only)
    launch      pipeline.launch: how processes are started and stopped (torchrun, SLURM, k8s,
                DeepSpeed's launcher); it names the program it starts but knows nothing of training
  2 config      pipeline.config: the recipe's schema, YAML files, overrides, validation
  3 data        pipeline.data: sources, shards, manifests, the training stream
    track       pipeline.track: the tracker interface and MLflow
  4 train       pipeline.train: what one training rank runs
    eval        pipeline.eval, export: pipeline.export
  5 stages      stages/: one module per stage, `vitpipe run`, the stage record; composes launch + train
  6 entry       tools/ (operator CLIs and benchmarks) and the `vitpipe` command itself
                (pipeline.cli, pipeline.__main__: they stay where the console script and
                `python -m pipeline` name them, and nothing below this layer imports them)

A module may import its own layer and any layer below it, never one above; modules of one layer
may import each other as long as no cycle forms.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "tools")

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("pipeline", "pipeline.atomic", "pipeline.tables", "pipeline.memory", "pipeline.folder_lock",
              "pipeline.run_layout", "pipeline.schema", "pipeline.progress")),
    ("model, launch", ("pipeline.model", "pipeline.launch")),
    ("config", ("pipeline.config",)),
    ("data, track", ("pipeline.data", "pipeline.track")),
    ("train, eval, export", ("pipeline.train", "pipeline.eval", "pipeline.export")),
    ("stages", ("stages",)),
    ("entry points and tools", ("tools", "pipeline.cli", "pipeline.__main__")),
]


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported name, line) for every import in the file; `from a import b` names a.b when a.b is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in MODULES else base, node.lineno))
    return out


def _internal(target: str) -> str | None:
    """The module of ours `target` names (a.b.c -> the longest prefix that is one of ours)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for target, _ in _imports(name, path):
            mod = _internal(target)
            if mod and mod != name:
                graph[name].add(mod)
    return graph


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest layer prefix that `module` falls under."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise AssertionError(f"{module}: in no layer; add it to LAYERS in {__file__} and to docs/architecture.md")
    return best


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    """The walk finds the edges it must (a walk that found nothing would pass every test below)."""
    graph = _graph()
    assert "pipeline.launch.local" in graph["stages.training"]
    assert "pipeline.train.job" in graph["stages.training"]
    assert "stages.recipe" in graph["pipeline.cli"]  # a function-level import counts
    assert len(MODULES) > 60


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for name, path in MODULES.items():
        for target, line in _imports(name, path):
            mod = _internal(target)
            if mod and layer_of(mod) > layer_of(name):
                upward.append(f"{path.relative_to(ROOT)}:{line}: {name} ({LAYERS[layer_of(name)][0]}) imports "
                              f"{mod} ({LAYERS[layer_of(mod)][0]})")
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_the_layer_check_catches_an_upward_import():
    """The rule itself, on a made-up edge: the model importing the stage layer is refused."""
    assert layer_of("stages.recipe") > layer_of("pipeline.model.vit")
    assert layer_of("pipeline.cli") > layer_of("stages.recipe") > layer_of("pipeline.train.loop")
    assert layer_of("pipeline.train.worker") > layer_of("pipeline.launch.local")


def test_no_import_cycle_anywhere():
    cycles = _cycles(_graph())
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# --------------------------------------------------------------------------- documented boundaries


def _third_party(name: str, path: Path) -> set[str]:
    tops = {t.split(".")[0] for t, _ in _imports(name, path)}
    return {t for t in tops if t not in sys.stdlib_module_names and t not in PACKAGES and t != "__future__"}


def test_only_track_imports_mlflow():
    users = sorted(m for m, p in MODULES.items() if "mlflow" in _third_party(m, p))
    assert users == ["pipeline.track"]


def test_model_imports_torch_only():
    """Every module of pipeline/model: torch (and the formats it reads and writes), nothing of
    distribution or tracking, and of this package only the model itself and the base layer."""
    allowed = {"torch", "numpy", "safetensors"}
    for name, path in MODULES.items():
        if not name.startswith("pipeline.model"):
            continue
        assert _third_party(name, path) <= allowed, (name, _third_party(name, path) - allowed)
        src = path.read_text()
        for banned in ("deepspeed", "torch.distributed", "mlflow"):
            assert f"import {banned}" not in src and f"from {banned}" not in src, (name, banned)
        for target, line in _imports(name, path):
            mod = _internal(target)
            assert mod is None or layer_of(mod) <= layer_of("pipeline.model"), f"{path}:{line}: imports {mod}"
            assert mod != "pipeline.config", f"{path}:{line}: model code imports the config loader"


SCHEDULER_COMMANDS = ("sbatch", "srun", "squeue", "sacct", "scontrol", "kubectl", "pdsh")


def test_only_launch_knows_schedulers():
    """No module outside pipeline/launch runs or names a scheduler's command."""
    found = []
    for name, path in MODULES.items():
        if name.startswith("pipeline.launch"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                first = node.value.split(" ", 1)[0]
                if first in SCHEDULER_COMMANDS:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "scheduler commands outside pipeline/launch:\n" + "\n".join(found)


def test_nothing_below_the_entry_layer_imports_the_cli():
    importers = sorted(m for m, deps in _graph().items() if "pipeline.cli" in deps)
    assert importers == ["pipeline.__main__"]


def test_the_cli_answers_light_commands_without_importing_the_heavy_libraries():
    """`vitpipe config`, `status`, a config error or `submit --dry-run` answer in a fraction of a
    second: the tools' parsers (torch, onnx, mlflow behind them) are registered only when asked for."""
    import subprocess

    code = (
        "import sys\n"
        "from pipeline.cli import main\n"
        f"tiny = {str(ROOT / 'configs' / 'pipeline' / 'tiny.yaml')!r}\n"
        "codes = [main(['config', tiny]), main(['config', tiny, 'pretrain.lr=.nan']),\n"
        "         main(['submit', tiny, '--target', 'slurm', '--dry-run'])]\n"
        "heavy = sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'mlflow', 'deepspeed') if m in sys.modules)\n"
        "print('RESULT', codes, heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "RESULT [0, 2, 0] []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    # and a tool command still finds its own parser
    from pipeline.cli import build_parser

    args = build_parser(["bench", "export", "--rounds", "2"]).parse_args(["bench", "export", "--rounds", "2"])
    assert args.bench_command == "export" and args.rounds == 2
