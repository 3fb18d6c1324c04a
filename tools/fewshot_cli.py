"""`vitpipe eval fewshot RECIPE`: the few-shot linear evaluation of a weights pair, as a table and JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.atomic import write_json
from pipeline.config import PipelineConfig
from pipeline.data.manifest import load_manifest
from pipeline.eval.fewshot import DEFAULT_L2, DEFAULT_SHOTS, extract_features, fewshot_eval, fewshot_table
from pipeline.model.weights import check_model_classes, model_from_pair
from pipeline.run_layout import RunLayout


def _shots(text: str) -> list[int]:
    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shots: expected comma-separated integers like 1,5,10,25, got {text!r}")
    if not shots or min(shots) < 1:
        raise argparse.ArgumentTypeError(f"--shots: need positive integers, got {text!r}")
    return shots


def add_eval_parser(sub) -> None:
    """`vitpipe eval fewshot ...`."""
    ev = sub.add_parser("eval", help="evaluations of a weights pair: few-shot linear evaluation",
                        description="Evaluations of a weights pair beyond its val accuracy.")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True, metavar="what")
    p = ev_sub.add_parser(
        "fewshot", help="the paper's few-shot linear evaluation (ridge on frozen class-token features)",
        description="Fit a regularized least-squares classifier ({-1,+1} one-vs-rest targets, closed form) on the "
        "frozen class-token features of k train images per class, for each k in --shots and --seeds draws, and "
        "report its accuracy on the val split. Prints a table; writes --out (JSON).")
    p.add_argument("recipe", help="recipe YAML (names the run folder and the dataset)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--workdir", type=Path, help="run folder (default runs/<recipe name>)")
    p.add_argument("--weights", type=Path, help="weights pair (default <workdir>/pretrain/model.safetensors: the "
                   "paper evaluates pre-trained representations)")
    p.add_argument("--manifest", help="manifest.json with train and val splits, its folder, or its URL "
                   "(default <workdir>/prepare/manifest.json)")
    p.add_argument("--shots", type=_shots, default=list(DEFAULT_SHOTS), help="shots per class, e.g. 1,5,10,25")
    p.add_argument("--seeds", type=int, default=3, help="independent draws of the shots per k (default 3)")
    p.add_argument("--l2", type=float, default=DEFAULT_L2, help=f"ridge penalty (default {DEFAULT_L2:g}, big_vision's)")
    p.add_argument("--batch", type=int, default=128, help="images per feature-extraction forward")
    p.add_argument("--out", type=Path, help="JSON output (default <workdir>/eval/fewshot.json)")


def run_fewshot(weights: str | Path, manifest: str | Path, shots: list[int], seeds: int, l2: float = DEFAULT_L2,
                batch: int = 128) -> dict:
    """Few-shot linear evaluation of `weights` on `manifest` (k-shot train draws, the whole val split)."""
    m = load_manifest(manifest)
    check_model_classes(weights, m.class_names, str(manifest))  # labels must mean the same classes
    model, meta = model_from_pair(weights)
    train = extract_features(model, m, "train", batch_size=batch, mean=meta["mean"], std=meta["std"])
    val = extract_features(model, m, "val", batch_size=batch, mean=meta["mean"], std=meta["std"])
    per_shot = fewshot_eval(train, val, m.num_classes, shots=shots, seeds=seeds, l2=l2)
    return {"weights": str(weights), "manifest": str(manifest), "image_size": meta["image_size"],
            "feature": "class token after the final norm (the head's input)", "feature_dim": int(train[0].shape[1]),
            "num_classes": m.num_classes, "chance": 1.0 / m.num_classes, "train_images": int(len(train[1])),
            "val_images": int(len(val[1])), "seeds": seeds, "l2": l2, "shots": per_shot}


def run_eval_fewshot(args: argparse.Namespace, cfg: PipelineConfig, workdir: Path, manifest: str | Path) -> int:
    """Run `vitpipe eval fewshot` with the recipe `cfg`; print the table, write the JSON, log to MLflow."""
    from pipeline.track import start_tracker

    if args.seeds < 1:
        raise ValueError(f"--seeds: need at least 1, got {args.seeds}")
    weights = args.weights or RunLayout(workdir).weights("pretrain")  # the paper evaluates representations
    out = args.out or workdir / "eval" / "fewshot.json"
    result = run_fewshot(weights, manifest, args.shots, args.seeds, args.l2, args.batch)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    tracker = start_tracker(cfg.tracking, run_name=f"{cfg.name}/eval-fewshot", tags={"vitpipe.stage": "eval-fewshot"})
    try:
        tracker.log_params({"weights": str(weights), "shots": args.shots, "seeds": args.seeds, "l2": args.l2})
        tracker.log_metrics({f"fewshot_{k}shot_accuracy": r["accuracy_mean"] for k, r in result["shots"].items()})
        tracker.log_artifact(out)
    finally:
        tracker.finish()
    print(fewshot_table(result["shots"], result["num_classes"], args.seeds))
    print(f"-> {out}")
    return 0
