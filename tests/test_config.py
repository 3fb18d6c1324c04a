"""Config loading and validation: every rejection names the key and says what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, PipelineConfig, from_dict, load_config, to_dict, validate
from pipeline.model.variants import SIZES, decode_variant
from pipeline.train.deepspeed_config import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "pipeline" / "demo.yaml"
ALL_YAML = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_loads_and_validates(path):
    # Fragments (model presets, ZeRO settings) are validated on top of the defaults.
    cfg = load_config(path)
    # what is logged and saved (to_dict) reads back as the same config, and still validates
    again = from_dict(PipelineConfig, to_dict(cfg))
    assert again == cfg
    validate(again)


def test_recipes_document_how_to_run_them():
    for path in (ROOT / "configs" / "pipeline").glob("*.yaml"):
        head = path.read_text().splitlines()[:12]
        assert any("run:" in line for line in head), f"{path} should start with a comment giving its command"


def test_demo_recipe_resolves_base_files_and_overrides():
    cfg = load_config(DEMO, ["pretrain.steps=50", "model.depth=2", "finetune.lr=3e-3", "benchmark.batch_sizes=[1, 4]"])
    assert cfg.name == "demo"
    assert cfg.pretrain.steps == 50 and cfg.model.depth == 2 and cfg.finetune.lr == pytest.approx(3e-3)
    assert cfg.benchmark.batch_sizes == [1, 4]
    # patch 4 from the vit-ti4 base, a narrower width set in the recipe; from zero2.yaml: stage 2
    assert (cfg.model.width, cfg.model.heads, cfg.model.mlp_dim, cfg.model.patch_size) == (128, 4, 512, 4)
    assert cfg.pretrain.zero_stage == 2 and cfg.finetune.zero_stage == 2
    # the demo pre-trains at a lower resolution than it fine-tunes, on 28 px images
    assert cfg.pretrain.image_size < cfg.finetune.image_size


def test_variant_fills_only_unset_fields():
    cfg = load_config(None, ["model.variant=vit-b16", "model.depth=3"])
    assert (cfg.model.width, cfg.model.depth, cfg.model.mlp_dim, cfg.model.heads) == (768, 3, 3072, 12)
    assert decode_variant("vit-h14") == {"width": 1280, "depth": 32, "mlp_dim": 5120, "heads": 16, "patch_size": 14}
    assert set(SIZES) == {"ti", "s", "b", "l", "h"}


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(DEMO)
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert to_dict(load_config(path)) == to_dict(cfg)


@pytest.mark.parametrize(
    "overrides, key, hint",
    [
        (["pretrain.stepz=5"], "pretrain.stepz", "did you mean 'steps'"),
        (["modle.depth=2"], "modle", "did you mean 'model'"),
        (["model.widht=64"], "model.widht", "did you mean 'width'"),
        # names from timm / Hugging Face / DeepSpeed lead to ours (spelling alone says 'image_size')
        (["pretrain.batch_size=64"], "pretrain.batch_size", "vitpipe calls it 'global_batch' or 'micro_batch'"),
        (["model.hidden_size=64"], "model.hidden_size", "vitpipe calls it 'width'"),
        (["model.num_attention_heads=2"], "model.num_attention_heads", "vitpipe calls it 'heads'"),
        (["finetune.epochs=3"], "finetune.epochs", "vitpipe calls it 'steps' (counted in optimizer steps"),
        (["finetune.learning_rate=0.1"], "finetune.learning_rate", "vitpipe calls it 'lr'"),
        (["pretrain.gradient_accumulation_steps=2"], "pretrain.gradient_accumulation_steps", "calls it 'grad_accum'"),
        (["pretrain.steps=ten"], "pretrain.steps", "expected an integer"),
        (["pretrain.lr=fast"], "pretrain.lr", "expected a number"),
        (["pretrain.lr=.nan"], "pretrain.lr", "expected a finite number, got nan"),
        (["pretrain.lr=.inf"], "pretrain.lr", "expected a finite number, got inf"),
        (["finetune.weight_decay=-.inf"], "finetune.weight_decay", "expected a finite number, got -inf"),
        (["pretrain.augment.crop_scale=[0.5, .nan]"], "pretrain.augment.crop_scale[1]", "expected a finite number"),
        (["tracking.system_metrics_interval=.inf"], "tracking.system_metrics_interval", "expected a finite number"),
        (["model.hybrid=3"], "model.hybrid", "expected true or false"),
        (["data.source=imagenet"], "data.source", "'mnist5k', 'digits', 'folder'"),
        (["pretrain.image_size=15"], "pretrain.image_size", "not divisible by the patch size 4"),
        (["finetune.image_size=27"], "finetune.image_size", "use a multiple of 4"),
        (["model.width=100", "model.heads=3"], "model.heads", "width 100 is not divisible by heads 3"),
        (["pretrain.zero_stage=4"], "pretrain.zero_stage", "must be 0, 1, 2 or 3"),
        (["finetune.zero_stage=-1"], "finetune.zero_stage", "must be 0, 1, 2 or 3"),
        (["pretrain.global_batch=100"], "pretrain.global_batch", "set global_batch to 64"),
        (["model.variant=vit-x16"], "model.variant", "unknown model variant"),
        (["stages=[prepare, pretrian]"], "stages", "did you mean 'pretrain'"),
        (["data.source=folder"], "data.root", "needs data.root"),
        (["model.hybrid=true", "model.stem_stride=3"], "model.stem_stride", "power of two"),
        (["pretrain"], "override 'pretrain'", "expected key=value"),
        (["pretrain.zero_stage=0", "pretrain.offload_optimizer=cpu"], "pretrain.offload_optimizer", "zero_stage >= 1"),
        (["pretrain.offload_params=cpu"], "pretrain.offload_params", "needs zero_stage 3"),
        (["pretrain.zero_stage=3", "pretrain.offload_params=nvme"], "pretrain.nvme_path", "local NVMe folder"),
        (["pretrain.sampling=sometimes"], "pretrain.sampling", "'exact', 'resampled', 'auto'"),
        (["pretrain.augment.crop_scale=[0.5, 2.0]"], "pretrain.augment.crop_scale", "0 < min <= max <= 1"),
    ],
)
def test_bad_config_is_rejected_with_key_and_fix(overrides, key, hint):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, overrides)
    msg = str(err.value)
    assert msg.startswith(key), msg
    assert hint in msg, msg


def test_hybrid_image_size_is_checked_against_stem_stride():
    small = ["model.hybrid=true", "model.stem_root=small", "model.stem_stages=[1, 1, 1]"]
    cfg = load_config(DEMO, small)  # stride 4: the demo's 16 and 24 px are multiples of it
    assert cfg.model.effective_patch == 4
    with pytest.raises(ConfigError, match="finetune.image_size: 24 is not divisible by the hybrid stem's stride 16"):
        load_config(DEMO, ["model.hybrid=true", "model.stem_root=small", "model.stem_stages=[1, 1, 1, 1, 1]"])
    # The default stem is the paper's R50 (stride 16): too coarse for 24 px digits, and said so.
    with pytest.raises(ConfigError, match="24 is not divisible by the hybrid stem's stride 16"):
        load_config(DEMO, ["model.hybrid=true"])


@pytest.mark.parametrize(
    "overrides, hint",
    [(["model.stem_stages=[]"], "need one or more stages"),
     (["model.stem_stages=[3, 0]"], "need one or more stages"),
     (["model.stem_stride=32"], "not reachable"),          # [3, 4, 9] after the bit root: 4, 8 or 16
     (["model.stem_stride=2"], "use stem_root=small"),
     (["model.stem_root=tiny"], "'bit', 'small'"),
     (["model.stem_width=0"], "must be >= 1")],
)
def test_bad_stem_is_rejected(overrides, hint):
    with pytest.raises(ConfigError, match=r"model\.stem_") as err:
        load_config(None, ["model.hybrid=true", *overrides])
    assert hint in str(err.value)


def test_hybrid_variants_decode_from_the_one_table():
    assert decode_variant("vit-r50-b16") == {"width": 768, "depth": 12, "mlp_dim": 3072, "heads": 12, "hybrid": True,
                                             "stem_root": "bit", "stem_stages": [3, 4, 9], "stem_width": 64}
    assert decode_variant("vit-r50-l16")["stem_stages"] == [3, 4, 9] and decode_variant("vit-r50-l16")["width"] == 1024
    assert decode_variant("vit-r50-l32")["stem_stages"] == [3, 4, 6, 3]
    assert decode_variant("vit-r26-s32")["stem_stages"] == [2, 2, 2, 2]
    assert decode_variant("vit-r8s-ti2")["stem_root"] == "small"
    for name, patch in (("vit-r50-b16", 16), ("vit-r26-s32", 32), ("vit-r8s-ti2", 2), ("vit-r26-s16", 16)):
        assert load_config(None, [f"model.variant={name}"]).model.effective_patch == patch, name
    for bad, hint in (("vit-r51-b16", "ResNet depth 51"), ("vit-r50-b64", "reach at most 32"),
                      ("vit-r50-b2", "power of two >= 4")):
        with pytest.raises(ConfigError, match=hint):
            load_config(None, [f"model.variant={bad}"])


def test_missing_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="circular base"):
        load_config(loop)


def test_deepspeed_config_is_derived_and_checked():
    cfg = load_config(DEMO, ["pretrain.grad_accum=2", "pretrain.zero_stage=3"])
    ds = deepspeed_config(cfg.pretrain, world_size=2, precision="fp32")
    assert ds["train_batch_size"] == 32 * 2 * 2
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 1.0
    assert "bf16" not in ds and "fp16" not in ds
    assert deepspeed_config(cfg.pretrain, 2, "bf16")["bf16"] == {"enabled": True}
    off = load_config(DEMO, ["pretrain.zero_stage=3", "pretrain.offload_optimizer=cpu", "pretrain.offload_params=nvme",
                             "pretrain.nvme_path=/nvme"])
    zero = deepspeed_config(off.pretrain, 2, "bf16")["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/nvme"}
    # a global batch set for 2 ranks is rejected when the job runs on 4
    cfg = load_config(DEMO, ["pretrain.global_batch=64"])
    with pytest.raises(ConfigError, match="global_batch: 64 != micro_batch 32 x grad_accum 1 x ranks 4 = 128"):
        deepspeed_config(cfg.pretrain, world_size=4, precision="fp32")
