"""Resampling of learned 1-D position embeddings to another patch grid (one pure function)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MODES = ("bicubic", "bilinear", "nearest")
"""Interpolation modes of `resample_pos_embed`; nearest copies each new cell from the old cell whose
center is closest (half-pixel centers, like the other two with align_corners=False)."""
INITS = ("resample", "nearest", "zeros", "reinit")
"""How `transfer_pos_embed` starts the grid embeddings at a new grid (the paper's ablation)."""
REINIT_STD = 0.02
"""Std of the truncated normal a fresh position embedding gets (as VisionTransformer's own init)."""


def _as_grid(grid: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(grid, int):
        grid = (grid, grid)
    grid = tuple(int(g) for g in grid)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"{name}: expected a positive int or an (h, w) pair, got {grid!r}")
    return grid  # type: ignore[return-value]


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: int | tuple[int, int],
    old_grid: int | tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    mode: str = "bicubic",
) -> torch.Tensor:
    """Resample (1, prefix+H*W, D) position embeddings to `new_grid`, keeping the prefix tokens as they are."""
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not supported; use one of {', '.join(MODES)}")
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed: expected shape (1, tokens, D), got {tuple(pos_embed.shape)}")
    n_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        # No grid given: only a square grid can be inferred from the token count.
        side = math.isqrt(max(n_grid, 0))
        if n_grid < 1 or side * side != n_grid:
            raise ValueError(
                f"pos_embed: {n_grid} grid tokens (after {num_prefix_tokens} prefix) is not a square; "
                "pass old_grid=(h, w)"
            )
        old_grid = (side, side)
    old_hw = _as_grid(old_grid, "old_grid")
    new_hw = _as_grid(new_grid, "new_grid")
    if old_hw[0] * old_hw[1] != n_grid:
        raise ValueError(
            f"pos_embed: has {n_grid} grid tokens (+{num_prefix_tokens} prefix) but old_grid {old_hw} "
            f"needs {old_hw[0] * old_hw[1]}"
        )
    if old_hw == new_hw:
        return pos_embed  # identity: no interpolation round-off at all

    dim = pos_embed.shape[-1]
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    # Tokens are stored row-major (h, then w), as the patch conv's output is flattened.
    grid = grid.reshape(1, old_hw[0], old_hw[1], dim).permute(0, 3, 1, 2)  # (1, D, H, W)
    # float32: bicubic on bf16/fp16 is unsupported on some backends and loses precision.
    if mode == "nearest":
        # "nearest-exact" is torch's half-pixel-center nearest; plain "nearest" shifts the grid.
        grid = F.interpolate(grid.float(), size=new_hw, mode="nearest-exact")
    else:
        grid = F.interpolate(grid.float(), size=new_hw, mode=mode, align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], dim)  # (1, H'*W', D)
    return torch.cat([prefix, grid.to(pos_embed.dtype)], dim=1)


def transfer_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: int | tuple[int, int],
    old_grid: int | tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    init: str = "resample",
    mode: str = "bicubic",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Position embeddings for `new_grid` from pre-trained ones, started as `init` says.

    resample: 2-D interpolation with `mode` (the paper's recipe); nearest: nearest-neighbour
    resampling; zeros: grid embeddings all zero; reinit: fresh truncated-normal (std 0.02) grid
    embeddings drawn from `generator` (torch's global RNG when None). The prefix (class) token's
    embedding is kept in every case; zeros and reinit replace the grid even when it is unchanged,
    since they say the pre-trained positions are not transferred at all.
    """
    if init not in INITS:
        raise ValueError(f"init: {init!r} is not supported; use one of {', '.join(INITS)}")
    if init == "resample":
        return resample_pos_embed(pos_embed, new_grid, old_grid, num_prefix_tokens, mode)
    if init == "nearest":
        return resample_pos_embed(pos_embed, new_grid, old_grid, num_prefix_tokens, "nearest")
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] < num_prefix_tokens:
        raise ValueError(f"pos_embed: expected shape (1, tokens, D), got {tuple(pos_embed.shape)}")
    new_hw = _as_grid(new_grid, "new_grid")
    shape = (1, new_hw[0] * new_hw[1], pos_embed.shape[-1])
    grid = torch.zeros(shape, dtype=torch.float32)
    if init == "reinit":
        # Drawn in float32 on the CPU so a seed gives the same values on every device and dtype;
        # the same call as VisionTransformer's own init, so "reinit" is "as if trained from scratch".
        grid = torch.nn.init.trunc_normal_(grid, std=REINIT_STD, generator=generator)
    prefix = pos_embed[:, :num_prefix_tokens]
    return torch.cat([prefix, grid.to(device=pos_embed.device, dtype=pos_embed.dtype)], dim=1)
