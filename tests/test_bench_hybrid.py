"""`vitpipe bench hybrid`: the hybrid and its plain twin pre-trained by the same recipe, side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.model.vit import build_model, flops_per_image
from stages.compare_hybrid import compare, hybrid_table, plain_twin

ROOT = Path(__file__).resolve().parents[1]
TINY_HYBRID = ROOT / "configs" / "pipeline" / "tiny-hybrid.yaml"


def test_plain_recipe_is_refused_before_any_work(tmp_path, capsys):
    assert main(["bench", "hybrid", str(ROOT / "configs" / "pipeline" / "tiny.yaml"), "--workdir", str(tmp_path)]) == 2
    assert "bench hybrid compares a hybrid with its plain twin" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing prepared or trained


def test_twin_keeps_the_transformer_and_drops_the_stem():
    cfg = load_config(ROOT / "configs" / "pipeline" / "demo-hybrid.yaml")
    twin = plain_twin(cfg.model)
    assert not twin.hybrid and twin.patch_size == cfg.model.effective_patch == 2
    assert (twin.width, twin.depth, twin.heads, twin.mlp_dim) == (cfg.model.width, cfg.model.depth,
                                                                   cfg.model.heads, cfg.model.mlp_dim)
    # The shipped comparison is at matched compute: the stem adds under 20% FLOPs per image.
    hybrid, plain = (build_model(m, cfg.pretrain.image_size, 10) for m in (cfg.model, twin))
    assert hybrid.grid == plain.grid == (7, 7)
    assert 1.0 < flops_per_image(hybrid) / flops_per_image(plain) < 1.2


@pytest.mark.slow
def test_compare_trains_both_and_reports_their_figures(tmp_path):
    cfg = load_config(TINY_HYBRID, ["pretrain.ranks=1", "pretrain.steps=3", "pretrain.checkpoint_every=0",
                                    "data.limit=200"])
    result = compare(cfg, tmp_path, seeds=[0])
    models = result["models"]
    assert json.loads((tmp_path / "compare.json").read_text()) == json.loads(json.dumps(result))
    for name, hybrid in (("plain", False), ("hybrid", True)):
        row = models[name]
        stored = json.loads((tmp_path / name / "seed0" / "model.json").read_text())
        assert stored["architecture"]["hybrid"] is hybrid and stored["steps"] == 3
        net = build_model(plain_twin(cfg.model) if not hybrid else cfg.model, 14, 10)
        assert row["flops_per_image"] == flops_per_image(net) and row["tokens"] == 49
        assert row["params"] == sum(p.numel() for p in net.parameters())
        assert len(row["val_accuracy"]) == 1 and 0.0 <= row["val_accuracy"][0] <= 1.0
        assert row["images_per_s"][0] > 0
    table = hybrid_table(result)
    ratio = models["hybrid"]["flops_per_image"] / models["plain"]["flops_per_image"]
    assert f" {ratio:.2f}x " in table and "hybrid ahead on" in table  # the FLOPs-vs-plain column
    # A second call finds both stage folders complete and trains nothing.
    again = compare(cfg, tmp_path, seeds=[0])
    assert again["models"]["hybrid"]["val_accuracy"] == models["hybrid"]["val_accuracy"]


# --------------------------------------------------------------- the demo's hybrid stage (claim 3)

DEMO = ROOT / "configs" / "pipeline" / "demo.yaml"


def test_the_demo_runs_the_hybrid_comparison_as_its_last_stage_when_asked():
    from pipeline.config import validate_hybrid_stage
    from pipeline.run_layout import DEFAULT_STAGES

    # opt-in: the five stages fit the demo's 10-minute budget, the comparison adds 4.4 min
    assert tuple(load_config(DEMO).stages) == DEFAULT_STAGES
    cfg = load_config(DEMO, [f"stages=[{','.join(DEFAULT_STAGES)},hybrid]"])  # README's opt-in command
    assert cfg.stages[-1] == "hybrid"
    other = validate_hybrid_stage(cfg.hybrid)
    # The shipped comparison, at the demo's reduced budget, with the BiT stem (small root).
    assert other.name == "demo-hybrid" and other.model.hybrid and other.model.stem_root == "small"
    assert other.pretrain.steps == 300 and "hybrid" not in other.stages
    # Its data settings are the demo's, so the stage trains on the run's own dataset.
    assert other.data == cfg.data
    # The recipes that inherit demo.yaml do not inherit the comparison.
    assert "hybrid" not in load_config(TINY_HYBRID).stages and "hybrid" not in other.stages


def test_hybrid_recipe_path_survives_a_written_config(tmp_path, monkeypatch):
    import yaml

    from pipeline.config import to_dict

    monkeypatch.chdir(ROOT)  # relative to the recipe file, as `make demo` names it
    cfg = load_config("configs/pipeline/demo.yaml")
    assert cfg.hybrid.recipe == str(ROOT / "configs" / "pipeline" / "demo-hybrid.yaml")
    written = tmp_path / "elsewhere" / "config.yaml"  # as `vitpipe run` writes <run>/config.yaml
    written.parent.mkdir()
    written.write_text(yaml.safe_dump(to_dict(cfg)))
    monkeypatch.chdir(tmp_path)
    assert load_config(written).hybrid == cfg.hybrid
    # On the command line, relative to the current directory.
    (tmp_path / "h.yaml").write_text((ROOT / "configs" / "pipeline" / "demo-hybrid.yaml").read_text()
                                     .replace("base: demo.yaml", f"base: {ROOT / 'configs' / 'pipeline' / 'demo.yaml'}"))
    assert load_config(written, ["hybrid.recipe=h.yaml"]).hybrid.recipe == str(tmp_path / "h.yaml")


@pytest.mark.parametrize("overrides, message", [
    (["hybrid.recipe=null"], "hybrid.recipe: the hybrid stage needs a hybrid recipe"),
    (["hybrid.recipe=/nonexistent/h.yaml"], "/nonexistent/h.yaml: config file not found"),
    ([f"hybrid.recipe={ROOT / 'configs' / 'pipeline' / 'tiny.yaml'}"],
     "its model is plain"),
    (["hybrid.recipe=SELF"], "lists the hybrid stage itself"),
    (["hybrid.seeds=[0, 0]"], "hybrid.seeds: need distinct non-negative integers"),
    (["hybrid.overrides=[pretrain.steps=0]"], "pretrain.steps: must be >= 1"),
])
def test_bad_hybrid_stage_is_refused_before_any_work(overrides, message, tmp_path, capsys):
    from pipeline.run_layout import DEFAULT_STAGES

    with_hybrid = f"stages=[{','.join(DEFAULT_STAGES)},hybrid]"  # the demo's opt-in (README)
    if overrides == ["hybrid.recipe=SELF"]:  # a comparison recipe that would run the comparison again
        (tmp_path / "self.yaml").write_text(f"base: {DEMO}\n{with_hybrid.replace('=', ': ', 1)}\n")
        overrides = [f"hybrid.recipe={tmp_path / 'self.yaml'}"]
    assert main(["run", str(DEMO), with_hybrid, *overrides, "--workdir", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_run_with_the_hybrid_stage_prints_the_comparison_in_its_summary(tmp_path, capsys):
    work = tmp_path / "run"
    hybrid = ["pretrain.ranks=1", "pretrain.steps=3", "pretrain.checkpoint_every=0"]
    assert main(["run", str(ROOT / "configs" / "pipeline" / "tiny.yaml"), "stages=[prepare, hybrid]",
                 f"hybrid.recipe={TINY_HYBRID}", f"hybrid.overrides=[{', '.join(hybrid)}]",
                 "tracking.enabled=false", "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((work / "summary.json").read_text())
    compared = json.loads((work / "hybrid" / "compare.json").read_text())
    assert summary["hybrid"]["models"] == compared["models"]
    assert compared["recipe"] == "tiny-hybrid" and compared["overrides"] == hybrid and compared["steps"] == 3
    # Same data settings: both models trained on the run's own shards, nothing prepared twice.
    assert not (work / "hybrid" / "prepare").exists()
    for name in ("plain", "hybrid"):
        meta = json.loads((work / "hybrid" / name / "seed0" / "model.json").read_text())
        assert meta["architecture"]["hybrid"] is (name == "hybrid")
    table = hybrid_table(compared)
    assert table in out and table in (work / "summary.txt").read_text()
    assert "hybrid - plain val accuracy" in table
