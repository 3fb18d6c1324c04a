"""`vitpipe run`: every stage of a recipe in order, in one working directory, under one MLflow run.

Layout of the working directory: prepare/, pretrain/, finetune/, export/, benchmark/ (one folder
per stage, each with its stage.json once complete) and summary.json with the summary table's figures.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import yaml

from pipeline.atomic import write_json
from pipeline.config import PipelineConfig, to_dict
from pipeline.folder_lock import FolderLock
from pipeline.run_layout import RunLayout
from pipeline.track import NullTracker, Tracker, start_tracker
from stages.training import tracked_run


def stage_dirs(workdir: Path) -> dict[str, Path]:
    """Where each stage of a run writes."""
    return RunLayout(workdir).stage_dirs()


def dataset_manifest(cfg: PipelineConfig, workdir: Path) -> str | Path:
    """Where the prepare stage of this recipe leaves its manifest: under data.output when set (a
    folder or s3://bucket/prefix), else in the working directory's prepare/ folder."""
    if cfg.data.output:
        from pipeline.data.manifest import MANIFEST_NAME, manifest_url
        from pipeline.data.storage import is_url

        if is_url(cfg.data.output):
            return manifest_url(cfg.data.output.rstrip("/"))
        return Path(cfg.data.output) / MANIFEST_NAME
    return RunLayout(workdir).manifest()


def stage_output(name: str, workdir: Path, out: Path | None = None) -> Path:
    """The folder stage `name` writes: `out` when given, else its folder in the run folder."""
    return Path(out) if out is not None else RunLayout(workdir).stage(name)


def run_stage(name: str, cfg: PipelineConfig, workdir: Path, tracker: Tracker, force: bool, *,
              out: Path | None = None, manifest: str | Path | None = None, init: str | Path | None = None,
              weights: Path | None = None, onnx: Path | None = None, locked: bool = False) -> dict:
    """Run one stage, taking every input the caller does not give from the run folder's standard
    places. The one path from a recipe to a stage: `vitpipe run` (no inputs given) and the stage
    commands (`vitpipe export --weights W ...`) both call it, so their defaults cannot disagree.

    Defaults: out <workdir>/<stage>; manifest `dataset_manifest`; init finetune.init_from, else the
    run's pre-trained weights; weights (export, benchmark) the recipe's last training stage's
    (`RunLayout.deployed_weights`); onnx <workdir>/export/model.onnx. The stage's folder is locked
    while it runs (a second writer refuses at once), unless the caller holds that lock (`locked`)."""
    layout = RunLayout(workdir)
    out = stage_output(name, workdir, out)
    with contextlib.nullcontext() if locked else FolderLock(out, f"vitpipe run: {name}"):
        manifest = manifest or dataset_manifest(cfg, workdir)
        # Each stage's module is imported when it runs: `vitpipe prepare` and a training stage's
        # launcher never load torch or onnxruntime for the stages they do not run (~2.5 s a command).
        if name == "prepare":
            from stages import prepare
            return prepare.run(cfg.data, out, tracker, force)
        if name == "pretrain":
            from stages import pretrain
            return pretrain.run(cfg.model, cfg.pretrain, manifest, out, tracker, force)
        if name == "finetune":
            from stages import finetune
            init = init or cfg.finetune.init_from or layout.weights("pretrain")
            return finetune.run(cfg.finetune, manifest, init, out, tracker, force, model=cfg.model)
        if name == "hybrid":  # a second recipe's hybrid-vs-plain comparison (stages/compare_hybrid.py)
            from stages import compare_hybrid
            return compare_hybrid.run_stage(cfg.hybrid, cfg.data, manifest, out, tracker, force)
        weights = weights or layout.deployed_weights(cfg.stages)
        if name == "export":
            from stages import export
            return export.run(cfg.export, weights, manifest, out, tracker, force)
        if name == "benchmark":
            from stages import benchmark
            return benchmark.run(cfg.benchmark, onnx or layout.onnx(), weights, out, tracker, force,
                                 registered_model=registered_model_name(cfg))
    raise ValueError(f"unknown stage {name!r}")


def registered_model_name(cfg: PipelineConfig) -> str | None:
    """The registry name the benchmark stage registers the exported model under; None: no registration."""
    if not (cfg.tracking.enabled and cfg.tracking.register_model):
        return None
    return cfg.tracking.registered_model or cfg.name


def _fmt(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def summary_table(summary: dict) -> str:
    """The figures a user wants after a run, as plain text."""
    lines = [f"vitpipe run '{summary['recipe']}'  ({summary['workdir']})", ""]
    pre, ft = summary.get("pretrain") or {}, summary.get("finetune") or {}
    if pre or ft:
        val = (summary.get("prepare") or {}).get("val_samples")
        lines.append(f"{'val accuracy' + (f' on the same {val} held-out images' if val else ''):<62}{'value':>16}")
        if pre:
            lines.append(f"{'pre-trained @ %spx (its own resolution)' % pre.get('image_size'):<62}"
                         f"{_fmt(pre.get('val_accuracy')):>16}")
        if ft:
            init = ft.get("pos_embed_init", "resample")
            how = "resampled" if init == "resample" else init
            before = ft.get("val_accuracy_before")
            lines.append(f"{'pre-trained @ %spx before fine-tuning (%s pos-embed)' % (ft.get('image_size'), how):<62}"
                         f"{'n/a (new head)' if before is None else _fmt(before):>16}")
            lines.append(f"{'after fine-tuning @ %spx' % ft.get('image_size'):<62}{_fmt(ft.get('val_accuracy')):>16}")
        # The gain is the claim only when the fine-tune started from this run's own pre-training.
        if pre.get("val_accuracy") is not None and ft.get("val_accuracy") is not None and pre.get("weights") \
                and Path(ft.get("init_from", pre["weights"])).resolve() == Path(pre["weights"]).resolve():
            lines.append(f"{'fine-tuned @ %spx minus pre-trained @ %spx' % (ft.get('image_size'), pre.get('image_size')):<62}"
                         f"{ft['val_accuracy'] - pre['val_accuracy']:>+16.4f}")
        lines.append("")
    ex = summary.get("export") or {}
    if ex:
        p = ex.get("parity", {})
        lines.append(f"ONNX parity on {p.get('n_images')} held-out images: max |dlogit| {_fmt(p.get('max_abs_diff'), '.2e')}, "
                     f"top-1 agreement {_fmt(p.get('top1_agreement'), '.4f')}  ({', '.join(p.get('providers', []))})")
        lines.append("")
    bench = summary.get("benchmark") or {}
    if bench.get("rows"):
        lines += list(bench.get("notices") or [])  # a fallback changes what every figure below means
        from pipeline.tables import format_table, ratio

        lines.append(format_table(
            [{"variant": r.get("variant"), "batch": r["batch_size"], "ORT p50 ms": r["ort_p50_ms"],
              "torch p50 ms": r["torch_p50_ms"], "ORT img/s": r["ort_images_per_s"],
              "torch img/s": r["torch_images_per_s"], "ORT/torch": r["speedup"]} for r in bench["rows"]],
            {"ORT p50 ms": ".3f", "torch p50 ms": ".3f", "ORT img/s": ".1f", "torch img/s": ".1f", "ORT/torch": ratio}))
        lines.append(f"onnxruntime providers used: {', '.join(bench.get('providers', []))}")
        if bench.get("registered"):
            lines.append(f"registered: {bench['registered']['model_uri']}")
    if summary.get("hybrid"):
        from stages.compare_hybrid import hybrid_table
        lines += ["", hybrid_table(summary["hybrid"])]
    return "\n".join(lines)


def run(cfg: PipelineConfig, workdir: str | Path | None = None, force: bool = False) -> dict:
    """Run the recipe's stages in order; return (and write) the summary."""
    workdir = Path(workdir or Path("runs") / cfg.name)
    # One run per folder: a second `vitpipe run` here refuses at once, naming this one's pid and host.
    with FolderLock(workdir, f"vitpipe run {cfg.name}"):
        return _run(cfg, workdir, force)


def _run(cfg: PipelineConfig, workdir: Path, force: bool) -> dict:
    layout = RunLayout(workdir)
    layout.config().write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tracker = start_tracker(cfg.tracking, run_name=cfg.name, tags={"vitpipe.recipe": cfg.name,
                                                                  "vitpipe.workdir": str(workdir.resolve())})
    with tracked_run(tracker):  # the parent run ends once, with the status the run ended in
        tracker.log_params(to_dict(cfg))
        tracker.log_artifact(layout.config())
        summary: dict = {"recipe": cfg.name, "workdir": str(workdir), "stages": list(cfg.stages),
                         "mlflow_run_id": tracker.run_id, "tracking_uri": getattr(tracker, "tracking_uri", None)}
        for name in cfg.stages:
            child = tracker.child(name) if not isinstance(tracker, NullTracker) else tracker
            with tracked_run(child):
                summary[name] = run_stage(name, cfg, workdir, child, force)
        _write_summary(workdir, summary)  # only once every stage is done: a partial run has none
        text = summary_table(summary)
        layout.summary_text().write_text(text + "\n")
        tracker.log_artifact(layout.summary())
    print("\n" + text)
    return summary


def _write_summary(workdir: Path, summary: dict) -> None:
    write_json(RunLayout(workdir).summary(), summary)
