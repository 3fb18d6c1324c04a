"""The `vitpipe` command: parse arguments, load and validate the recipe, call a stage.

Every subcommand takes a recipe YAML and ``key=value`` overrides (``pretrain.steps=50``); the
config is validated before any work starts. Stage subcommands default their inputs and outputs to
the layout `vitpipe run` uses (``runs/<recipe name>/<stage>/``), so a run can be continued stage by stage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

EPILOG = """\
stages and their files (see docs in ARCHITECTURE.md):
  prepare    images            -> prepare/shards/*.tar + prepare/manifest.json
  pretrain   manifest          -> pretrain/model.safetensors + model.json (+ checkpoints/)
  finetune   weights, manifest -> finetune/model.safetensors + model.json at the new resolution
  export     weights, manifest -> export/model.onnx (+ model.<variant>.onnx) + model.onnx.json (checked)
  benchmark  model.onnx        -> benchmark/bench.json + bench.png (every variant x provider vs PyTorch),
                                  then the model registered in MLflow
  predict    model, images     -> top-k classes (model.onnx, weights pair or models:/<name>/<version>)
  run        all of the above in order, plus summary.json
  import-weights  a timm / Hugging Face / Google .npz ViT checkpoint -> model.safetensors + model.json
  study      the claims over seeds: resolution gain, pos-embed ablation (stages reused)

example: vitpipe run configs/pipeline/demo.yaml pretrain.steps=50 model.depth=4
tracking: MLFLOW_TRACKING_URI, else tracking.uri, else sqlite:///./mlflow.db (view with `mlflow ui`)"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML, e.g. configs/pipeline/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. pretrain.steps=50")
    p.add_argument("--workdir", type=Path, help="run folder (default runs/<recipe name>)")
    p.add_argument("--force", action="store_true", help="rerun even if the outputs are up to date")


# Commands parsed by a tool's own parser (module, adder), registered by `build_parser` only when asked for.
TOOL_PARSERS = (
    ("shards", "tools.shards", "add_shards_parser"),
    ("eval", "tools.fewshot_cli", "add_eval_parser"),
    ("predict", "pipeline.export.predict", "add_predict_parser"),
    ("study", "stages.study", "add_study_parser"),
)
BENCH_PARSERS = (  # `vitpipe bench <what>`
    ("tools.shards", "add_bench_data_parser"),
    ("tools.bench_prepare", "add_bench_prepare_parser"),
    ("tools.bench_train", "add_bench_train_parser"),
    ("tools.bench_export", "add_bench_export_parser"),
    ("tools.bench_tracking", "add_bench_tracking_parser"),
    ("stages.compare_hybrid", "add_bench_hybrid_parser"),
)
# Registered by build_parser itself (and tools.submit_cli's light parsers).
BUILTIN_COMMANDS = ("run", "prepare", "pretrain", "finetune", "export", "benchmark", "import-weights", "config",
                    "submit", "status", "logs")


def _command_of(argv: list[str] | None) -> str | None:
    """The subcommand `argv` names: its first word that is not an option (the top level has no
    options but --help); None when there is none."""
    return next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of the subcommand `argv` names (of every subcommand when it names none
    or an unknown one, so --help and "invalid choice" list them all)."""
    parser = argparse.ArgumentParser(
        prog="vitpipe",
        description="Pre-train a Vision Transformer on sharded images with DeepSpeed ZeRO, fine-tune it at a "
        "higher resolution, export it to ONNX and benchmark it; every stage tracked in MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("run", help="run every stage of a recipe in order",
                       description="Run the recipe's stages (prepare, pretrain, finetune, export, benchmark) in "
                       "one working directory under one MLflow parent run, one nested run per stage. Writes "
                       "<workdir>/<stage>/... and <workdir>/summary.json; prints the summary table.")
    _add_common(p)

    p = sub.add_parser("prepare", help="images -> WebDataset shards + manifest",
                       description="Read the image source named by data.* (mnist5k, digits, or a folder tree "
                       "root/<class>/<image>) and write <out>/shards/{train,val}-NNNNNN.tar and <out>/manifest.json.")
    _add_common(p)
    p.add_argument("--out", type=Path, help="output folder (default <workdir>/prepare)")

    for name, what in (("pretrain", "pre-train from scratch with DeepSpeed ZeRO"),
                       ("finetune", "fine-tune a weights pair at a higher resolution")):
        p = sub.add_parser(name, help=what, description=(
            f"{what[0].upper() + what[1:]}: stream the train shards of --manifest on {name}.ranks local "
            "processes; write <out>/checkpoints/, <out>/model.safetensors (consolidated fp32) and <out>/model.json."
            + (" Reads the weights pair --init (default <workdir>/pretrain/model.safetensors), resamples its "
               "position embeddings to finetune.image_size and replaces the head." if name == "finetune" else "")))
        _add_common(p)
        p.add_argument("--manifest", help="manifest.json, its folder, or an s3:// or http(s):// URL of either "
                       "(default <workdir>/prepare/manifest.json)")
        if name == "finetune":
            p.add_argument("--init", type=Path, help="weights to start from: a weights pair, or a timm .safetensors/"
                           ".pth/.bin, Hugging Face folder or Google .npz (imported once into <out>/../imported/)")
        p.add_argument("--out", type=Path, help=f"output folder (default <workdir>/{name})")

    p = sub.add_parser("export", help="weights pair -> parity-checked ONNX",
                       description="Export --weights as the graphs export.variants names (fp32 -> <out>/model.onnx, "
                       "optimized/fp16/int8_dynamic/int8_static -> <out>/model.<variant>.onnx; dynamic batch axis) and "
                       "<out>/model.onnx.json; fails if a variant disagrees with PyTorch on held-out images from "
                       "--manifest beyond its tolerance or loses more than export.max_accuracy_drop points of top-1.")
    _add_common(p)
    p.add_argument("--weights", type=Path, help="weights pair: model.safetensors, model.json or their folder (default: the recipe's last training stage's)")
    p.add_argument("--manifest", help="manifest.json with a val split, its folder, or an s3:// or http(s):// URL "
                   "(default <workdir>/prepare/manifest.json)")
    p.add_argument("--out", type=Path, help="output folder (default <workdir>/export)")

    p = sub.add_parser("benchmark", help="onnxruntime latency/throughput/memory vs PyTorch eager and compile",
                       description="Benchmark --onnx and every other .onnx variant beside it on each of "
                       "benchmark.providers (default: CUDA where it can run, and CPU) at benchmark.batch_sizes, "
                       "with PyTorch eager and torch.compile on --weights on the same devices, in interleaved "
                       "rounds; a serving sweep over benchmark.concurrency threads. Writes <out>/bench.json and "
                       "<out>/bench.png; registers the model in MLflow (tracking.registered_model). A requested "
                       "provider that cannot run fails, unless benchmark.allow_fallback=true.")
    _add_common(p)
    p.add_argument("--onnx", type=Path, help="model.onnx (default <workdir>/export/model.onnx)")
    p.add_argument("--weights", type=Path, help="PyTorch baseline weights pair: model.safetensors, model.json or their folder (default: the recipe's last training stage's)")
    p.add_argument("--out", type=Path, help="output folder (default <workdir>/benchmark)")

    p = sub.add_parser("import-weights", help="timm / Hugging Face / Google .npz ViT checkpoint -> weights pair",
                       description="Translate a public ViT checkpoint into <out>/model.safetensors + model.json "
                       "(architecture inferred from its tensors and config, source format and sha256 recorded); "
                       "fine-tune, export and benchmark read the result. Unmappable keys are an error naming them.")
    p.add_argument("source", type=Path, help="a timm .safetensors/.pth/.bin (or timm hub folder), a Hugging Face "
                   "ViTModel/ViTForImageClassification folder, or a Google vision_transformer/big_vision .npz")
    p.add_argument("--out", type=Path, required=True, help="folder to write the weights pair into")
    p.add_argument("--format", default="auto", choices=("auto", "timm", "hf", "npz"),
                   help="source format (default: from the suffix or the folder's config.json)")
    p.add_argument("--heads", type=int, help="attention heads, for a timm checkpoint of no standard size "
                   "(a fused qkv does not show the head count)")

    p = sub.add_parser("config", help="print the resolved, validated config",
                       description="Load the recipe with its base files and overrides, validate it and print it as YAML.")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    from tools.submit_cli import add_submit_parsers

    add_submit_parsers(sub)
    # The other tools' arguments live with their code, whose imports (torch, onnx, mlflow) take
    # seconds: only the command being parsed is registered, so `vitpipe status` or a config error
    # answers at once. `vitpipe --help`, or a command no parser knows, registers them all.
    wanted = _command_of(argv)
    everything = wanted not in BUILTIN_COMMANDS
    for command, module, adder in TOOL_PARSERS:
        if everything or wanted == command:
            getattr(importlib.import_module(module), adder)(sub)
    if everything or wanted == "bench":
        bench = sub.add_parser("bench", help="benchmarks: data loading, prepare, training step, export, tracking, "
                               "hybrid vs plain",
                               description="Benchmarks that print ratios against baselines measured in the same run.")
        bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="what")
        for module, adder in BENCH_PARSERS:
            getattr(importlib.import_module(module), adder)(bench_sub)
    return parser


def _tracker(cfg, name: str):
    from pipeline.track import start_tracker

    return start_tracker(cfg.tracking, run_name=f"{cfg.name}/{name}", tags={"vitpipe.stage": name})


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command."""
    import yaml

    from pipeline.config import load_config, to_dict
    from tools.submit_cli import dispatch_submit

    if (code := dispatch_submit(args)) is not None:  # submit, status, logs
        return code
    if args.command == "bench" and args.bench_command == "train":
        from tools.bench_train import run_bench_train

        return run_bench_train(args)
    if args.command == "bench" and args.bench_command == "export":
        from tools.bench_export import run_bench_export

        return run_bench_export(args)
    if args.command == "bench" and args.bench_command == "hybrid":
        from stages.compare_hybrid import run_bench_hybrid

        return run_bench_hybrid(args)
    if args.command == "bench" and args.bench_command == "tracking":
        from tools.bench_tracking import run_bench_tracking

        return run_bench_tracking(args)
    if args.command == "bench" and args.bench_command == "prepare":
        from tools.bench_prepare import run_bench_prepare

        return run_bench_prepare(args)
    if args.command == "import-weights":
        from pipeline.model.importers import import_weights

        meta = import_weights(args.source, args.out, args.format, args.heads)
        arch = meta["architecture"]
        print(f"[import] {args.source} ({meta['source']['format']}, sha256 {meta['source']['sha256'][:16]}) -> "
              f"{args.out}: width {arch['width']}, depth {arch['depth']}, heads {arch['heads']}, patch "
              f"{arch['patch_size']}, {meta['image_size'][0]}x{meta['image_size'][1]} px, {meta['num_classes']} classes")
        return 0
    if args.command == "predict":  # takes a model and images, not a recipe
        from pipeline.export.predict import run_predict

        return run_predict(args)
    if args.command in ("shards", "bench"):  # these take a manifest, not a recipe
        from tools.shards import run_bench_data, run_shards

        return run_shards(args) if args.command == "shards" else run_bench_data(args)
    cfg = load_config(args.recipe, args.overrides)
    if args.command == "study":
        from stages.study import dispatch_study

        return dispatch_study(args, cfg)
    if args.command == "config":
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    workdir = args.workdir or Path("runs") / cfg.name
    if args.command == "run":
        from stages import recipe

        recipe.run(cfg, workdir, force=args.force)
        return 0

    from pipeline.folder_lock import FolderLock
    from stages.recipe import dataset_manifest, run_stage, stage_output
    from stages.training import tracked_run

    if args.command == "eval":  # `vitpipe eval fewshot`: reads a weights pair, trains nothing
        from tools.fewshot_cli import run_eval_fewshot

        return run_eval_fewshot(args, cfg, workdir, args.manifest or dataset_manifest(cfg, workdir))
    # The same path as `vitpipe run`: every input not given on the command line comes from the run
    # folder's standard places (stages.recipe.run_stage), and the stage's folder is locked first.
    out = stage_output(args.command, workdir, args.out)
    # Locked before the tracked run starts: a second writer refuses at once and leaves no run behind.
    with FolderLock(out, f"vitpipe {args.command}"), tracked_run(_tracker(cfg, args.command)) as tracker:
        result = run_stage(args.command, cfg, workdir, tracker, args.force, out=out, locked=True,
                           manifest=getattr(args, "manifest", None), init=getattr(args, "init", None),
                           weights=getattr(args, "weights", None), onnx=getattr(args, "onnx", None))
    print(json.dumps(result, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vitpipe` console script; returns the exit status."""
    from pipeline.memory import tune_malloc

    tune_malloc()  # image buffers: see pipeline/memory.py
    parser = build_parser(argv)
    # Overrides may come before or after options (`run r.yaml --workdir w a.b=1`); argparse stops
    # filling a positional list at the first option, so collect the stragglers here.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from pipeline.config import ConfigError
    from pipeline.data.errors import DataError
    from pipeline.train.preemption import REQUEUE_EXIT, TrainingPreempted

    try:
        return dispatch(args)
    except TrainingPreempted as e:
        print(f"vitpipe: {e}", file=sys.stderr)
        return REQUEUE_EXIT
    except ConfigError as e:
        print(f"vitpipe: config error: {e}", file=sys.stderr)
        return 2
    except (DataError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"vitpipe: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # --out on a file, a folder where a file belongs, no permission: the path, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        why = {FileExistsError: "is a file; a folder is needed here", NotADirectoryError:
               "a part of this path is a file, not a folder"}.get(type(e), e.strerror or str(e))
        print(f"vitpipe: error: {where}{why}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vitpipe: interrupted", file=sys.stderr)
        return 130
