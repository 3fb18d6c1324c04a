"""One end-to-end `vitpipe run` of the tiny recipe, as a user runs it, against a real MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import vitpipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run  # conftest.py: the run is shared with tests/test_plots.py


def test_every_stage_wrote_its_files(run):
    w = run["work"]
    for rel in ("prepare/manifest.json", "pretrain/model.safetensors", "pretrain/model.json",
                "finetune/model.safetensors", "finetune/model.json", "export/model.onnx",
                "export/model.onnx.json", "benchmark/bench.json", "summary.json", "config.yaml"):
        assert (w / rel).is_file(), rel
    for stage in ("prepare", "pretrain", "finetune", "export", "benchmark"):
        assert json.loads((w / stage / "stage.json").read_text())["stage"] == stage


@pytest.mark.skipif(os.environ.get("DS_ACCELERATOR", "cpu") != "cpu", reason="the op is built for CPU ranks")
def test_the_ranks_reuse_the_deepspeed_op_built_before_them(run):
    # The suite built it at its start from a PATH without the venv; the run's ranks, started from an
    # activated venv, load that build instead of spending ~40 s rebuilding it with another ninja.
    before, after = run["op_built"]
    assert before is not None and after == before


def test_summary_has_the_figures_of_every_stage(run):
    s = json.loads((run["work"] / "summary.json").read_text())
    assert s["pretrain"]["image_size"] == 14 and s["finetune"]["image_size"] == 28
    for key in ("val_accuracy",):
        assert 0.0 <= s["pretrain"][key] <= 1.0 and 0.0 <= s["finetune"][key] <= 1.0
    assert 0.0 <= s["finetune"]["val_accuracy_before"] <= 1.0
    parity = s["export"]["parity"]
    assert parity["max_abs_diff"] < 1e-4 and parity["top1_agreement"] == 1.0 and parity["n_images"] == 32
    rows = s["benchmark"]["rows"]
    # every exported variant is benchmarked at every batch size (file stems name the variants)
    exported = sorted(Path(p).stem for p in s["benchmark"]["variants"].values())
    assert exported == sorted(Path(v["file"]).stem for v in s["export"]["variants"].values())
    assert len(exported) == len(s["export"]["variants"]) >= 2
    for name in exported:
        assert [r["batch_size"] for r in rows if r["variant"] == name] == [1, 8], name
    assert all(r["ort_images_per_s"] > 0 and r["torch_images_per_s"] > 0 for r in rows)
    assert "CPUExecutionProvider" in s["benchmark"]["providers"]
    out = run["proc"].stdout
    assert "after fine-tuning @ 28px" in out and "ONNX parity" in out and "ORT/torch" in out


def test_onnx_metadata_describes_inputs_and_parity(run):
    info = json.loads((run["work"] / "export" / "model.onnx.json").read_text())
    assert info["input"]["name"] == "images" and info["input"]["shape"] == ["batch", 1, 28, 28]
    assert info["input"]["mean"] == [0.1307] and info["class_names"] == [str(i) for i in range(10)]
    assert info["opset"] == 18 and info["parity"]["tolerance"] == 1e-4


def test_mlflow_has_a_parent_run_with_one_child_per_stage(run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=run["env"]["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("vitpipe")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["pretrain.steps"] == "6"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"prepare", "pretrain", "finetune", "export", "benchmark"}
    assert all(c.info.status == "FINISHED" for c in children.values())

    pre = children["pretrain"]
    # logged by rank 0 only: one point per log step (2, 4, 6), not one per rank
    loss = client.get_metric_history(pre.info.run_id, "loss")
    assert [m.step for m in loss] == [2, 4, 6]
    for name in ("lr", "images_per_s", "grad_norm", "val_accuracy"):
        assert client.get_metric_history(pre.info.run_id, name), name
    assert pre.data.params["train.zero_stage"] == "2" and pre.data.params["world_size"] == "2"
    assert any(k.startswith("system/cpu") for k in pre.data.metrics), sorted(pre.data.metrics)  # system metrics on
    assert client.get_metric_history(children["finetune"].info.run_id, "val_accuracy_before_finetune")

    def artifacts(stage):
        return {a.path for a in client.list_artifacts(children[stage].info.run_id)}

    assert "manifest.json" in artifacts("prepare")
    assert "model.json" in artifacts("pretrain") and "model.json" in artifacts("finetune")
    assert "model.onnx.json" in artifacts("export")
    assert "bench.json" in artifacts("benchmark")
    assert {"config.yaml", "summary.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_lineage_leads_from_the_benchmark_back_to_the_dataset(run):
    from mlflow.tracking import MlflowClient

    from pipeline.track import lineage
    from stages.lineage import content_sha256

    uri, w = run["env"]["MLFLOW_TRACKING_URI"], run["work"]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("vitpipe").experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    ids = {r.info.run_name: r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    chain = {c["name"]: c for c in lineage(uri, ids["benchmark"])}
    assert set(chain) == {"benchmark", "export", "finetune", "pretrain", "prepare"}  # every stage reached
    dataset = content_sha256(w / "prepare" / "manifest.json")
    pre_w, ft_w = content_sha256(w / "pretrain" / "model.safetensors"), content_sha256(w / "finetune" / "model.safetensors")
    onnx = content_sha256(w / "export" / "model.onnx")
    assert chain["prepare"]["outputs"] == {"dataset": dataset}
    assert chain["pretrain"]["inputs"] == {"dataset": dataset} and chain["pretrain"]["outputs"] == {"weights": pre_w}
    assert chain["finetune"]["inputs"] == {"dataset": dataset, "weights": pre_w}
    assert chain["finetune"]["outputs"] == {"weights": ft_w}
    assert chain["export"]["inputs"] == {"dataset": dataset, "weights": ft_w} and chain["export"]["outputs"] == {"onnx": onnx}
    assert chain["benchmark"]["inputs"] == {"onnx": onnx, "weights": ft_w}
    # each input names the run that produced it
    tags = {name: client.get_run(rid).data.tags for name, rid in ids.items()}
    assert tags["benchmark"]["vitpipe.input.onnx.run"] == ids["export"]
    assert tags["export"]["vitpipe.input.weights.run"] == ids["finetune"]
    assert tags["finetune"]["vitpipe.input.weights.run"] == ids["pretrain"]
    assert tags["pretrain"]["vitpipe.input.dataset.run"] == ids["prepare"]
    # the dataset as an MLflow run input: digest, source, split counts
    summary = json.loads((w / "summary.json").read_text())["prepare"]
    for stage, context in (("pretrain", "train"), ("finetune", "train"), ("export", "eval")):
        [inp] = client.get_run(ids[stage]).inputs.dataset_inputs
        assert inp.dataset.digest == dataset[:32] and inp.dataset.name == "mnist5k"
        assert inp.dataset.source == str((w / "prepare" / "manifest.json").resolve())
        assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == context
        profile = json.loads(inp.dataset.profile)
        assert profile["train_samples"] == summary["train_samples"] and profile["val_samples"] == summary["val_samples"]
        assert profile["train_shards"] == summary["train_shards"] and profile["num_classes"] == 10


def test_second_run_skips_stages_whose_inputs_are_unchanged(run):
    t0 = time.perf_counter()
    proc = vitpipe("run", *run["args"], "--workdir", "w", cwd=run["cwd"], env=run["env"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("prepare", "pretrain", "finetune", "export", "benchmark"):
        assert f"[{stage}] up to date" in proc.stdout
    assert time.perf_counter() - t0 < 60  # no training process was started


def test_moved_run_folder_is_still_up_to_date(run):
    # Moves the run folder the other tests read, and puts it back (tests/test_plots.py reads it too).
    moved = run["cwd"] / "elsewhere" / "w2"
    moved.parent.mkdir()
    shutil.move(str(run["work"]), str(moved))
    try:
        proc = vitpipe("run", *run["args"], "--workdir", str(moved), cwd=run["cwd"], env=run["env"])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        for stage in ("prepare", "pretrain", "finetune", "export", "benchmark"):
            assert f"[{stage}] up to date" in proc.stdout, stage
        summary = json.loads((moved / "summary.json").read_text())
        assert summary["pretrain"]["weights"] == str((moved / "pretrain" / "model.safetensors").resolve())
        assert summary["prepare"]["manifest"] == str((moved / "prepare" / "manifest.json").resolve())
    finally:
        shutil.move(str(moved), str(run["work"]))
