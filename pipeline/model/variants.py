"""The one table of ViT sizes and ResNet stems, and decoding of variant names such as ``vit-b16``.

Torch-free on purpose: the config loader uses it before any model is built.

Plain ViT:  ``vit-<size><patch>``, e.g. ``vit-b16``.
Hybrid:     ``vit-r<resnet depth>[s]-<size><stride>``, e.g. ``vit-r50-b16`` (the paper's R50+ViT-B/16):
a BiT ResNet stem whose feature map is cut into 1x1 "patches", so the stem's total stride plays the
role of the patch size. A trailing ``s`` on the ResNet depth (``vit-r8s-ti2``) selects the small-image
root (3x3 stride-1 conv, no max pool) instead of the 7x7 stride-2 conv + max pool meant for
ImageNet-size inputs.
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

# ResNet depth -> bottleneck blocks per stage at the full four-stage (or two-stage) layout.
# depth = 3 x blocks + 2 (root conv and head), as ResNet names count layers. 26/50/101 are BiT's
# and timm's (R26+ViT-S/32, R50+ViT-B/16, R50+ViT-L/32); 8 and 14 are small stems for small images.
RESNET_BLOCKS: dict[int, tuple[int, ...]] = {
    8: (1, 1),
    14: (2, 2),
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}

# Root type -> its stride: "bit" is the 7x7 stride-2 conv + 3x3 stride-2 max pool of BiT/ResNet
# for ImageNet-size inputs; "small" is one 3x3 stride-1 conv for images of tens of pixels.
ROOT_STRIDES: dict[str, int] = {"bit": 4, "small": 1}


_NAME = re.compile(r"^vit-(?P<size>ti|s|b|l|h)(?P<patch>\d+)$")
_HYBRID_NAME = re.compile(r"^vit-r(?P<rdepth>\d+)(?P<small>s?)-(?P<size>ti|s|b|l|h)(?P<stride>\d+)$")


def natural_stem_stride(root: str, n_stages: int) -> int:
    """Total stride of a stem whose first stage keeps the root's resolution and each later stage halves it."""
    return ROOT_STRIDES[root] * 2 ** (n_stages - 1)


def fold_stages(blocks: tuple[int, ...] | list[int], root: str, stride: int) -> list[int]:
    """Blocks per stage for a total `stride`: stages past it are removed and their blocks added to the
    last kept stage (the paper's option (ii), appendix D.2: R50 (3, 4, 6, 3) at stride 16 -> (3, 4, 9))."""
    base = ROOT_STRIDES[root]
    if stride < base or stride & (stride - 1):
        raise ValueError(f"stride {stride}: the {root!r} root needs a power of two >= {base}")
    keep = (stride // base).bit_length()  # stages kept: stride = base * 2^(keep-1)
    if keep > len(blocks):
        raise ValueError(
            f"stride {stride}: {len(blocks)} stages after the {root!r} root reach at most "
            f"{natural_stem_stride(root, len(blocks))}"
        )
    out = list(blocks[:keep])
    out[-1] += sum(blocks[keep:])
    return out


def _decode_hybrid(m: re.Match, name: str) -> dict:
    rdepth = int(m["rdepth"])
    if rdepth not in RESNET_BLOCKS:
        raise ValueError(
            f"unknown model variant {name!r}: ResNet depth {rdepth} is not one of "
            f"{'/'.join(map(str, RESNET_BLOCKS))}, e.g. vit-r50-b16 or vit-r26-s32"
        )
    root = "small" if m["small"] else "bit"
    stride = int(m["stride"])
    try:
        stages = fold_stages(RESNET_BLOCKS[rdepth], root, stride)
    except ValueError as e:
        raise ValueError(f"unknown model variant {name!r}: R{rdepth} {e}") from None
    width, depth, mlp, heads = SIZES[m["size"]]
    return {
        "width": width, "depth": depth, "mlp_dim": mlp, "heads": heads,
        # No stem_stride: the folded stages reach `stride` by themselves (a recipe that changes
        # stem_stages then gets their natural stride, not a silently dilated one).
        "hybrid": True, "stem_root": root, "stem_stages": stages, "stem_width": 64,
    }


def decode_variant(name: str) -> dict:
    """``"vit-b16"`` -> ``{"width": 768, "depth": 12, "mlp_dim": 3072, "heads": 12, "patch_size": 16}``.

    ``"vit-r50-b16"`` -> the same sizes plus ``hybrid``, ``stem_root``, ``stem_stages`` (3, 4, 9),
    and ``stem_width``; the folded stages give total stride 16.
    Resolution is not part of the name: it is a training argument.
    """
    text = name.strip().lower()
    h = _HYBRID_NAME.match(text)
    if h:
        return _decode_hybrid(h, name)
    m = _NAME.match(text)
    if not m or int(m["patch"]) not in PATCH_SIZES:
        raise ValueError(
            f"unknown model variant {name!r}: expected vit-<size><patch> with size in "
            f"{'/'.join(SIZES)} and patch in {'/'.join(map(str, PATCH_SIZES))}, e.g. vit-b16 or vit-ti4, "
            f"or a hybrid vit-r<depth>[s]-<size><stride> with depth in {'/'.join(map(str, RESNET_BLOCKS))}, "
            f"e.g. vit-r50-b16"
        )
    width, depth, mlp, heads = SIZES[m["size"]]
    return {"width": width, "depth": depth, "mlp_dim": mlp, "heads": heads, "patch_size": int(m["patch"])}
