"""Plots as MLflow artifacts, per stage: real tiny pretrain (2 gloo ranks), finetune and export runs
logging to a real MLflow store (sqlite, artifacts in a local folder). The PNGs must exist, decode as
images of a plausible size and be in the stage's run; the confusion matrix must count every
held-out image once and agree exactly with the accuracy the stage reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.config import TrackingConfig, load_config
from pipeline.data.manifest import load_manifest
from pipeline.eval.confusion import accuracy_of
from pipeline.eval.plots import plot_confusion, plot_training
from pipeline.run_layout import CONFUSION_PLOT, TRAINING_PLOT, VARIANTS_PLOT
from pipeline.track import MLflowTracker, start_tracker
from stages import export, finetune, prepare, pretrain

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pipeline" / "tiny.yaml"

pytestmark = pytest.mark.slow


def _png(path: Path, min_w: int = 300, min_h: int = 200) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()  # decodes the whole image: a truncated PNG fails here
        assert im.format == "PNG"
        w, h = im.size
    assert min_w <= w <= 4000 and min_h <= h <= 4000, (path, w, h)
    return w, h


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("plots")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = load_config(TINY, ["pretrain.eval_every=2", "pretrain.steps=6", "finetune.ranks=1",
                             "export.variants=[fp32, int8_dynamic]"])
    manifest = prepare.run(cfg.data, work / "prepare")["manifest"]
    out = {"work": work, "uri": uri, "manifest": manifest}
    tcfg = TrackingConfig(uri=uri, experiment="plots", system_metrics_interval=0)
    for stage in ("pretrain", "finetune", "export"):
        tracker = start_tracker(tcfg, run_name=stage)
        assert isinstance(tracker, MLflowTracker)
        if stage == "pretrain":
            result = pretrain.run(cfg.model, cfg.pretrain, manifest, work / stage, tracker)
        elif stage == "finetune":
            result = finetune.run(cfg.finetune, manifest, work / "pretrain" / "model.safetensors", work / stage,
                                  tracker)
        else:
            result = export.run(cfg.export, work / "finetune" / "model.safetensors", manifest, work / stage, tracker)
        tracker.finish()
        out[stage] = {"result": result, "run_id": tracker.run_id}
    return out


def _artifacts(runs, stage: str) -> set[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=runs["uri"])
    return {a.path for a in client.list_artifacts(runs[stage]["run_id"], "plots")}


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_training_stages_plot_their_curves_and_confusion_matrix_into_their_run(runs, stage):
    folder = runs["work"] / stage
    _png(folder / TRAINING_PLOT, min_w=800)
    _png(folder / CONFUSION_PLOT)
    assert {f"plots/{TRAINING_PLOT}", f"plots/{CONFUSION_PLOT}", "plots/confusion.json"} <= _artifacts(runs, stage)

    confusion = json.loads((folder / "confusion.json").read_text())
    manifest = load_manifest(runs["manifest"])
    held_out = sum(s["samples"] for s in manifest.shards("val"))
    counts = confusion["counts"]
    assert len(counts) == manifest.num_classes and all(len(row) == manifest.num_classes for row in counts)
    assert sum(map(sum, counts)) == held_out == runs[stage]["result"]["val_count"]
    assert accuracy_of(counts) == pytest.approx(runs[stage]["result"]["val_accuracy"], abs=1e-12)
    assert confusion["class_names"] == manifest.class_names

    # The curves are drawn from what was logged: every logged step and every evaluation.
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = runs[stage]["result"]["steps"]
    assert [r["step"] for r in history if "loss" in r] == list(range(2, steps + 1, 2))
    evals = [r["step"] for r in history if "val_accuracy" in r]
    assert evals == ([2, 4, 6] if stage == "pretrain" else [steps])

    # Training progress: plain lines (the ranks write to a pipe), from rank 0 only.
    log = (folder / "train.log").read_text()
    assert log.count(f"[{stage}] progress done: {steps}/{steps} steps (100%)") == 1, log[-2000:]


def test_export_plots_each_variants_accuracy_into_its_run(runs):
    _png(runs["work"] / "export" / VARIANTS_PLOT)
    assert f"plots/{VARIANTS_PLOT}" in _artifacts(runs, "export")


def test_plots_of_many_classes_and_of_an_empty_history_still_draw(tmp_path):
    # 100 classes: no per-cell text or names (unreadable), still a plausible image; a history with
    # no evaluation yet draws empty panels instead of failing the stage.
    counts = [[(i == j) * 3 + (j == (i + 1) % 100) for j in range(100)] for i in range(100)]
    _png(plot_confusion(counts, [f"c{i}" for i in range(100)], tmp_path / "c.png", "many"))
    _png(plot_training([{"step": 1, "loss": 2.3, "lr": 1e-3, "images_per_s": 10.0}], tmp_path / "t.png", "one"))
