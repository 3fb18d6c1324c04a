"""Resampling of learned 1-D position embeddings to another patch grid (one pure function)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MODES = ("bicubic", "bilinear")


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
    grid = F.interpolate(grid.float(), size=new_hw, mode=mode, align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], dim)  # (1, H'*W', D)
    return torch.cat([prefix, grid.to(pos_embed.dtype)], dim=1)
