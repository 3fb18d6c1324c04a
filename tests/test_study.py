"""`vitpipe study`: the claims' tables over seeds, on the tiny recipe (stages reused across studies)."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError
from stages import study

# One rank per stage, no MLflow: this tests the study's orchestration and tables, not DeepSpeed.
FAST = ["pretrain.ranks=1", "finetune.ranks=1", "tracking.enabled=false", "pretrain.steps=4", "finetune.steps=3"]


def test_resolution_verdict_needs_gain_above_spread_and_every_seed_gaining():
    rows = [{"pretrained": p, "finetuned": f} for p, f in ((0.90, 0.95), (0.91, 0.96), (0.92, 0.95))]
    holds, text = study.resolution_verdict(rows)
    assert holds is True and "mean gain +0.0433" in text and "sd) 0.0100" in text
    # The same mean gain but one seed losing: not a claim.
    rows = [{"pretrained": p, "finetuned": f} for p, f in ((0.90, 0.99), (0.91, 0.99), (0.96, 0.92))]
    assert study.resolution_verdict(rows)[0] is False
    # A gain smaller than the spread of the fine-tuned figures.
    rows = [{"pretrained": p, "finetuned": f} for p, f in ((0.90, 0.905), (0.90, 0.98), (0.90, 0.92))]
    holds, text = study.resolution_verdict(rows)
    assert holds is False and "does NOT hold" in text
    assert study.resolution_verdict(rows[:1])[0] is None


def test_seed_and_mode_lists_are_checked():
    assert study.parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("", "a,b", "1,1", "-1"):
        with pytest.raises(ConfigError, match="--seeds"):
            study.parse_seeds(bad)
    assert study.parse_modes("resample,reinit") == ["resample", "reinit"]
    with pytest.raises(ConfigError, match="--modes.*resample, nearest, zeros, reinit"):
        study.parse_modes("resample,pad")


def test_study_commands_on_the_tiny_recipe_reuse_stages(tmp_path, capsys):
    work = tmp_path / "study"
    args = ["configs/pipeline/tiny.yaml", *FAST, "--workdir", str(work), "--seeds", "0"]
    assert main(["study", "posembed", *args, "--modes", "resample,zeros"]) == 0
    out = capsys.readouterr().out
    res = json.loads((work / "study-posembed.json").read_text())
    assert [(r["seed"], r["mode"]) for r in res["rows"]] == [(0, "resample"), (0, "zeros")]
    assert res["val_images"] == 40 and (work / "study-posembed.txt").read_text().strip() in out
    by_mode = {r["mode"]: r for r in res["rows"]}
    # Both fine-tunes start from the one seed-0 pre-training; the model.json of each records its start.
    for mode in ("resample", "zeros"):
        meta = json.loads((work / "seed0" / f"finetune-{mode}" / "model.json").read_text())
        assert meta["init_from"] == str((work / "seed0" / "pretrain" / "model.safetensors").resolve())
        assert json.loads((work / "seed0" / f"finetune-{mode}" / "result.json").read_text())["stage"] == "finetune"
        assert 0.0 <= by_mode[mode]["finetuned"] <= 1.0
    assert "zeros" in out and "vs resample" in out

    # The resolution study in the same folder reuses the pre-training and the resample fine-tune.
    before = {p: p.stat().st_mtime_ns for p in work.glob("seed0/*/model.safetensors")}
    assert main(["study", "resolution", *args]) == 0
    out = capsys.readouterr().out
    assert "up to date" in out and {p: p.stat().st_mtime_ns for p in work.glob("seed0/*/model.safetensors")} == before
    res = json.loads((work / "study-resolution.json").read_text())
    (row,) = res["rows"]
    pre = json.loads((work / "seed0" / "pretrain" / "result.json").read_text())
    assert row["pretrained"] == pre["val_accuracy"] and row["finetuned"] == by_mode["resample"]["finetuned"]
    assert row["before"] == by_mode["resample"]["before"] and res["claim_holds"] is None
    assert "pre-trained @14px" in out and "fine-tuned @28px" in out and "run --seeds 0,1,2" in out


def test_bad_seeds_exit_non_zero_before_any_work(tmp_path, capsys):
    assert main(["study", "resolution", "configs/pipeline/tiny.yaml", "--workdir", str(tmp_path / "w"),
                 "--seeds", "0,0"]) == 2
    assert "--seeds" in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_run_summary_shows_claim_one_on_the_same_held_out_images():
    from stages.recipe import summary_table

    base = {"recipe": "demo", "workdir": "runs/demo", "prepare": {"val_samples": 500},
            "pretrain": {"image_size": 16, "val_accuracy": 0.94, "weights": "runs/demo/pretrain/model.safetensors"}}
    ft = {"image_size": 28, "val_accuracy_before": 0.402, "val_accuracy": 0.962, "pos_embed_init": "resample",
          "init_from": "runs/demo/pretrain/model.safetensors"}
    text = summary_table({**base, "finetune": ft})
    assert "val accuracy on the same 500 held-out images" in text
    assert "pre-trained @ 16px (its own resolution)" in text and "0.9400" in text
    assert "pre-trained @ 28px before fine-tuning (resampled pos-embed)" in text and "0.4020" in text
    assert "after fine-tuning @ 28px" in text and "+0.0220" in text
    # A reset head has no "before" figure; another start than this run's pre-training has no gain.
    text = summary_table({**base, "finetune": {**ft, "val_accuracy_before": None, "pos_embed_init": "reinit",
                                               "init_from": "/elsewhere/model.safetensors"}})
    assert "(reinit pos-embed)" in text and "n/a (new head)" in text and "minus" not in text
