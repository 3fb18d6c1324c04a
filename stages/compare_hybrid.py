"""`vitpipe bench hybrid`: a hybrid recipe's model vs its plain-ViT twin, pre-trained the same way.

The twin is the recipe's model with ``model.hybrid=false``: the same Transformer (width, depth,
heads, MLP) reading P x P patches instead of the stem's feature map. Both are pre-trained with the
recipe's data and ``pretrain`` settings (same steps, batch, schedule, so the same images seen), one
run per seed, the two models interleaved within each seed so that a slower spell of a shared
machine falls on both. The table gives parameters, analytic forward FLOPs per image
(`pipeline.model.vit.flops_per_image`), validation accuracy per seed and training images/s (best
run of each, and the ratio to the plain ViT's best). This is the paper's small-compute comparison
(figure 5: hybrids beat ViT at small budgets) at the demo's scale.

Layout: <workdir>/prepare/, <workdir>/<plain|hybrid>/seed<N>/ (each a pretrain stage folder, so a
re-run skips completed runs), <workdir>/compare.json.

`vitpipe run` runs the same comparison as its `hybrid` stage where a recipe lists it (the demo
does, for claim 3): `hybrid.recipe`, `hybrid.overrides`, `hybrid.seeds`, under <run>/hybrid/, on
the run's own dataset when the data settings match, the table in the run's summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

from pipeline.atomic import write_json, write_text
from pipeline.tables import format_table, ratio
from pipeline.config import (ConfigError, DataConfig, HybridStageConfig, ModelConfig, PipelineConfig,
                             validate_hybrid_stage, validate_model, validate_train)
from pipeline.track import NullTracker, Tracker


def plain_twin(model: ModelConfig) -> ModelConfig:
    """The recipe's hybrid with its stem removed: P x P patches into the same Transformer."""
    if not model.hybrid:
        raise ConfigError("model.hybrid: bench hybrid compares a hybrid with its plain twin, but this recipe's "
                          "model is plain; use a hybrid recipe such as configs/pipeline/demo-hybrid.yaml")
    return dataclasses.replace(model, hybrid=False)


def compare(cfg: PipelineConfig, workdir: Path, seeds: list[int], manifest: str | Path | None = None,
            force: bool = False) -> dict:
    """Pre-train the hybrid and its plain twin for each seed; return the figures (also in compare.json).

    `manifest`: a dataset already prepared from the same data settings (`vitpipe run` passes its
    own); None prepares cfg.data under <workdir>/prepare."""
    import torch

    from pipeline.data.manifest import load_manifest
    from pipeline.model.vit import build_model, flops_per_image
    from stages import prepare, pretrain  # torch and the trainer: only once a comparison runs

    models = {"plain": plain_twin(cfg.model), "hybrid": cfg.model}
    validate_model(models["plain"])
    validate_train(cfg.pretrain, models["plain"], "pretrain.")  # e.g. image size vs the twin's patch
    if manifest is None:
        manifest = prepare.run(cfg.data, workdir / "prepare", force=force)["manifest"]
    num_classes = load_manifest(manifest).num_classes
    rows = {}
    for name, model in models.items():
        with torch.device("meta"):  # shapes only: counting needs no memory or init time
            net = build_model(model, cfg.pretrain.image_size, num_classes)
        rows[name] = {"params": sum(p.numel() for p in net.parameters()), "flops_per_image": flops_per_image(net),
                      "tokens": net.grid[0] * net.grid[1], "val_accuracy": [], "images_per_s": []}
    for seed in seeds:
        train = dataclasses.replace(cfg.pretrain, seed=seed)
        for name, model in models.items():
            result = pretrain.run(model, train, manifest, workdir / name / f"seed{seed}", force=force)
            rows[name]["val_accuracy"].append(float(result["val_accuracy"]))
            rows[name]["images_per_s"].append(float(result["images_per_s"]))
    out = {"recipe": cfg.name, "seeds": seeds, "image_size": cfg.pretrain.image_size, "steps": cfg.pretrain.steps,
           "global_batch": cfg.pretrain.micro_batch * cfg.pretrain.grad_accum * cfg.pretrain.ranks,
           "ranks": cfg.pretrain.ranks, "models": rows}
    write_json(workdir / "compare.json", out)
    return out


def run_stage(stage: HybridStageConfig, data: DataConfig, manifest: str | Path, out_dir: Path,
              tracker: Tracker | None = None, force: bool = False) -> dict:
    """`vitpipe run`'s hybrid stage: the comparison of `stage.recipe` (with its overrides) under
    `out_dir`, on this run's dataset when that recipe's data settings are this run's (else its own)."""
    tracker = tracker or NullTracker()
    cfg = validate_hybrid_stage(stage)
    same_data = dataclasses.asdict(cfg.data) == dataclasses.asdict(data)
    tracker.log_params({"recipe": stage.recipe, "overrides": " ".join(stage.overrides),
                        "seeds": ",".join(map(str, stage.seeds)), "steps": cfg.pretrain.steps})
    result = compare(cfg, Path(out_dir), stage.seeds, manifest if same_data else None, force)
    result["recipe_file"], result["overrides"] = stage.recipe, list(stage.overrides)
    write_json(Path(out_dir) / "compare.json", result)
    write_text(Path(out_dir) / "compare.txt", hybrid_table(result) + "\n")
    models = result["models"]
    tracker.log_metrics({f"{name}_{k}": v for name in models for k, v in
                         (("val_accuracy_mean", statistics.mean(models[name]["val_accuracy"])),
                          ("flops_per_image", float(models[name]["flops_per_image"])),
                          ("images_per_s_best", max(models[name]["images_per_s"])))})
    tracker.log_artifact(Path(out_dir) / "compare.txt")
    return result


def hybrid_table(r: dict) -> str:
    """The comparison as text: one row per model, ratios against the plain ViT."""
    base = r["models"]["plain"]
    rows = []
    for name, row in r["models"].items():
        acc, best = row["val_accuracy"], max(row["images_per_s"])
        rows.append({"model": name, "params": f"{row['params'] / 1e6:.3f}M", "tokens": row["tokens"],
                     "fwd MFLOPs/img": row["flops_per_image"] / 1e6,
                     "FLOPs vs plain": row["flops_per_image"] / base["flops_per_image"],
                     "val acc mean": statistics.mean(acc), "per seed": " ".join(f"{a:.4f}" for a in acc),
                     "best img/s": best, "img/s vs plain": best / max(base["images_per_s"])})
    lines = [
        f"vitpipe bench hybrid: {r['recipe']}, {r['steps']} steps x {r['global_batch']} images at "
        f"{r['image_size']} px on {r['ranks']} ranks, seeds {' '.join(map(str, r['seeds']))}",
        format_table(rows, {"fwd MFLOPs/img": ".1f", "FLOPs vs plain": ratio, "val acc mean": ".4f",
                            "best img/s": ".1f", "img/s vs plain": ratio}),
    ]
    h, p = r["models"]["hybrid"]["val_accuracy"], base["val_accuracy"]
    wins = sum(a > b for a, b in zip(h, p))
    lines.append(f"hybrid - plain val accuracy: {statistics.mean(h) - statistics.mean(p):+.4f} on average; "
                 f"hybrid ahead on {wins} of {len(h)} seed(s)")
    return "\n".join(lines)


def add_bench_hybrid_parser(bench_sub) -> None:
    """Add `bench hybrid` to the `vitpipe bench` subcommands."""
    p = bench_sub.add_parser("hybrid", help="hybrid vs plain ViT, same recipe: accuracy, FLOPs, images/s",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a recipe whose model is a hybrid, e.g. configs/pipeline/demo-hybrid.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="pretrain.seed values, one run per model each")
    p.add_argument("--workdir", type=Path, default=None, help="default: runs/<recipe name>-bench")


def run_bench_hybrid(args: argparse.Namespace) -> int:
    """`vitpipe bench hybrid`: run, print the table (compare.json in the working directory)."""
    from pipeline.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    if len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds: each seed once, got {args.seeds}")
    workdir = args.workdir or Path("runs") / f"{cfg.name}-bench"
    print(hybrid_table(compare(cfg, workdir, args.seeds)))
    return 0
