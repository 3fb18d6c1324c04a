"""Plots as MLflow artifacts, per stage: the real tiny pretrain (2 gloo ranks), finetune and export
runs of conftest's one `vitpipe run`, logging to a real MLflow store (sqlite, artifacts in a local
folder). The PNGs must exist, decode as images of a plausible size and be in the stage's run; the
confusion matrix must count every held-out image once and agree exactly with the accuracy the
stage reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.manifest import load_manifest
from pipeline.eval.confusion import accuracy_of
from pipeline.eval.plots import plot_confusion, plot_training
from pipeline.run_layout import CONFUSION_PLOT, TRAINING_PLOT, VARIANTS_PLOT

pytestmark = pytest.mark.slow


def _png(path: Path, min_w: int = 300, min_h: int = 200) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()  # decodes the whole image: a truncated PNG fails here
        assert im.format == "PNG"
        w, h = im.size
    assert min_w <= w <= 4000 and min_h <= h <= 4000, (path, w, h)
    return w, h


@pytest.fixture(scope="module")
def runs(tiny_run):
    """The stages of conftest's one tiny `vitpipe run` (pre-training evaluates every other step):
    per stage, the result its stage record holds and its MLflow run."""
    from mlflow.tracking import MlflowClient

    work, uri = tiny_run["work"], tiny_run["env"]["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri)
    children = {r.info.run_name: r.info.run_id
                for r in client.search_runs([client.get_experiment_by_name("vitpipe").experiment_id])
                if "mlflow.parentRunId" in r.data.tags}
    out = {"work": work, "uri": uri, "manifest": work / "prepare" / "manifest.json"}
    for stage in ("pretrain", "finetune", "export"):
        out[stage] = {"result": json.loads((work / stage / "stage.json").read_text())["result"],
                      "run_id": children[stage]}
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
