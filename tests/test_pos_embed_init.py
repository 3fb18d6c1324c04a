"""Position-embedding starts at a new grid (finetune.pos_embed_init): nearest, zeros, reinit, resample."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, ModelConfig, load_config
from pipeline.model.pos_embed import REINIT_STD, resample_pos_embed, transfer_pos_embed
from pipeline.model.vit import build_model
from pipeline.model.weights import model_from_pair, save_weights_pair, weights_meta

TINY = ModelConfig(patch_size=4, width=32, depth=2, heads=2, mlp_dim=64, in_channels=1)


def _pe(grid_rows: list[list[float]], cls=(7.0, -7.0)) -> torch.Tensor:
    """(1, 1+H*W, 2): channel 0 holds the grid values, channel 1 their negatives."""
    flat = torch.tensor([v for row in grid_rows for v in row])
    return torch.cat([torch.tensor([cls]), torch.stack([flat, -flat], dim=-1)])[None]


def test_nearest_doubles_each_cell():
    out = transfer_pos_embed(_pe([[1, 2, 3], [4, 5, 6]]), (4, 6), old_grid=(2, 3), init="nearest")
    want = [[1, 1, 2, 2, 3, 3], [1, 1, 2, 2, 3, 3], [4, 4, 5, 5, 6, 6], [4, 4, 5, 5, 6, 6]]
    assert torch.equal(out, _pe(want))


def test_nearest_non_integer_ratio_uses_half_pixel_centres():
    # Output cell i takes input floor((i + 0.5) * old / new): rows 2 -> 3 take 0, 1, 1 ((0.33, 1, 1.67));
    # columns 3 -> 4 take 0, 1, 1, 2 ((0.375, 1.125, 1.875, 2.625)).
    out = resample_pos_embed(_pe([[1, 2, 3], [4, 5, 6]]), (3, 4), old_grid=(2, 3), mode="nearest")
    want = [[1, 2, 2, 3], [4, 5, 5, 6], [4, 5, 5, 6]]
    assert torch.equal(out, _pe(want))


def test_zeros_keeps_the_class_token_and_zeroes_the_grid():
    pe = torch.randn(1, 1 + 4, 8)
    out = transfer_pos_embed(pe, (3, 3), init="zeros")
    assert out.shape == (1, 10, 8) and torch.equal(out[:, :1], pe[:, :1])
    assert torch.count_nonzero(out[:, 1:]) == 0


def test_reinit_draws_truncated_normal_std_002_and_keeps_the_class_token():
    pe = torch.randn(1, 1 + 4, 64)
    out = transfer_pos_embed(pe, (16, 16), init="reinit", generator=torch.Generator().manual_seed(0))
    grid = out[0, 1:]
    assert out.shape == (1, 1 + 256, 64) and torch.equal(out[:, :1], pe[:, :1])
    assert abs(grid.mean().item()) < 1e-3 and abs(grid.std().item() - REINIT_STD) < 1e-3
    assert grid.abs().max().item() <= 2.0  # trunc_normal_'s bounds, as VisionTransformer's own init
    again = transfer_pos_embed(pe, (16, 16), init="reinit", generator=torch.Generator().manual_seed(0))
    other = transfer_pos_embed(pe, (16, 16), init="reinit", generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_resample_is_the_recorded_interpolation_and_unknown_init_is_an_error():
    pe = torch.randn(1, 1 + 4, 8)
    assert torch.equal(transfer_pos_embed(pe, (3, 3), init="resample", mode="bilinear"),
                       resample_pos_embed(pe, (3, 3), mode="bilinear"))
    with pytest.raises(ValueError, match="init: 'pad'.*resample, nearest, zeros, reinit"):
        transfer_pos_embed(pe, (3, 3), init="pad")


def _pair(tmp_path):
    model = build_model(TINY, 16, 10)
    path = save_weights_pair(tmp_path / "pair", model.state_dict(), weights_meta(TINY, 16, 10, [str(i) for i in range(10)]))
    return model, path


@pytest.mark.parametrize("init", ["nearest", "zeros", "reinit"])
def test_model_from_pair_applies_pos_embed_init_and_nothing_else(tmp_path, init):
    model, path = _pair(tmp_path)
    torch.manual_seed(3)
    big, meta = model_from_pair(path, image_size=32, pos_embed_init=init)
    assert meta["pos_embed_init"] == init and big.grid == (8, 8)
    pe, old = big.pos_embed.detach(), model.pos_embed.detach()
    assert torch.equal(pe[:, :1], old[:, :1])  # the class token's embedding is kept
    if init == "nearest":
        # Grid 4 -> 8: every old cell becomes a 2x2 block.
        want = old[0, 1:].reshape(4, 4, -1).repeat_interleave(2, 0).repeat_interleave(2, 1).reshape(64, -1)
        assert torch.equal(pe[0, 1:], want)
    elif init == "zeros":
        assert torch.count_nonzero(pe[:, 1:]) == 0
    else:
        assert abs(pe[0, 1:].std().item() - REINIT_STD) < 2e-3
        torch.manual_seed(3)
        assert torch.equal(model_from_pair(path, image_size=32, pos_embed_init=init)[0].pos_embed, big.pos_embed)
    for k, v in model.state_dict().items():  # every other tensor is the pre-trained one
        if k != "pos_embed":
            assert torch.equal(big.state_dict()[k], v), k


def test_reinit_applies_at_the_stored_grid_too_and_bad_mode_names_itself(tmp_path):
    model, path = _pair(tmp_path)
    same, _ = model_from_pair(path, pos_embed_init="reinit")
    assert not torch.equal(same.pos_embed[:, 1:], model.pos_embed[:, 1:])
    kept, _ = model_from_pair(path, pos_embed_init="nearest")  # a resampler: nothing to do at the same grid
    assert torch.equal(kept.pos_embed, model.pos_embed)
    with pytest.raises(ValueError, match="pos_embed_init: 'bogus'"):
        model_from_pair(path, image_size=32, pos_embed_init="bogus")


def test_config_field_is_validated():
    assert load_config("configs/pipeline/tiny.yaml", ["finetune.pos_embed_init=reinit"]).finetune.pos_embed_init == "reinit"
    with pytest.raises(ConfigError, match="finetune.pos_embed_init: 'pad' is not allowed"):
        load_config("configs/pipeline/tiny.yaml", ["finetune.pos_embed_init=pad"])
    with pytest.raises(ConfigError, match="pretrain.pos_embed_init.*set finetune.pos_embed_init"):
        load_config("configs/pipeline/tiny.yaml", ["pretrain.pos_embed_init=zeros"])
