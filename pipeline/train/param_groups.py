"""Optimizer parameter groups: the weight-decay rule crossed with layer-wise learning-rate decay.

Layer-wise decay (BEiT, MAE, big_vision's fine-tuning configs) gives the layers near the input a
smaller learning rate than the head: the early features transfer, the late ones adapt. Layers:

  0        the embedding: the hybrid's stem, patch_embed, cls_token, pos_embed
  i + 1    encoder block i (0-based), for i < L
  L + 1    the final norm and the head (the top: the peak learning rate)

and the group of layer `n` gets `lr_scale = layer_decay ** (L + 1 - n)`: with decay 0.5, block 0's
rate is 0.5**L of the head's. The scale is written into each group's own "lr" before the
optimizer exists, so torch's LambdaLR (which multiplies every group's initial lr by the schedule
factor) and every DeepSpeed ZeRO stage (which keep the torch optimizer's groups, only replacing
their params by flat partitions) keep the ratios at every step.

Frozen parameters (requires_grad False) are in no group: the optimizer never touches them.
"""

from __future__ import annotations

import re

from torch import nn

from pipeline.model.vit import param_groups_for_weight_decay

_EMBEDDING = ("stem.", "patch_embed.", "cls_token", "pos_embed")
_TOP = ("norm.", "fc_norm.", "head.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def layer_id(name: str, depth: int) -> int:
    """The layer (0 .. depth + 1, see the module docstring) that parameter `name` belongs to."""
    if name.startswith(_EMBEDDING):
        return 0
    if m := _BLOCK.match(name):
        return int(m.group(1)) + 1
    if name.startswith(_TOP):
        return depth + 1
    # A new parameter must be placed deliberately, never given some learning rate by default.
    raise ValueError(f"layer-wise lr decay: parameter {name!r} belongs to no known layer; "
                     f"add its prefix to pipeline/train/param_groups.py")


def optimizer_param_groups(model: nn.Module, *, lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Param groups for torch optimizers: (layer, decay or not) pairs, each with its own lr.

    Every group carries "lr" (= lr x lr_scale), "lr_scale", "weight_decay" and "name"
    ("layer_03/decay"). Biases, norms, position embeddings and the class token never decay
    (the rule of `param_groups_for_weight_decay`, applied here unchanged).
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay: must be in (0, 1], got {layer_decay}")
    depth = len(model.blocks)
    names = {id(p): n for n, p in model.named_parameters()}
    groups: dict[tuple[int, bool], list] = {}
    for wd_group in param_groups_for_weight_decay(model, weight_decay):
        decays = wd_group["weight_decay"] > 0
        for p in wd_group["params"]:
            layer = layer_id(names[id(p)], depth) if layer_decay != 1.0 else depth + 1
            groups.setdefault((layer, decays), []).append(p)
    out = []
    for (layer, decays), params in sorted(groups.items()):
        scale = layer_decay ** (depth + 1 - layer)
        out.append({"params": params, "lr": lr * scale, "lr_scale": scale,
                    "weight_decay": weight_decay if decays else 0.0,
                    "name": f"layer_{layer:02d}/{'decay' if decays else 'no_decay'}"})
    return out
