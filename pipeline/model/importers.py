"""Import adapters: public ViT checkpoints (timm, Hugging Face, Google .npz) -> our weights pair.

One adapter per foreign format; each reads the source's own key names and layouts, infers the
architecture from the tensors (and the source's config where the tensors cannot tell, e.g. the
head count of a fused qkv), and returns our state dict plus a ModelConfig. Every source key is
either mapped, or named in an "ignored" list with the reason, or an error: nothing is silently
dropped, and no layer of the result is left randomly initialized (the strict load in
`import_weights` checks the last part).

Torch (and numpy, for .npz) only, like the rest of `pipeline/model`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from pipeline.model.config import ModelConfig, validate_model
from pipeline.schema import ConfigError
from pipeline.model.variants import SIZES, natural_stem_stride
from pipeline.model.vit import build_model
from pipeline.model.weights import FORMAT, META_NAME, WEIGHTS_NAME, save_weights_pair, weights_meta

FORMATS = ("timm", "hf", "npz")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


class WeightsImportError(ValueError):
    """A source checkpoint that cannot be mapped onto our ViT; the message names the file and key."""


@dataclass
class Imported:
    """A foreign checkpoint translated to our key names, with the architecture it implies."""

    state_dict: dict[str, torch.Tensor]
    cfg: ModelConfig
    image_size: tuple[int, int]
    num_classes: int
    class_names: Optional[list[str]]
    source: dict = field(default_factory=dict)  # format, path, sha256, ignored/dropped keys: into model.json


# -- reading tensors and ticking them off ------------------------------------------------------


class _Keys:
    """A source's tensors by key. Every key read is ticked off, so what is left can be reported."""

    def __init__(self, tensors: Mapping[str, Any], where: str, to_tensor: Callable[[Any], torch.Tensor]):
        self._tensors = tensors
        self._to_tensor = to_tensor
        self.where = where
        self.unused = set(tensors.keys())
        self.ignored: dict[str, str] = {}  # key -> why it does not matter

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def keys(self) -> Iterable[str]:
        return self._tensors.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of `key` without ticking it off (for inferring the architecture)."""
        if key not in self._tensors:
            raise WeightsImportError(f"{self.where}: missing key {key!r}")
        return tuple(int(s) for s in self._tensors[key].shape)

    def take(self, key: str, shape: Sequence[int]) -> torch.Tensor:
        """The tensor under `key` as float32, which must have `shape`; ticked off as used."""
        have = self.shape(key)
        if have != tuple(shape):
            raise WeightsImportError(
                f"{self.where}: key {key!r} has shape {have}, expected {tuple(shape)} for the architecture "
                "inferred from the other tensors (a corrupt or mixed checkpoint?)"
            )
        self.unused.discard(key)
        t = self._to_tensor(self._tensors[key])
        if not t.is_floating_point():
            raise WeightsImportError(f"{self.where}: key {key!r} holds {t.dtype} values, expected floating point")
        return t.to(torch.float32)

    def take_vector(self, key: str, n: int) -> torch.Tensor:
        """A length-`n` vector stored as (n,) or with leading 1s, e.g. a GroupNorm scale of (1, 1, 1, n)."""
        have = self.shape(key)
        return self.take(key, have if have[-1:] == (n,) and math.prod(have) == n else (n,)).reshape(n)

    def ignore(self, key: str, why: str) -> None:
        """Mark `key` as known to be irrelevant to the model (recorded in model.json with `why`)."""
        if key in self._tensors:
            self.unused.discard(key)
            self.ignored[key] = why

    def check_all_used(self, hints: Mapping[str, str] = {}) -> None:
        """Raise naming every key that was neither mapped nor ignored (with a hint where one is known)."""
        if not self.unused:
            return
        left = sorted(self.unused)
        hint = next((h for pat, h in hints.items() for k in left if pat in k), None)
        shown = ", ".join(repr(k) for k in left[:8]) + (f", ... ({len(left)} in all)" if len(left) > 8 else "")
        raise WeightsImportError(
            f"{self.where}: unexpected key(s) {shown}: they have no counterpart in our ViT"
            + (f" ({hint})" if hint else "") + "; refusing to drop them silently"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _heads_from_table(width: int, depth: int, mlp_dim: int) -> Optional[int]:
    for w, d, m, h in SIZES.values():
        if (w, d, m) == (width, depth, mlp_dim):
            return h
    return None


def _block_count(keys: Iterable[str], pattern: str, where: str, first: int = 0, what: str = "encoder blocks") -> int:
    """Number of blocks: the indices matched by `pattern` (one group) must be first..first+N-1."""
    idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if not idx:
        raise WeightsImportError(f"{where}: no {what} found (no key matches {pattern!r})")
    if idx != set(range(first, first + len(idx))):
        missing = sorted(set(range(first, max(idx) + 1)) - idx)
        raise WeightsImportError(f"{where}: {what} {missing} are missing (found up to {max(idx)})")
    return len(idx)


# -- the hybrid's BiT ResNet stem ----------------------------------------------------------------


@dataclass
class _Stem:
    """A hybrid checkpoint's stem, mapped: our `stem.*` tensors and the ModelConfig fields it implies."""

    state_dict: dict[str, torch.Tensor]
    fields: dict  # hybrid, stem_root, stem_stages, stem_width, in_channels
    out_channels: int
    stride: int


def _stem_root(kernel: int, where: str, key: str) -> str:
    # Our two roots: BiT's 7x7 (+ max pool) and the small 3x3 one (no pool); anything else is not ours.
    if kernel not in (7, 3):
        raise WeightsImportError(
            f"{where}: key {key!r} is a {kernel}x{kernel} root conv; our stem's root is 7x7 or 3x3")
    return "bit" if kernel == 7 else "small"


def _map_stem(width: int, in_channels: int, root: str, stages: list[int],
              conv: Callable[[str, tuple[int, int, int, int]], torch.Tensor],
              norm: Callable[[str, int], tuple[torch.Tensor, torch.Tensor]]) -> _Stem:
    """Walk our stem's layout; `conv(name, OIHW shape)` / `norm(name, channels)` read the source's tensors.

    Names passed are ours (root.conv, stages.I.blocks.J.conv1, ..., downsample.conv); each adapter
    translates them to its format's keys.
    """
    k = 7 if root == "bit" else 3
    sd = {"stem.root.conv.weight": conv("root.conv", (width, in_channels, k, k))}
    sd["stem.root.norm.weight"], sd["stem.root.norm.bias"] = norm("root.norm", width)
    ch = width
    for i, depth in enumerate(stages):
        out = 4 * width * 2**i  # a bottleneck stage's output is 4x its width (ResNet-50)
        mid = out // 4
        for j in range(depth):
            o = f"stages.{i}.blocks.{j}."
            cin = ch if j == 0 else out
            # The first unit of every stage changes width (stage 0) or resolution: a projection shortcut.
            parts = [("downsample.conv", (out, cin, 1, 1))] if j == 0 else []
            parts += [("conv1", (mid, cin, 1, 1)), ("conv2", (mid, mid, 3, 3)), ("conv3", (out, mid, 1, 1))]
            for name, shape in parts:
                sd[f"stem.{o}{name}.weight"] = conv(o + name, shape)
                norm_name = name.replace("conv", "norm")
                sd[f"stem.{o}{norm_name}.weight"], sd[f"stem.{o}{norm_name}.bias"] = norm(o + norm_name, shape[0])
        ch = out
    fields = {"hybrid": True, "stem_root": root, "stem_stages": list(stages), "stem_width": width,
              "in_channels": in_channels}
    return _Stem(sd, fields, ch, natural_stem_stride(root, len(stages)))


def _timm_stem(src: _Keys) -> _Stem:
    """timm's ResNetV2 backbone of vit_*_r50_* / vit_small_r26_s32_* (patch_embed.backbone.*)."""
    b = "patch_embed.backbone."
    if f"{b}stem.conv.weight" not in src or not any(k.startswith(f"{b}stages.") for k in src.keys()):
        first = sorted(k for k in src.keys() if k.startswith(b))[0]
        raise WeightsImportError(
            f"{src.where}: key {first!r}: only timm's ResNetV2 hybrid backbone with stages (vit_*_r50_*, "
            "vit_small_r26_s32_*) is supported, not other backbones (resnet26d/50d) or a stem alone")
    width, cin, k, _ = src.shape(f"{b}stem.conv.weight")
    root = _stem_root(k, src.where, f"{b}stem.conv.weight")
    n_stages = _block_count(src.keys(), rf"{re.escape(b)}stages\.(\d+)\.", src.where, what="stem stages")
    stages = [_block_count(src.keys(), rf"{re.escape(b)}stages\.{i}\.blocks\.(\d+)\.", src.where,
                           what=f"units of stem stage {i}") for i in range(n_stages)]
    # Our stem's module names follow timm's ResNetV2, except its stem.* which is our root.*.
    theirs = lambda name: b + name.replace("root.", "stem.", 1)  # noqa: E731
    return _map_stem(width, cin, root, stages, lambda n, shape: src.take(theirs(n) + ".weight", shape),
                     lambda n, c: (src.take(theirs(n) + ".weight", (c,)), src.take(theirs(n) + ".bias", (c,))))


def _npz_stem(src: _Keys, prefix: str) -> _Stem:
    """The original hybrid's stem in a vision_transformer .npz: conv_root, gn_root, blockI/unitJ/..."""
    kh, kw, cin, width = src.shape(f"{prefix}conv_root/kernel")
    root = _stem_root(kh, src.where, f"{prefix}conv_root/kernel")
    n_stages = _block_count(src.keys(), rf"{re.escape(prefix)}block(\d+)/", src.where, 1, "stem stages")
    stages = [_block_count(src.keys(), rf"{re.escape(prefix)}block{i + 1}/unit(\d+)/", src.where, 1,
                           f"units of stem stage {i + 1}") for i in range(n_stages)]

    def theirs(name: str) -> str:  # ours -> the Flax module path (1-based blocks and units)
        if name.startswith("root."):
            return prefix + name.replace("root.conv", "conv_root").replace("root.norm", "gn_root")
        _, i, _, j, part = name.split(".", 4)
        part = {"downsample.conv": "conv_proj", "downsample.norm": "gn_proj"}.get(part, part.replace("norm", "gn"))
        return f"{prefix}block{int(i) + 1}/unit{int(j) + 1}/{part}"

    def conv(name: str, shape: tuple[int, int, int, int]) -> torch.Tensor:
        o, i, h, w = shape
        return src.take(theirs(name) + "/kernel", (h, w, i, o)).permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW

    def norm(name: str, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        return src.take_vector(theirs(name) + "/scale", c), src.take_vector(theirs(name) + "/bias", c)

    return _map_stem(width, cin, root, stages, conv, norm)


def _grid(n_tokens: int, where: str, key: str, size_hint: Optional[Sequence[int]], patch: int) -> tuple[int, int]:
    """The patch grid of `n_tokens` position embeddings: from the source's image size, else square."""
    if size_hint is not None:
        h, w = (int(size_hint[0]) // patch, int(size_hint[1]) // patch)
        if h * w == n_tokens:
            return h, w
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise WeightsImportError(
            f"{where}: key {key!r} holds {n_tokens} grid positions, which is not a square grid, and the "
            "source's config gives no image size that explains it"
        )
    return side, side


def _model_config(where: str, **fields: Any) -> ModelConfig:
    cfg = ModelConfig(**fields)
    try:
        validate_model(cfg, prefix="imported architecture: ")
    except ConfigError as e:
        raise WeightsImportError(f"{where}: {e}") from None
    return cfg


# -- timm ----------------------------------------------------------------------------------------

# Keys of timm ViT variants our model does not have, with what they are (for the error message).
TIMM_UNSUPPORTED = {
    "dist_token": "DeiT distillation token (a distilled DeiT checkpoint)",
    "head_dist": "DeiT distillation head",
    "reg_token": "register tokens",
    "norm_pre": "a pre-norm before the blocks (CLIP-style)",
    "attn_pool": "an attention-pooling (MAP) head",
    ".ls1.": "layer scale (DeiT-III/CaiT-style)",
    ".ls2.": "layer scale (DeiT-III/CaiT-style)",
    "q_norm": "query/key normalization",
    "patch_embed.norm": "a norm after the patch embedding",
}


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise WeightsImportError(f"{path}: cannot read safetensors: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never runs pickled code
    except Exception as e:  # UnpicklingError, RuntimeError (not a zip/pickle), EOFError...
        raise WeightsImportError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from None
    # Training scripts wrap the state dict ({"model": ...} in DeiT/timm train.py, {"state_dict": ...}).
    for wrapper in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsImportError(f"{path}: not a state dict (a mapping of names to tensors)")
    return obj


def read_timm(path: Path, config: Optional[dict] = None, heads: Optional[int] = None) -> Imported:
    """A timm `VisionTransformer` state dict (.safetensors, .pth/.bin) -> our key names."""
    where = str(path)
    tensors = _load_torch_file(path)
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from DistributedDataParallel
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    src = _Keys(tensors, where, lambda t: t)
    config = config or {}
    pcfg = config.get("pretrained_cfg") or {}
    args = config.get("model_args") or {}
    for key, what in TIMM_UNSUPPORTED.items():
        hit = next((k for k in src.keys() if key in k), None)
        if hit is not None:
            raise WeightsImportError(f"{where}: key {hit!r} is {what}, which our ViT does not support")

    stem = _timm_stem(src) if any(k.startswith("patch_embed.backbone.") for k in src.keys()) else None
    d, c, p, p2 = src.shape("patch_embed.proj.weight")
    if p != p2:
        raise WeightsImportError(f"{where}: patch_embed.proj.weight has non-square patches {p}x{p2}")
    if stem is not None and (p != 1 or c != stem.out_channels):
        raise WeightsImportError(f"{where}: patch_embed.proj.weight {(d, c, p, p2)} does not take the stem's "
                                 f"{stem.out_channels} channels as 1x1 patches")
    stride = stem.stride if stem is not None else p  # pixels per token side
    depth = _block_count(src.keys(), r"blocks\.(\d+)\.", where)
    mlp = src.shape("blocks.0.mlp.fc1.weight")[0]
    n_heads = heads or args.get("num_heads") or _heads_from_table(d, depth, mlp)
    if not n_heads:
        raise WeightsImportError(
            f"{where}: the head count cannot be read from a fused qkv and width {d}, depth {depth}, MLP {mlp} "
            "match no standard size; pass it (vitpipe import-weights --heads N)"
        )
    class_token = "cls_token" in src
    fc_norm = "fc_norm.weight" in src
    pool = config.get("global_pool") or ("avg" if fc_norm or not class_token else "token")
    if pool not in ("token", "avg"):
        raise WeightsImportError(f"{where}: global_pool {pool!r} (config.json) is not supported; only token and avg")
    prefix = 1 if class_token else 0
    n_pos = src.shape("pos_embed")[1]
    size_hint = (pcfg.get("input_size") or [None])[1:] or None
    try:
        grid = _grid(n_pos - prefix, where, "pos_embed", size_hint, stride)
    except WeightsImportError:
        if class_token and math.isqrt(n_pos) ** 2 == n_pos:
            raise WeightsImportError(f"{where}: key 'pos_embed' has {n_pos} positions, one per patch and none for "
                                     "the class token (timm's no_embed_class), which our ViT does not support") from None
        raise
    if "head.weight" in src and "pre_logits.fc.weight" not in src:
        num_classes = src.shape("head.weight")[0]
    else:
        num_classes = 0

    sd: dict[str, torch.Tensor] = {
        "patch_embed.weight": src.take("patch_embed.proj.weight", (d, c, p, p)),
        "patch_embed.bias": src.take("patch_embed.proj.bias", (d,)),
        "pos_embed": src.take("pos_embed", (1, prefix + grid[0] * grid[1], d)),
        **(stem.state_dict if stem is not None else {}),
    }
    if class_token:
        sd["cls_token"] = src.take("cls_token", (1, 1, d))
    for i in range(depth):
        b = f"blocks.{i}."
        for name, shape in (("norm1.weight", (d,)), ("norm1.bias", (d,)),
                            ("attn.qkv.weight", (3 * d, d)), ("attn.qkv.bias", (3 * d,)),
                            ("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)),
                            ("norm2.weight", (d,)), ("norm2.bias", (d,)),
                            ("mlp.fc1.weight", (mlp, d)), ("mlp.fc1.bias", (mlp,)),
                            ("mlp.fc2.weight", (d, mlp)), ("mlp.fc2.bias", (d,))):
            sd[b + name] = src.take(b + name, shape)  # timm's qkv is (q, k, v) x heads x head_dim, as ours
    final = "fc_norm" if fc_norm else "norm"
    sd[f"{final}.weight"] = src.take(f"{final}.weight", (d,))
    sd[f"{final}.bias"] = src.take(f"{final}.bias", (d,))
    dropped = _drop_representation_layer(src, ("pre_logits.fc.weight", "pre_logits.fc.bias"),
                                         ("head.weight", "head.bias"))
    if num_classes:
        sd["head.weight"] = src.take("head.weight", (num_classes, d))
        sd["head.bias"] = src.take("head.bias", (num_classes,))
    src.check_all_used(TIMM_UNSUPPORTED)

    cfg = _model_config(
        where, patch_size=stride, width=d, depth=depth, heads=int(n_heads), mlp_dim=mlp,
        **(stem.fields if stem is not None else {"in_channels": c}),
        class_token=class_token, global_pool=pool, fc_norm=fc_norm, norm_eps=1e-6,
        # timm resamples position embeddings bicubically (its checkpoint_filter_fn default).
        pos_embed_interp="bicubic",
        **_mean_std(pcfg.get("mean"), pcfg.get("std"), stem.fields["in_channels"] if stem else c),
    )
    names = config.get("label_names") or pcfg.get("label_names")
    return Imported(sd, cfg, (grid[0] * stride, grid[1] * stride), num_classes,
                    list(names) if names and len(names) == num_classes else None,
                    {"ignored_keys": src.ignored, "dropped_keys": dropped,
                     "mean_std": "config.json" if pcfg.get("mean")
                     else "default 0.5 (no config.json beside the weights)"})


def _mean_std(mean: Any, std: Any, channels: int) -> dict:
    if mean and std:
        return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    return {"mean": [0.5] * channels, "std": [0.5] * channels}  # the normalization of Google's and timm's augreg ViTs


def _drop_representation_layer(src: _Keys, pre_logits: Sequence[str], head: Sequence[str]) -> list[str]:
    """Drop a pre-logits (tanh "representation") layer together with the head it feeds.

    Our ViT has no such layer; the paper's transfer recipe removes "the whole head (two layers)"
    and attaches a single zero-initialized one, which is what fine-tuning a headless import does.
    Dropping only the pre-logits layer (as timm does) would keep a head whose logits no longer mean
    anything. Returns the dropped keys (recorded in model.json).
    """
    if not any(k in src for k in pre_logits):
        return []
    dropped = [k for k in (*pre_logits, *head) if k in src]
    for k in dropped:
        src.unused.discard(k)
    return dropped


# -- Hugging Face transformers -----------------------------------------------------------------

HF_ARCHITECTURES = ("ViTModel", "ViTForImageClassification")
# The Hugging Face hub's (and timm hub folders') weights file name: theirs, equal to ours by chance.
HUB_SAFETENSORS = "model.safetensors"


def _hf_weights_files(folder: Path) -> list[Path]:
    """The weights files of an HF folder: model.safetensors, the shards its index lists, or pytorch_model.bin."""
    index = folder / f"{HUB_SAFETENSORS}.index.json"
    if (folder / HUB_SAFETENSORS).is_file():
        return [folder / HUB_SAFETENSORS]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise WeightsImportError(f"{index}: not a safetensors index: {e}") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise WeightsImportError(f"{index}: lists weights file(s) {missing} that are not in {folder}")
        return [folder / s for s in shards]
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    raise WeightsImportError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsImportError(f"{path}: cannot read JSON: {e}") from None
    if not isinstance(data, dict):
        raise WeightsImportError(f"{path}: expected a JSON object")
    return data


def read_hf(folder: Path) -> Imported:
    """A `transformers` ViTModel / ViTForImageClassification folder -> our key names (q/k/v fused)."""
    config = _read_json(folder / "config.json")
    where = str(folder)
    if config.get("model_type") != "vit":
        raise WeightsImportError(f"{folder / 'config.json'}: model_type {config.get('model_type')!r} is not "
                                 "supported; only Hugging Face 'vit' (ViTModel, ViTForImageClassification)")
    archs = config.get("architectures") or []
    if any(a not in HF_ARCHITECTURES for a in archs):
        raise WeightsImportError(f"{folder / 'config.json'}: architectures {archs} are not supported; "
                                 f"only {', '.join(HF_ARCHITECTURES)}")
    if config.get("hidden_act", "gelu") != "gelu":
        raise WeightsImportError(f"{folder / 'config.json'}: hidden_act {config['hidden_act']!r} is not supported; "
                                 "our MLP uses exact GELU ('gelu')")
    if not config.get("qkv_bias", True):
        raise WeightsImportError(f"{folder / 'config.json'}: qkv_bias=false is not supported (our qkv has a bias)")
    files = _hf_weights_files(folder)
    tensors = {k: v for f in files for k, v in _load_torch_file(f).items()}
    where = str(files[0]) if len(files) == 1 else where
    # ViTForImageClassification nests the encoder under "vit."; a bare ViTModel does not.
    pre = "vit." if any(k.startswith("vit.") for k in tensors) else ""
    src = _Keys(tensors, where, lambda t: t)
    d, heads, depth = int(config["hidden_size"]), int(config["num_attention_heads"]), int(config["num_hidden_layers"])
    mlp, c = int(config["intermediate_size"]), int(config.get("num_channels", 3))
    p = config.get("patch_size", 16)
    p = p if isinstance(p, int) else int(p[0])
    size = config.get("image_size", 224)
    size = [size, size] if isinstance(size, int) else [int(s) for s in size]
    found_depth = _block_count(src.keys(), rf"{re.escape(pre)}encoder\.layer\.(\d+)\.", where)
    if found_depth != depth:
        raise WeightsImportError(f"{where}: {found_depth} encoder layers in the weights, config.json says {depth}")
    grid = (size[0] // p, size[1] // p)
    e = f"{pre}embeddings."
    sd = {
        "patch_embed.weight": src.take(e + "patch_embeddings.projection.weight", (d, c, p, p)),
        "patch_embed.bias": src.take(e + "patch_embeddings.projection.bias", (d,)),
        "cls_token": src.take(e + "cls_token", (1, 1, d)),
        "pos_embed": src.take(e + "position_embeddings", (1, 1 + grid[0] * grid[1], d)),
    }
    for i in range(depth):
        h, b = f"{pre}encoder.layer.{i}.", f"blocks.{i}."
        # HF keeps q, k and v apart; ours is one Linear whose output rows are (q; k; v).
        sd[b + "attn.qkv.weight"] = torch.cat(
            [src.take(f"{h}attention.attention.{n}.weight", (d, d)) for n in ("query", "key", "value")])
        sd[b + "attn.qkv.bias"] = torch.cat(
            [src.take(f"{h}attention.attention.{n}.bias", (d,)) for n in ("query", "key", "value")])
        for ours, theirs, shape in (("norm1", "layernorm_before", (d,)), ("norm2", "layernorm_after", (d,)),
                                    ("attn.proj", "attention.output.dense", None),
                                    ("mlp.fc1", "intermediate.dense", None), ("mlp.fc2", "output.dense", None)):
            wshape = {"attn.proj": (d, d), "mlp.fc1": (mlp, d), "mlp.fc2": (d, mlp)}.get(ours, shape)
            sd[f"{b}{ours}.weight"] = src.take(f"{h}{theirs}.weight", wshape)
            sd[f"{b}{ours}.bias"] = src.take(f"{h}{theirs}.bias", (wshape[0],))
    sd["norm.weight"] = src.take(f"{pre}layernorm.weight", (d,))
    sd["norm.bias"] = src.take(f"{pre}layernorm.bias", (d,))
    for k in ("pooler.dense.weight", "pooler.dense.bias"):
        # ViTModel's tanh pooler: not part of the classifier (ViTForImageClassification reads the
        # normalized class token directly), and fine-tuning replaces whatever head there is.
        src.ignore(k, "ViTModel's pooler, unused by ViTForImageClassification")
    num_classes, names = 0, None
    if pre and "classifier.weight" in src:
        num_classes = src.shape("classifier.weight")[0]
        sd["head.weight"] = src.take("classifier.weight", (num_classes, d))
        sd["head.bias"] = src.take("classifier.bias", (num_classes,))
        id2label = config.get("id2label") or {}
        if len(id2label) == num_classes:
            names = [str(id2label.get(str(i), id2label.get(i))) for i in range(num_classes)]
    src.check_all_used({"mask_token": "ViTForMaskedImageModeling's mask token", "decoder": "a decoder"})

    pre_cfg_path = folder / "preprocessor_config.json"
    pre_cfg = _read_json(pre_cfg_path) if pre_cfg_path.is_file() else {}
    cfg = _model_config(
        where, patch_size=p, width=d, depth=depth, heads=heads, mlp_dim=mlp, in_channels=c,
        norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        # transformers' ViTEmbeddings.interpolate_pos_encoding resamples bicubically.
        pos_embed_interp="bicubic", **_mean_std(pre_cfg.get("image_mean"), pre_cfg.get("image_std"), c),
    )
    return Imported(sd, cfg, (grid[0] * p, grid[1] * p), num_classes, names,
                    {"ignored_keys": src.ignored, "dropped_keys": [],
                     "mean_std": "preprocessor_config.json" if pre_cfg.get("image_mean") else "default 0.5"})


# -- Google .npz (vision_transformer / big_vision) ---------------------------------------------

NPZ_UNSUPPORTED = {
    "MAPHead_0": "an attention-pooling (MAP) head",
    "txt/": "a text tower (an image-text model)",
}


def _npz_to_tensor(where: str) -> Callable[[Any], torch.Tensor]:
    import numpy as np

    def convert(a: Any) -> torch.Tensor:
        a = np.asarray(a)
        if a.dtype.kind == "V":  # bfloat16 saved by numpy as raw 2-byte records
            raise WeightsImportError(f"{where}: holds bfloat16 arrays stored as raw bytes; save them as float32")
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) if a.dtype.kind == "f" else a)

    return convert


def read_npz(path: Path) -> Imported:
    """A Google ViT .npz (vision_transformer or big_vision layout, stacked or not) -> our key names."""
    import numpy as np

    where = str(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise WeightsImportError(f"{path}: cannot read .npz: {e}") from None
    with npz:
        arrays = {k: npz[k] for k in npz.files}
    src = _Keys(arrays, where, _npz_to_tensor(where))
    # Where the model's parameters sit: flax optimizer checkpoints nest them under opt/target/,
    # big_vision under params/ (params/img/ for an image tower) (as timm's _load_weights reads them).
    prefix = next((p for p in ("opt/target/", "params/img/", "params/") if f"{p}embedding/kernel" in src), "")
    for k in list(src.keys()):
        if prefix and not k.startswith(prefix) and k.startswith("opt/"):
            src.ignore(k, "optimizer state")
        elif (pat := next((p for p in NPZ_UNSUPPORTED if p in k), None)) is not None:
            raise WeightsImportError(f"{where}: key {k!r} is {NPZ_UNSUPPORTED[pat]}, which our ViT does not support")
    big_vision = f"{prefix}pos_embedding" in src
    # Sub-module numbering differs: vision_transformer has LayerNorm_0, MHDPA_1, LayerNorm_2,
    # MlpBlock_3; big_vision LayerNorm_0, MHDPA_0, LayerNorm_1, MlpBlock_0.
    mha, ln2, mlp_n = (0, 1, 0) if big_vision else (1, 2, 3)
    t = f"{prefix}Transformer/"
    stacked = f"{t}encoderblock/LayerNorm_0/scale" in src  # big_vision's scan: one array per name, layer axis first

    stem = _npz_stem(src, prefix) if f"{prefix}conv_root/kernel" in src else None  # R50+ViT
    p, p2, c, d = src.shape(f"{prefix}embedding/kernel")  # HWIO
    if p != p2:
        raise WeightsImportError(f"{where}: {prefix}embedding/kernel has non-square patches {p}x{p2}")
    if stem is not None and (p != 1 or c != stem.out_channels):
        raise WeightsImportError(f"{where}: {prefix}embedding/kernel {(p, p2, c, d)} does not take the stem's "
                                 f"{stem.out_channels} channels as 1x1 patches")
    stride = stem.stride if stem is not None else p
    if stacked:
        depth = src.shape(f"{t}encoderblock/LayerNorm_0/scale")[0]
    else:
        depth = _block_count(src.keys(), rf"{re.escape(t)}encoderblock_(\d+)/", where)
    blk0 = f"{t}encoderblock/" if stacked else f"{t}encoderblock_0/"
    q_shape = src.shape(f"{blk0}MultiHeadDotProductAttention_{mha}/query/kernel")
    heads = q_shape[-2]  # (D, heads, head_dim): the head split is stored, unlike a fused qkv
    hd = q_shape[-1]
    mlp = src.shape(f"{blk0}MlpBlock_{mlp_n}/Dense_0/kernel")[-1]
    if heads * hd != d:
        raise WeightsImportError(f"{where}: query kernel {q_shape} does not split width {d} into heads")
    class_token = f"{prefix}cls" in src
    pos_key = f"{prefix}pos_embedding" if big_vision else f"{t}posembed_input/pos_embedding"
    prefix_tokens = 1 if class_token else 0
    grid = _grid(src.shape(pos_key)[1] - prefix_tokens, where, pos_key, None, stride)

    sd: dict[str, torch.Tensor] = {
        "patch_embed.weight": src.take(f"{prefix}embedding/kernel", (p, p, c, d)).permute(3, 2, 0, 1),  # HWIO -> OIHW
        "patch_embed.bias": src.take(f"{prefix}embedding/bias", (d,)),
        "pos_embed": src.take(pos_key, (1, prefix_tokens + grid[0] * grid[1], d)),
        **(stem.state_dict if stem is not None else {}),
    }
    if class_token:
        sd["cls_token"] = src.take(f"{prefix}cls", (1, 1, d))
    taken: dict[str, torch.Tensor] = {}

    def block_param(i: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if not stacked:
            return src.take(f"{t}encoderblock_{i}/{name}", shape)
        key = f"{t}encoderblock/{name}"
        if key not in taken:
            taken[key] = src.take(key, (depth, *shape))
        return taken[key][i]

    for i in range(depth):
        b, a = f"blocks.{i}.", f"MultiHeadDotProductAttention_{mha}/"
        # query/key/value kernels are (D, heads, head_dim): flatten the heads and transpose to (out, in).
        sd[b + "attn.qkv.weight"] = torch.cat(
            [block_param(i, f"{a}{n}/kernel", (d, heads, hd)).reshape(d, d).T for n in ("query", "key", "value")])
        sd[b + "attn.qkv.bias"] = torch.cat(
            [block_param(i, f"{a}{n}/bias", (heads, hd)).reshape(d) for n in ("query", "key", "value")])
        sd[b + "attn.proj.weight"] = block_param(i, f"{a}out/kernel", (heads, hd, d)).reshape(d, d).T
        sd[b + "attn.proj.bias"] = block_param(i, f"{a}out/bias", (d,))
        for ours, ln in (("norm1", "LayerNorm_0"), ("norm2", f"LayerNorm_{ln2}")):
            sd[f"{b}{ours}.weight"] = block_param(i, f"{ln}/scale", (d,))
            sd[f"{b}{ours}.bias"] = block_param(i, f"{ln}/bias", (d,))
        for j, (n_in, n_out) in enumerate(((d, mlp), (mlp, d))):
            sd[f"{b}mlp.fc{j + 1}.weight"] = block_param(i, f"MlpBlock_{mlp_n}/Dense_{j}/kernel", (n_in, n_out)).T
            sd[f"{b}mlp.fc{j + 1}.bias"] = block_param(i, f"MlpBlock_{mlp_n}/Dense_{j}/bias", (n_out,))
    sd["norm.weight"] = src.take(f"{t}encoder_norm/scale", (d,))
    sd["norm.bias"] = src.take(f"{t}encoder_norm/bias", (d,))
    dropped = _drop_representation_layer(src, (f"{prefix}pre_logits/kernel", f"{prefix}pre_logits/bias"),
                                         (f"{prefix}head/kernel", f"{prefix}head/bias"))
    num_classes = 0
    if f"{prefix}head/kernel" in src and not dropped:
        num_classes = src.shape(f"{prefix}head/kernel")[1]
        sd["head.weight"] = src.take(f"{prefix}head/kernel", (d, num_classes)).T
        sd["head.bias"] = src.take(f"{prefix}head/bias", (num_classes,))
    src.check_all_used(NPZ_UNSUPPORTED)

    cfg = _model_config(
        where, patch_size=stride, width=d, depth=depth, heads=heads, mlp_dim=mlp,
        **(stem.fields if stem is not None else {"in_channels": c}),
        class_token=class_token, global_pool="token" if class_token else "avg", norm_eps=1e-6,
        # The original code resamples position embeddings bilinearly (scipy zoom order 1 in
        # vision_transformer, jax.image.resize "bilinear" in big_vision).
        pos_embed_interp="bilinear",
        **_mean_std(None, None, stem.fields["in_channels"] if stem else c),  # inputs scaled to [-1, 1]
    )
    return Imported({k: v.contiguous() for k, v in sd.items()}, cfg, (grid[0] * stride, grid[1] * stride), num_classes,
                    None, {"ignored_keys": src.ignored, "dropped_keys": dropped, "layout":
                           "big_vision" if big_vision else "vision_transformer"})


# -- format detection, import, resolution for fine-tuning ---------------------------------------


def is_weights_pair(path: str | Path) -> bool:
    """True if `path` is (a directory or file of) one of our weights pairs."""
    path = Path(path)
    meta = path / META_NAME if path.is_dir() else path.with_suffix(".json")
    if path.suffix not in (".safetensors", ".json") and not path.is_dir():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def detect_format(src: str | Path) -> str:
    """timm, hf or npz, from the file suffix or the folder's config.json; an error says what is accepted."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: source weights not found")
    if is_weights_pair(src):
        raise WeightsImportError(f"{src}: already a vitpipe weights pair; use it directly")
    if src.is_dir():
        cfg_path = src / "config.json"
        if not cfg_path.is_file():
            raise WeightsImportError(f"{src}: a folder without config.json; expected a Hugging Face model folder "
                                     "(config.json + model.safetensors) or a timm hub folder")
        config = _read_json(cfg_path)
        if "model_type" in config:
            return "hf"
        if "architecture" in config:
            return "timm"
        raise WeightsImportError(
            f"{cfg_path}: neither a Hugging Face config (model_type) nor a timm one (architecture)")
    if src.suffix == ".npz":
        return "npz"
    if src.suffix == ".safetensors" or src.suffix in TORCH_SUFFIXES:
        return "timm"
    raise WeightsImportError(f"{src}: unknown weights format {src.suffix or '(no suffix)'!r}; expected a timm "
                             ".safetensors/.pth/.bin, a Google .npz or a Hugging Face folder (or pass --format)")


def _timm_file(folder: Path) -> Path:
    for name in (HUB_SAFETENSORS, "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise WeightsImportError(f"{folder}: timm folder without model.safetensors or pytorch_model.bin")


def source_files(src: Path, fmt: str) -> list[Path]:
    """The files whose bytes determine an import (hashed into model.json and the cache key)."""
    if fmt == "hf":
        extra = [src / n for n in ("config.json", "preprocessor_config.json", "model.safetensors.index.json")]
        return [f for f in extra if f.is_file()] + _hf_weights_files(src)
    if fmt == "timm" and src.is_dir():
        return [src / "config.json", _timm_file(src)]
    return [src]


def source_digest(files: Sequence[Path]) -> tuple[str, dict[str, str]]:
    """(digest, per-file sha256): a single file's sha256 itself, else the sha256 of 'name sha' lines."""
    hashes = {f.name: _sha256(f) for f in files if f.is_file()}
    if len(files) == 1 and hashes:
        return next(iter(hashes.values())), hashes
    lines = "".join(f"{n} {h}\n" for n, h in sorted(hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest(), hashes


def read_source(src: str | Path, fmt: str = "auto", heads: Optional[int] = None) -> Imported:
    """Translate the checkpoint `src` (format `fmt`, or detected) to our key names and architecture."""
    src = Path(src)
    if fmt not in ("auto", *FORMATS):
        raise WeightsImportError(f"format {fmt!r} is unknown; use auto, {', '.join(FORMATS)}")
    if not src.exists():
        raise FileNotFoundError(f"{src}: source weights not found")
    fmt = detect_format(src) if fmt == "auto" else fmt
    if fmt == "hf":
        if not src.is_dir():
            raise WeightsImportError(f"{src}: a Hugging Face source is a folder (config.json + model.safetensors)")
        imp = read_hf(src)
    elif fmt == "npz":
        imp = read_npz(src)
    elif src.is_dir():
        imp = read_timm(_timm_file(src), _read_json(src / "config.json"), heads)
    else:
        imp = read_timm(src, None, heads)
    if imp.num_classes == 0:  # headless (no head, or one dropped with its pre-logits layer): an empty one
        imp.state_dict.update({"head.weight": torch.zeros(0, imp.cfg.width), "head.bias": torch.zeros(0)})
    digest, hashes = source_digest(source_files(src, fmt))
    imp.source = {"format": fmt, "path": str(src.resolve()), "sha256": digest, "files": hashes, **imp.source}
    return imp


def import_weights(src: str | Path, out_dir: str | Path, fmt: str = "auto", heads: Optional[int] = None) -> dict:
    """Import `src` into a weights pair in `out_dir`; return its model.json content.

    Everything is read, mapped and checked (a strict load into our model) before anything is written.
    """
    imp = read_source(src, fmt, heads)
    model = build_model(imp.cfg, imp.image_size, imp.num_classes)
    try:
        model.load_state_dict(imp.state_dict, strict=True)  # no layer of ours left at its random init
    except RuntimeError as e:
        raise WeightsImportError(f"{src}: the mapped weights do not fill our model: {e}") from None
    meta = weights_meta(imp.cfg, imp.image_size, imp.num_classes, imp.class_names, stage="import", source=imp.source)
    out_dir = Path(out_dir)
    (out_dir / META_NAME).unlink(missing_ok=True)  # never an old model.json beside new weights
    save_weights_pair(out_dir, model.state_dict(), meta)
    return meta


def resolve_init(src: str | Path, cache_root: str | Path, fmt: str = "auto") -> Path:
    """A weights pair for `src`: `src` itself if it is one, else its import, made once per source hash.

    Imports go to `cache_root/<format>-<sha256[:16]>/`; an existing import whose model.json records
    the same source hash is reused.
    """
    src = Path(src)
    meta = src / META_NAME if src.is_dir() else src.with_suffix(".json")
    if is_weights_pair(src) or (src.suffix in ("", ".safetensors", ".json") and meta.is_file()):
        return src  # ours, or meant to be: model_from_pair says what is wrong with it
    if not src.exists():
        raise FileNotFoundError(f"{src}: weights to start from not found (a weights pair, a timm/HF/.npz checkpoint)")
    fmt = detect_format(src) if fmt == "auto" else fmt
    digest, _ = source_digest(source_files(src, fmt))
    out = Path(cache_root) / f"{fmt}-{digest[:16]}"
    try:
        done = json.loads((out / META_NAME).read_text()).get("source", {}).get("sha256") == digest
    except (OSError, ValueError, AttributeError):
        done = False
    if not done or not (out / WEIGHTS_NAME).is_file():
        import_weights(src, out, fmt)
        print(f"[import] {src} ({fmt}) -> {out}")
    return out
