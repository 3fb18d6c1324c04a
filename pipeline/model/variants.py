"""The one table of ViT sizes, and decoding of variant names such as ``vit-b16``.

Torch-free on purpose: the config loader uses it before any model is built.
"""

from __future__ import annotations

import re

# name -> (width D, depth L, MLP size, heads), as in the ViT paper (table 1) plus DeiT's Ti and S.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "ti": (192, 12, 768, 3),
    "s": (384, 12, 1536, 6),
    "b": (768, 12, 3072, 12),
    "l": (1024, 24, 4096, 16),
    "h": (1280, 32, 5120, 16),
}

# Patch sizes a variant name may carry: the paper's 32/16/14 and small ones for small images.
PATCH_SIZES = (32, 16, 14, 8, 7, 4, 2)

_NAME = re.compile(r"^vit-(?P<size>ti|s|b|l|h)(?P<patch>\d+)$")


def variant_names() -> list[str]:
    """Every name `decode_variant` accepts."""
    return [f"vit-{s}{p}" for s in SIZES for p in PATCH_SIZES]


def decode_variant(name: str) -> dict[str, int]:
    """``"vit-b16"`` -> ``{"width": 768, "depth": 12, "mlp_dim": 3072, "heads": 12, "patch_size": 16}``.

    Resolution is not part of the name: it is a training argument.
    """
    m = _NAME.match(name.strip().lower())
    if not m or int(m["patch"]) not in PATCH_SIZES:
        raise ValueError(
            f"unknown model variant {name!r}: expected vit-<size><patch> with size in "
            f"{'/'.join(SIZES)} and patch in {'/'.join(map(str, PATCH_SIZES))}, e.g. vit-b16 or vit-ti4"
        )
    width, depth, mlp, heads = SIZES[m["size"]]
    return {"width": width, "depth": depth, "mlp_dim": mlp, "heads": heads, "patch_size": int(m["patch"])}
