"""The architecture's own schema: `ModelConfig`, its checks, and what a fine-tune may change.

It lives with the model so that model code never imports the config loader (`pipeline.config`
re-uses it as the recipe's `model:` section). Torch-free, like `variants.py`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal, Optional

from pipeline.model.variants import ROOT_STRIDES, decode_variant, natural_stem_stride
from pipeline.schema import ConfigError


@dataclass
class ModelConfig:
    """Vision Transformer architecture (the paper's ViT, optionally with a ResNet stem)."""

    variant: Optional[str] = None
    """Preset name such as vit-b16 or vit-ti4; fills width/depth/mlp_dim/heads/patch_size left unset."""
    patch_size: int = 16
    """P: square patch side in pixels (ignored by the hybrid, which uses patches of 1 on the stem's map)."""
    width: int = 192
    """D: token width."""
    depth: int = 12
    """L: number of encoder blocks."""
    heads: int = 3
    """Attention heads; must divide width."""
    mlp_dim: int = 768
    """Hidden size of each block's MLP."""
    in_channels: int = 3
    """Image channels the model takes: 1 (grayscale) or 3 (RGB). Images are converted to this."""
    hybrid: bool = False
    """Feed the Transformer a BiT ResNet stem's feature map, cut into 1x1 patches (the paper's hybrid)."""
    stem_root: Literal["bit", "small"] = "bit"
    """Hybrid only: bit = 7x7 stride-2 conv + max pool (stride 4, ImageNet-size inputs); small = one 3x3 stride-1 conv (images of tens of pixels)."""
    stem_stages: list[int] = field(default_factory=lambda: [3, 4, 9])
    """Hybrid only: bottleneck blocks per stage; [3, 4, 9] is the paper's R50 with stage 4 folded into stage 3."""
    stem_width: int = 64
    """Hybrid only: root channels and stage-1 bottleneck width (stage i: width * 2^i, output 4x that); 64 is R50x1."""
    stem_stride: Optional[int] = None
    """Hybrid only: total stride, which plays P's role; null = root stride x 2 per stage after the first; smaller values dilate the last stages."""
    dropout: float = 0.0
    """Dropout after the position embeddings and inside MLPs."""
    drop_path: float = 0.0
    """Stochastic depth rate of the last block (linearly increasing from 0)."""
    pos_embed_interp: Literal["bicubic", "bilinear"] = "bicubic"
    """Mode used whenever position embeddings are resampled to another grid; stored with the model."""
    class_token: bool = True
    """Prepend a learned [class] token (the paper's); false for timm/big_vision checkpoints pooled by averaging."""
    global_pool: Literal["token", "avg"] = "token"
    """What the head sees: the [class] token's output, or the mean of the patch tokens (needs no class token)."""
    fc_norm: bool = False
    """Apply the final LayerNorm after pooling instead of to every token (timm's fc_norm, e.g. MAE fine-tunes)."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon: 1e-6 in the paper's code and timm; Hugging Face ViT checkpoints use 1e-12."""
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    """Per-channel normalization mean (pixels scaled to [0, 1] first); one value per channel."""
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    """Per-channel normalization std; one value per channel."""

    @property
    def effective_patch(self) -> int:
        """Pixels per token side: P for plain ViT, the stem's total stride for the hybrid."""
        if not self.hybrid:
            return self.patch_size
        if self.stem_stride is not None:
            return self.stem_stride
        return natural_stem_stride(self.stem_root, len(self.stem_stages))

    @classmethod
    def expand_plain(cls, data: dict, prefix: str) -> dict:
        """A `variant` (vit-b16) fills the architecture fields the data leaves unset (schema.from_dict)."""
        if not data.get("variant"):
            return data
        try:
            table = decode_variant(str(data["variant"]))
        except ValueError as e:
            raise ConfigError(f"{prefix}variant: {e}") from None
        return {**table, **data}

    def record_given(self, names: frozenset[str]) -> None:
        """Remember which fields the recipe set (schema.from_dict calls it); see `given_fields`."""
        self.__dict__["_given"] = names

    @property
    def given_fields(self) -> frozenset[str]:
        """The fields a recipe set (in its file, base files, variant or overrides); for a config
        built in code, the fields that differ from the defaults."""
        given = self.__dict__.get("_given")  # recorded by from_dict; lost by dataclasses.replace
        if given is not None:
            return given
        default = ModelConfig()
        return frozenset(f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(default, f.name))


# ModelConfig fields a fine-tune may set without changing the architecture the weights were trained
# with; every other field is the weights' own.
FINETUNE_MODEL_FIELDS = ("dropout", "drop_path", "pos_embed_interp")


def _override(value) -> str:
    """`value` as a command-line override writes it (model.mean=[0.5,0.5,0.5], model.hybrid=false)."""
    if isinstance(value, str):
        return value
    return json.dumps(list(value) if isinstance(value, tuple) else value, separators=(",", ":"))


def finetune_model_config(weights: ModelConfig, recipe: ModelConfig, source: str) -> ModelConfig:
    """The model a fine-tune builds: `weights`' architecture with the FINETUNE_MODEL_FIELDS the
    recipe sets. Any other model.* field the recipe sets must agree with the weights (`source`
    names them in the error): fine-tuning cannot change the architecture it starts from."""
    given = recipe.given_fields
    differ = []
    for f in dataclasses.fields(ModelConfig):
        name = f.name
        if name == "variant" or name in FINETUNE_MODEL_FIELDS or name not in given:
            continue  # a variant is only a name for its fields, which are compared one by one
        if name.startswith("stem_") and not weights.hybrid and not recipe.hybrid:
            continue  # no stem on either side: its settings mean nothing
        if name == "patch_size" and weights.hybrid and recipe.hybrid:
            continue  # the hybrid's tokens are the stem's pixels
        mine, theirs = getattr(recipe, name), getattr(weights, name)
        if mine != theirs:
            differ.append((name, mine, theirs))
    may = f"only model.{', model.'.join(FINETUNE_MODEL_FIELDS)} may differ"
    if len(differ) == 1:
        (name, mine, theirs), = differ
        raise ConfigError(
            f"model.{name}: the recipe sets {mine!r} but the weights {source} have {theirs!r}; fine-tuning "
            f"keeps the architecture of its weights: remove model.{name} from the recipe or set "
            f"model.{name}={_override(theirs)} ({may})")
    if differ:  # all of them at once: a recipe written for other weights differs in many
        lines = "\n".join(f"  model.{name}: the recipe sets {mine!r}, the weights have {theirs!r}"
                          for name, mine, theirs in differ)
        raise ConfigError(
            f"model: the recipe sets {len(differ)} architecture fields that differ from the weights {source}:\n"
            f"{lines}\nfine-tuning keeps the architecture of its weights ({may}): remove these keys from the "
            f"recipe, or add the overrides {' '.join(f'model.{n}={_override(t)}' for n, _, t in differ)}")
    settings = {name: getattr(recipe, name) for name in FINETUNE_MODEL_FIELDS if name in given}
    return dataclasses.replace(weights, **settings)


def validate_model(m: ModelConfig, prefix: str = "model.") -> None:
    """Cross-field checks of the architecture."""
    for name in ("patch_size", "width", "depth", "heads", "mlp_dim", "stem_width"):
        if getattr(m, name) < 1:
            raise ConfigError(f"{prefix}{name}: must be >= 1, got {getattr(m, name)}")
    if m.width % m.heads:
        divisors = [h for h in range(1, min(m.width, 64) + 1) if m.width % h == 0]
        raise ConfigError(
            f"{prefix}heads: width {m.width} is not divisible by heads {m.heads}; "
            f"use a head count that divides it, e.g. {divisors[-4:]}"
        )
    if m.in_channels not in (1, 3):
        raise ConfigError(f"{prefix}in_channels: must be 1 or 3, got {m.in_channels}")
    for name in ("mean", "std"):
        vals = getattr(m, name)
        # One value broadcasts; an all-equal RGB-style default also serves a grayscale model.
        if not (len(vals) in (1, m.in_channels) or (m.in_channels == 1 and len(set(vals)) == 1)):
            raise ConfigError(f"{prefix}{name}: needs 1 or {m.in_channels} value(s) for in_channels={m.in_channels}, got {vals}")
    if any(s <= 0 for s in m.std):
        raise ConfigError(f"{prefix}std: every value must be > 0, got {m.std}")
    if m.hybrid:
        validate_stem(m, prefix)
    if not 0.0 <= m.drop_path < 1.0 or not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"{prefix}dropout/drop_path: must be in [0, 1)")
    if m.global_pool == "token" and not m.class_token:
        raise ConfigError(f"{prefix}global_pool: 'token' needs class_token=true; set {prefix}global_pool=avg "
                          f"or {prefix}class_token=true")
    if not 0.0 < m.norm_eps < 1e-2:
        raise ConfigError(f"{prefix}norm_eps: must be in (0, 0.01), got {m.norm_eps}; "
                          "the usual values are 1e-6 or 1e-12")


def validate_stem(m: ModelConfig, prefix: str = "model.") -> None:
    """The hybrid's ResNet stem: stage list, and a total stride the stages can reach."""
    if not m.stem_stages or any(b < 1 for b in m.stem_stages):
        raise ConfigError(f"{prefix}stem_stages: need one or more stages of >= 1 block each, "
                          f"e.g. [3, 4, 9] (R50, stride 16) or [1, 1] (small root, stride 2); got {m.stem_stages}")
    if m.stem_stride is None:
        return
    low, high = ROOT_STRIDES[m.stem_root], natural_stem_stride(m.stem_root, len(m.stem_stages))
    reachable = [low * 2**i for i in range(len(m.stem_stages))]
    if m.stem_stride not in reachable:
        raise ConfigError(
            f"{prefix}stem_stride: {m.stem_stride} is not reachable; with stem_root={m.stem_root} "
            f"(stride {low}) and {len(m.stem_stages)} stage(s) it must be a power of two in {reachable} "
            f"(null: {high}); add stages for a larger stride or use stem_root=small for a smaller one"
        )
