"""Model package: ViT shapes, position-embedding resampling, head reset, param groups, weights pair."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import ModelConfig, from_dict
from pipeline.model.pos_embed import resample_pos_embed
from pipeline.model.variants import SIZES
from pipeline.model.vit import (
    MaxPoolSame,
    StdConv2d,
    VisionTransformer,
    build_model,
    flops_per_image,
    param_groups_for_weight_decay,
)
from pipeline.model.weights import (
    model_config_from_meta,
    model_from_pair,
    read_weights_pair,
    save_weights_pair,
    weights_meta,
)

TINY = ModelConfig(patch_size=4, width=32, depth=2, heads=2, mlp_dim=64, in_channels=1)


def tiny(image_size=16, num_classes=10, **kw) -> VisionTransformer:
    return build_model(dataclasses.replace(TINY, **kw), image_size, num_classes)


# --------------------------------------------------------------------------- the ViT


@pytest.mark.parametrize("size", list(SIZES))
def test_every_preset_gives_logits(size):
    width, depth, mlp, heads = SIZES[size]
    # The real width/heads/MLP of each preset; depth capped so the big ones stay fast.
    model = VisionTransformer(
        image_size=32, patch_size=16, width=width, depth=1 if size in ("l", "h") else 2,
        heads=heads, mlp_dim=mlp, num_classes=7,
    ).eval()
    assert model.grid == (2, 2) and model.pos_embed.shape == (1, 5, width)
    assert model.cls_token.shape == (1, 1, width)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_non_square_image_and_dynamic_batch():
    model = tiny(image_size=(8, 16)).eval()
    assert model.grid == (2, 4) and model.image_size == (8, 16) and model.pos_embed.shape == (1, 9, 32)
    with torch.no_grad():
        for b in (1, 3):
            assert model(torch.randn(b, 1, 8, 16)).shape == (b, 10)


# The tiny hybrid of these tests: small root, two one-block stages (total stride 2), 8-wide stem.
TINY_HYBRID = dict(hybrid=True, stem_root="small", stem_stages=[1, 1], stem_width=8)


@pytest.mark.parametrize(
    "stem, stride",
    [({"stem_stages": [1]}, 1), ({"stem_stages": [1, 1]}, 2), ({"stem_stages": [1, 2, 1]}, 4),
     ({"stem_root": "bit", "stem_stages": [1, 1]}, 8), ({"stem_stages": [1, 1, 1], "stem_stride": 2}, 2)],
)
def test_hybrid_grid_is_image_over_stem_stride(stem, stride):
    model = tiny(image_size=32, **{**TINY_HYBRID, **stem}).eval()
    g = 32 // stride
    assert model.stem.stride == stride and model.patch_size == stride
    assert model.grid == (g, g) and model.pos_embed.shape == (1, 1 + g * g, 32)
    assert model.patch_embed.kernel_size == (1, 1)  # "patches of size 1" on the stem's map
    with torch.no_grad():
        assert model.stem(torch.randn(2, 1, 32, 32)).shape == (2, model.stem.out_channels, g, g)
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_hybrid_stem_is_bit_resnet():
    """Widths, strides, norms and names of the paper's R50 stem (stages 3, 4, 9), built on meta tensors."""
    with torch.device("meta"):
        model = build_model(ModelConfig(variant=None, hybrid=True), 224, 1000)  # defaults = R50, stride 16
    stem = model.stem
    assert stem.root.conv.kernel_size == (7, 7) and stem.root.conv.stride == (2, 2)
    assert [len(s.blocks) for s in stem.stages] == [3, 4, 9] and stem.stride == 16 and model.grid == (14, 14)
    assert [s.blocks[0].conv3.out_channels for s in stem.stages] == [256, 512, 1024]
    assert [s.blocks[0].conv2.stride for s in stem.stages] == [(1, 1), (2, 2), (2, 2)]  # stride on the 3x3
    assert model.patch_embed.in_channels == 1024
    norms = [m for m in stem.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(n.num_groups == 32 for n in norms)
    convs = [m for m in stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(isinstance(c, StdConv2d) and c.bias is None for c in convs)
    # timm ResNetV2 names (under patch_embed.backbone.) map onto ours by prefix.
    keys = set(model.state_dict())
    assert {"stem.root.conv.weight", "stem.root.norm.weight", "stem.stages.0.blocks.0.downsample.conv.weight",
            "stem.stages.2.blocks.8.conv3.weight", "stem.stages.1.blocks.0.norm2.bias"} <= keys


def test_std_conv_standardizes_each_output_kernel_in_fp32():
    conv = StdConv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight.mul_(7.0).add_(3.0)
    w = conv.standardized_weight()
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.std(dim=(1, 2, 3), unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    # The conv uses the standardized kernel, so scaling the raw weight changes nothing.
    x = torch.randn(2, 3, 8, 8)
    y = conv(x)
    with torch.no_grad():
        conv.weight.mul_(10.0)
    torch.testing.assert_close(conv(x), y, atol=1e-3, rtol=1e-4)  # up to the eps added to the std
    half = StdConv2d(3, 4, 3).to(torch.bfloat16)
    ref = StdConv2d(3, 4, 3)
    ref.load_state_dict({"weight": half.weight.float()})
    torch.testing.assert_close(half.standardized_weight().float(), ref.standardized_weight(), atol=1e-2, rtol=0)


def test_same_padding_matches_the_original_for_stride_2():
    # Flax 'SAME' pads a stride-2 3x3 conv on an even input (0, 1), not torch's symmetric (1, 1).
    conv = StdConv2d(1, 1, 3, stride=2)
    x = torch.randn(1, 1, 8, 8)
    want = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.standardized_weight(), stride=2)
    torch.testing.assert_close(conv(x), want)
    assert conv(x).shape[-2:] == (4, 4) and StdConv2d(1, 1, 7, stride=2)(torch.randn(1, 1, 14, 14)).shape[-2:] == (7, 7)
    pool = MaxPoolSame()
    y = -torch.rand(1, 1, 4, 4)  # all negative: a zero-padded pool would return 0 at the far edge
    assert torch.equal(pool(y), F.max_pool2d(F.pad(y, (0, 1, 0, 1), value=float("-inf")), 3, 2))


def test_hybrid_rejects_bad_stride():
    with pytest.raises(ValueError, match="power of two"):
        tiny(image_size=24, **TINY_HYBRID, stem_stride=3)
    with pytest.raises(ValueError, match="between the 'bit' root's stride 4 and 8"):
        tiny(image_size=32, **{**TINY_HYBRID, "stem_root": "bit"}, stem_stride=16)


@pytest.mark.parametrize("shape", [(2, 1, 20, 16), (2, 3, 16, 16), (2, 1, 16, 20)])
def test_wrong_input_raises(shape):
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 16, 16\)"):
        tiny()(torch.randn(*shape))


def test_image_not_divisible_by_patch_raises():
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        tiny(image_size=18)


def test_drop_path_only_in_training():
    model = tiny(drop_path=0.5, dropout=0.1)
    assert [b.drop_path_rate for b in model.blocks] == [0.0, 0.5]  # linear up to the config value
    x = torch.randn(4, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(x), model(x))  # blocks and units dropped at random in training
    model(x).sum().backward()  # trains with stochastic depth on, and gradients reach the embeddings
    assert torch.isfinite(model.pos_embed.grad).all() and torch.count_nonzero(model.pos_embed.grad) > 0


def test_reset_head_is_zero_and_gives_zero_logits():
    model = tiny()
    model.reset_head(3)
    assert model.head.out_features == 3
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    with torch.no_grad():
        assert torch.equal(model(torch.randn(2, 1, 16, 16)), torch.zeros(2, 3))


def test_param_groups_skip_decay_on_pos_embed_cls_biases_norms():
    model = tiny(**TINY_HYBRID)
    decay, no_decay = param_groups_for_weight_decay(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"pos_embed", "cls_token", "head.bias", "norm.weight", "norm.bias", "blocks.0.norm1.weight"} <= nd
    assert {"stem.root.norm.weight", "stem.stages.1.blocks.0.norm3.weight"} <= nd  # GroupNorm scales
    assert "stem.stages.0.blocks.0.conv2.weight" in d
    assert {"patch_embed.weight", "head.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"} <= d
    assert not d & nd and len(d) + len(nd) == len(names)


def test_flops_match_hand_count():
    model = tiny(image_size=16)  # P=4 -> 16 patches, 17 tokens, D=32, M=64, 2 blocks, 10 classes
    n, t, d, m = 16, 17, 32, 64
    patch = 2 * n * d * (1 * 4 * 4)
    block = 2 * (t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * m)
    assert flops_per_image(model) == patch + 2 * block + 2 * d * 10


@pytest.mark.parametrize(
    "name, overrides, size",
    [("plain", {}, 16), ("tiny hybrid", TINY_HYBRID, 16),
     ("dilated hybrid", {**TINY_HYBRID, "stem_stages": [1, 1, 1], "stem_stride": 2}, 16),
     ("R50+ViT-B/16", {"variant": "vit-r50-b16"}, 224), ("R26+ViT-S/32", {"variant": "vit-r26-s32"}, 64)],
)
def test_flops_match_torch_flop_counter(name, overrides, size):
    """The analytic count equals PyTorch's FlopCounterMode (convs, matmuls, attention) on meta tensors."""
    if "variant" in overrides:
        cfg = from_dict(ModelConfig, {**overrides, "in_channels": 1})
    else:
        cfg = dataclasses.replace(TINY, **overrides)
    with torch.device("meta"):
        model = build_model(cfg, size, 10)
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 1, size, size))
    assert flops_per_image(model) == counter.get_total_flops(), name


# timm's published parameter counts (results/results-imagenet.csv, 1000 classes) for the same
# architectures; R50+ViT-L/16 has no timm twin: its count is R50+ViT-L/32's with stage 4 folded in.
@pytest.mark.parametrize(
    "variant, size, params",
    [("vit-r50-b16", 384, 98.95e6), ("vit-r26-s32", 224, 36.43e6), ("vit-r50-l32", 224, 328.99e6)],
)
def test_hybrid_parameter_counts_match_timm(variant, size, params):
    with torch.device("meta"):
        model = build_model(from_dict(ModelConfig, {"variant": variant}), size, 1000)
    assert abs(sum(p.numel() for p in model.parameters()) - params) < 0.005e6


def test_r50_l16_parameter_count_from_l32():
    with torch.device("meta"):
        l32 = build_model(from_dict(ModelConfig, {"variant": "vit-r50-l32"}), 224, 1000)
        l16 = build_model(from_dict(ModelConfig, {"variant": "vit-r50-l16"}), 224, 1000)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    stage4 = count(l32.stem.stages[3])
    unit3 = count(l16.stem.stages[2].blocks[-1])  # a non-projecting 1024-wide bottleneck
    assert unit3 == 2 * (1024 * 256 + 256 * 256 * 9 + 256 * 1024) // 2 + 2 * (256 + 256 + 1024)
    want = (count(l32) - stage4 + 3 * unit3
            - 2048 * 1024 + 1024 * 1024          # the 1x1 embedding now reads 1024 channels, not 2048
            + (14 * 14 - 7 * 7) * 1024)          # 196 tokens instead of 49
    assert count(l16) == want and abs(want - 316.48e6) < 0.01e6


# The model's import boundary (torch only, the whole folder): tests/test_import_graph.py


# --------------------------------------------------------------------------- pos_embed resampling


def _pe(grid_rows: list[list[float]], cls=(7.0, -7.0)) -> torch.Tensor:
    """(1, 1+H*W, 2): channel 0 holds the grid values, channel 1 their negatives."""
    flat = torch.tensor([v for row in grid_rows for v in row])
    tokens = torch.stack([flat, -flat], dim=-1)  # (H*W, 2)
    return torch.cat([torch.tensor([cls]), tokens])[None]


def test_identity_when_grid_unchanged():
    pe = torch.randn(1, 1 + 6, 8)
    out = resample_pos_embed(pe, (2, 3), old_grid=(2, 3))
    assert torch.equal(out, pe)
    assert torch.equal(resample_pos_embed(pe[:, :5], 2), pe[:, :5])  # inferred square grid


def test_bilinear_2x2_to_4x4_matches_hand_values():
    # align_corners=False, scale 1/2: output i samples input (i+0.5)/2-0.5 = -0.25, 0.25, 0.75, 1.25,
    # clamped to [0, 1] -> weights on the second input 0, .25, .75, 1.
    # Row 0 between 1 and 5: 1, 2, 4, 5.  Row 1 between 3 and 11: 3, 5, 9, 11.
    # Output rows 1 and 2 are .75/.25 and .25/.75 mixes of those two rows.
    expected = [
        [1.0, 2.0, 4.0, 5.0],
        [1.5, 2.75, 5.25, 6.5],
        [2.5, 4.25, 7.75, 9.5],
        [3.0, 5.0, 9.0, 11.0],
    ]
    out = resample_pos_embed(_pe([[1, 5], [3, 11]]), (4, 4), mode="bilinear")
    torch.testing.assert_close(out, _pe(expected), rtol=0, atol=1e-6)


def test_bilinear_1x2_to_2x4_non_square():
    # Height 1 -> 2: both output rows sample the single row. Width 2 -> 4 between 2 and 6: 2, 3, 5, 6.
    out = resample_pos_embed(_pe([[2, 6]]), (2, 4), old_grid=(1, 2), mode="bilinear")
    torch.testing.assert_close(out, _pe([[2, 3, 5, 6], [2, 3, 5, 6]]), rtol=0, atol=1e-6)


def test_class_token_untouched_and_non_square_shapes():
    pe = torch.randn(1, 1 + 2 * 3, 16)
    for mode in ("bicubic", "bilinear"):
        out = resample_pos_embed(pe, (5, 7), old_grid=(2, 3), mode=mode)
        assert out.shape == (1, 1 + 35, 16)
        assert torch.equal(out[:, :1], pe[:, :1])
    two_prefix = resample_pos_embed(pe, (4, 2), old_grid=(1, 5), num_prefix_tokens=2)
    assert two_prefix.shape == (1, 2 + 8, 16) and torch.equal(two_prefix[:, :2], pe[:, :2])


def test_bicubic_constant_grid_stays_constant():
    pe = torch.cat([torch.zeros(1, 1, 4), torch.full((1, 9, 4), 0.3)], dim=1)
    out = resample_pos_embed(pe, (6, 6))
    torch.testing.assert_close(out[:, 1:], torch.full((1, 36, 4), 0.3))


def test_dtype_is_restored():
    pe = torch.randn(1, 1 + 4, 8, dtype=torch.bfloat16)
    out = resample_pos_embed(pe, (3, 3))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 10, 8)
    assert torch.equal(out[:, 0], pe[:, 0])


def test_resample_errors():
    pe = torch.randn(1, 1 + 6, 4)
    with pytest.raises(ValueError, match="not a square"):
        resample_pos_embed(pe, 4)
    with pytest.raises(ValueError, match=r"needs 4"):
        resample_pos_embed(pe, 4, old_grid=(2, 2))
    with pytest.raises(ValueError, match="mode"):
        resample_pos_embed(pe, 4, old_grid=(2, 3), mode="area")


# --------------------------------------------------------------------------- weights pair


def _save(tmp_path, cfg=TINY, image_size=16, num_classes=10, class_names=None, **extra):
    model = build_model(cfg, image_size, num_classes)
    meta = weights_meta(cfg, image_size, num_classes, class_names, **extra)
    return model, save_weights_pair(tmp_path / "pair", model.state_dict(), meta)


def test_hybrid_pair_round_trip(tmp_path):
    cfg = dataclasses.replace(TINY, **TINY_HYBRID)
    model, path = _save(tmp_path, cfg=cfg)
    loaded, meta = model_from_pair(path)
    assert model_config_from_meta(meta) == cfg and meta["architecture"]["stem_stages"] == [1, 1]
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_pair_round_trip(tmp_path):
    names = [str(i) for i in range(10)]
    model, path = _save(tmp_path, class_names=names, stage="pretrain", metrics={"val_acc": 0.5})
    assert path.name == "model.safetensors" and (path.parent / "model.json").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left
    for where in (path.parent, path, path.with_suffix(".json")):
        sd, meta = read_weights_pair(where)
        assert sd.keys() == model.state_dict().keys()
        for k, v in model.state_dict().items():
            assert sd[k].dtype == torch.float32 and torch.equal(sd[k], v)
        assert meta["format"] == "vitpipe.weights/1" and meta["image_size"] == [16, 16]
        assert meta["class_names"] == names and meta["stage"] == "pretrain" and meta["metrics"] == {"val_acc": 0.5}
        assert meta["pos_embed_interp"] == "bicubic" and meta["mean"] == [0.5, 0.5, 0.5]
        assert model_config_from_meta(meta) == TINY

    loaded, meta = model_from_pair(path)
    assert meta["head_reset"] is False
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_bf16_state_dict_saved_as_fp32(tmp_path):
    model = build_model(TINY, 16, 10).to(torch.bfloat16)
    path = save_weights_pair(tmp_path, model.state_dict(), weights_meta(TINY, 16, 10))
    sd, _ = read_weights_pair(path)
    assert all(v.dtype == torch.float32 for v in sd.values())


@pytest.mark.parametrize("hybrid", [False, True], ids=["plain", "hybrid"])
def test_model_from_pair_at_higher_resolution_resamples_pos_embed(tmp_path, hybrid):
    cfg = dataclasses.replace(TINY, pos_embed_interp="bilinear", **(TINY_HYBRID if hybrid else {}))
    model, path = _save(tmp_path, cfg=cfg, image_size=16)
    big, meta = model_from_pair(path, image_size=24)
    old, new = ((8, 8), (12, 12)) if hybrid else ((4, 4), (6, 6))  # stem stride 2 vs patch 4
    assert big.grid == new and meta["image_size"] == [24, 24] and meta["source_image_size"] == [16, 16]
    want = resample_pos_embed(model.pos_embed.detach(), new, old, mode="bilinear")
    assert torch.equal(big.pos_embed.detach(), want)
    assert torch.equal(big.head.weight, model.head.weight)  # same classes: head kept
    # Everything but pos_embed carries over unchanged: the stem is convolutional, size-free.
    small_sd, big_sd = model.state_dict(), big.state_dict()
    assert all(torch.equal(big_sd[k], v) for k, v in small_sd.items() if k != "pos_embed")
    with torch.no_grad():
        assert torch.isfinite(big.eval()(torch.randn(2, 1, 24, 24))).all()


def test_model_from_pair_resets_head_when_classes_differ(tmp_path):
    _, path = _save(tmp_path, class_names=[str(i) for i in range(10)])
    model, meta = model_from_pair(path, num_classes=3)
    assert model.head.out_features == 3 and torch.count_nonzero(model.head.weight) == 0
    assert meta["head_reset"] and meta["num_classes"] == 3 and meta["class_names"] is None
    # Same count but different labels: also a new task.
    model, meta = model_from_pair(path, class_names=list("abcdefghij"))
    assert meta["head_reset"] and torch.count_nonzero(model.head.weight) == 0
    model, meta = model_from_pair(path, class_names=[str(i) for i in range(10)])
    assert not meta["head_reset"] and torch.count_nonzero(model.head.weight) > 0


@pytest.mark.parametrize("change", [{"width": 48}, {"depth": 1}])
def test_checkpoint_from_another_architecture_names_file(tmp_path, change):
    other = build_model(dataclasses.replace(TINY, **change), 16, 10)
    path = save_weights_pair(tmp_path, other.state_dict(), weights_meta(TINY, 16, 10))  # meta lies
    with pytest.raises(ValueError, match="model.safetensors.*do not match") as e:
        model_from_pair(path)
    assert "checkpoint" in str(e.value) and "model" in str(e.value)


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        read_weights_pair(tmp_path)
    _, path = _save(tmp_path)
    meta_path = path.with_suffix(".json")
    meta_path.write_text("{not json")
    with pytest.raises(ValueError, match=r"model\.json: not valid JSON"):
        read_weights_pair(path)
    meta_path.write_text(json.dumps({"format": "something/else"}))
    with pytest.raises(ValueError, match=r"model\.json: not a vitpipe weights pair"):
        read_weights_pair(path.parent)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        read_weights_pair(meta_path)


def test_save_requires_core_meta(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        save_weights_pair(tmp_path, {}, {"stage": "pretrain"})
    assert not list(tmp_path.iterdir())
