"""The run folder has one owner: `vitpipe run` and the stage commands take the same inputs by default.

They used to disagree: `vitpipe export` took <workdir>/finetune/model.safetensors whatever the
recipe said, `vitpipe run` took it too unless it was missing and pretrain's existed. Both now go
through `stages.recipe.run_stage`, and the weights export reads are the recipe's last training
stage's (`RunLayout.deployed_weights`), never "whichever file happens to exist".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.model.vit import build_model
from pipeline.model.weights import save_weights_pair, weights_meta
from pipeline.run_layout import STAGES, RunLayout
from stages import prepare

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pipeline" / "tiny.yaml"


def test_layout_paths():
    layout = RunLayout("runs/x")
    assert layout.stage_dirs() == {s: Path("runs/x") / s for s in STAGES}
    assert layout.weights("pretrain") == Path("runs/x/pretrain/model.safetensors")
    assert layout.onnx() == Path("runs/x/export/model.onnx")
    assert layout.manifest() == Path("runs/x/prepare/manifest.json")
    with pytest.raises(ValueError, match="unknown stage 'pretrian'"):
        layout.stage("pretrian")


def test_deployed_weights_follow_the_recipe_not_the_files():
    layout = RunLayout("w")
    assert layout.deployed_weights(STAGES) == Path("w/finetune/model.safetensors")
    assert layout.deployed_weights(("prepare", "pretrain", "export", "benchmark")) == Path("w/pretrain/model.safetensors")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder with the tiny recipe's shards and an (untrained, real) pre-trained weights pair."""
    work = tmp_path_factory.mktemp("layout")
    cfg = load_config(TINY)
    prepare.run(cfg.data, work / "prepare")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.pretrain.image_size, 10)
    save_weights_pair(work / "pretrain", model.state_dict(),
                      weights_meta(cfg.model, cfg.pretrain.image_size, 10, [str(i) for i in range(10)], stage="pretrain"))
    return work


def test_export_command_without_finetune_in_the_recipe_exports_the_pretrained_weights(run_folder, capsys):
    # a stale fine-tune left in the folder by an earlier recipe: neither path may pick it up now
    stale = run_folder / "finetune" / "model.safetensors"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"not the weights this recipe exports")
    code = main(["export", str(TINY), "--workdir", str(run_folder), "stages=[prepare,pretrain,export]",
                 "export.variants=[fp32]", "tracking.enabled=false"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((run_folder / "export" / "stage.json").read_text())
    assert Path(record["result"]["weights"]).resolve() == (run_folder / "pretrain" / "model.safetensors").resolve()


def test_a_recipe_with_finetune_never_exports_the_pretrained_weights_instead(run_folder, capsys):
    # `vitpipe run` used to fall back to pretrain's weights when finetune's were missing
    missing = run_folder / "finetune" / "model.safetensors"
    missing.unlink(missing_ok=True)
    code = main(["export", str(TINY), "--workdir", str(run_folder), "--out", str(run_folder / "export2"),
                 "export.variants=[fp32]", "tracking.enabled=false"])
    assert code == 1
    assert f"{missing.parent}/model." in capsys.readouterr().err  # the pair it needs, by name


def test_export_and_benchmark_take_weights_as_the_pairs_folder_json_or_safetensors(run_folder, tmp_path, capsys):
    """`--weights` accepts what import-weights and every training stage write (a pair's folder) as
    predict does; export used to hash the folder as a file and die with IsADirectoryError. The
    three spellings are one input: the second and third exports are up to date."""
    pair = run_folder / "pretrain"
    common = ["--workdir", str(run_folder), "--out", str(tmp_path / "export"), "stages=[prepare,pretrain,export]",
              "export.variants=[fp32]", "tracking.enabled=false"]
    for i, weights in enumerate((pair, pair / "model.json", pair / "model.safetensors")):
        capsys.readouterr()
        assert main(["export", str(TINY), "--weights", str(weights), *common]) == 0, capsys.readouterr().err
        assert ("[export] up to date" in capsys.readouterr().out) == (i > 0), weights
    record = json.loads((tmp_path / "export" / "stage.json").read_text())
    assert Path(record["result"]["weights"]) == pair / "model.safetensors"
    assert main(["benchmark", str(TINY), "--weights", str(pair), "--onnx", str(tmp_path / "export" / "model.onnx"),
                 "--workdir", str(run_folder), "--out", str(tmp_path / "bench"), "tracking.enabled=false",
                 "benchmark.batch_sizes=[1]", "benchmark.iterations=2", "benchmark.warmup=1", "benchmark.rounds=1",
                 "benchmark.torch_compile=false", "benchmark.concurrency=[]"]) == 0, capsys.readouterr().err
    assert Path(json.loads((tmp_path / "bench" / "bench.json").read_text())["weights"]) == pair / "model.safetensors"


def test_a_tracked_run_ends_once_with_the_status_its_work_ended_in(tmp_path, monkeypatch):
    """stages.training.tracked_run, the one place (the CLI's stage commands, `vitpipe run`'s parent
    and child runs, a resumed training stage) that ends an MLflow run."""
    import mlflow

    from pipeline.config import TrackingConfig
    from pipeline.track import start_tracker
    from stages.training import TrainingPreempted, tracked_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = TrackingConfig(system_metrics_interval=0)
    statuses = {}
    for name, error in (("ok", None), ("preempted", TrainingPreempted("stopped")), ("failed", ValueError("bad")),
                        ("interrupted", KeyboardInterrupt())):
        tracker = start_tracker(cfg, run_name=name)
        try:
            with tracked_run(tracker):
                if error is not None:
                    raise error
        except (TrainingPreempted, ValueError, KeyboardInterrupt):
            pass
        statuses[name] = mlflow.tracking.MlflowClient(uri).get_run(tracker.run_id).info.status
    assert statuses == {"ok": "FINISHED", "preempted": "KILLED", "failed": "FAILED", "interrupted": "FAILED"}
    # a run the caller owns is left as it is
    tracker = start_tracker(cfg, run_name="borrowed")
    with tracked_run(tracker, owned=False):
        pass
    assert mlflow.tracking.MlflowClient(uri).get_run(tracker.run_id).info.status == "RUNNING"
    tracker.finish()
