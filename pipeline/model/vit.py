"""The Vision Transformer of Dosovitskiy et al. (2021), optionally with a BiT ResNet stem (the hybrid).

Torch only: distribution, activation checkpointing and compilation are applied from outside.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.variants import ROOT_STRIDES, natural_stem_stride

if TYPE_CHECKING:  # only for annotations; keeps this module free of the config loader at runtime
    from pipeline.model.config import ModelConfig


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


# GroupNorm epsilon of the original hybrid code (Flax's default in vit_jax), which trained the
# paper's R50+ViT checkpoints; torch's default (1e-5) would shift imported features slightly.
GN_EPS = 1e-6
# Weight standardization as in vit_jax's `weight_standardize` (the paper's hybrids):
# (w - mean) / (std + 1e-5) per output channel. BiT's own code divides by sqrt(var + 1e-10) and timm
# by sqrt(var + 1e-8); on trained kernels (std >> 1e-5) the three agree to ~1e-4 relative.
WS_EPS = 1e-5


def _group_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: statistics do not depend on the (small, per-rank) batch, as in BiT.
    # 32 groups as in BiT; a stem narrower than 32 channels (tiny test/demo stems) uses fewer.
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=GN_EPS)


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF/Flax 'SAME' padding (before, after): output = ceil(size / stride); the extra pixel goes after."""
    effective = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _pad_after(x: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    """Append `rows` rows and `cols` columns of `value` at the bottom/right: the odd pixel of 'SAME'.

    Concatenation rather than F.pad: the exporter emits opset-18 Pad, which ONNX cannot convert down
    to the opset-17 graphs we ship; the symmetric part of the padding goes to the conv/pool itself.
    """
    if rows:
        x = torch.cat([x, torch.full_like(x[..., :rows, :], value)], dim=-2)
    if cols:
        x = torch.cat([x, torch.full_like(x[..., :cols], value)], dim=-1)
    return x


class StdConv2d(nn.Conv2d):
    """Weight-standardized convolution (BiT) with 'SAME' padding, no bias.

    The kernel of each output channel is standardized in fp32 on every forward (so a bf16 engine
    still standardizes in full precision), then cast to the input's dtype. 'SAME' padding as in the
    original Flax code: for a stride-2 conv on an even input the padding is (0, 1), not torch's (1, 1),
    which matters for imported weights. Image sizes are static per model, so the pads are constants
    in traced/exported graphs.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1):
        super().__init__(in_ch, out_ch, kernel, stride, padding=0, dilation=dilation, bias=False)

    def standardized_weight(self) -> torch.Tensor:
        """The kernel with zero mean and unit (population) std per output channel, in the weight's dtype."""
        w = self.weight.float().flatten(1)  # (out, in * kh * kw)
        n = w.shape[1]
        # Sums divided by n, not mean()/std(): those export as ReduceMean, whose axes became an input
        # only in opset 18, and ONNX's converter cannot lower that to the opset-17 graphs we ship;
        # ReduceSum has taken axes as an input since opset 13. (The exporter folds all of it into
        # the Conv's constant kernel anyway.)
        mean = w.sum(1, keepdim=True) / n
        centered = w - mean
        std = (centered.square().sum(1, keepdim=True) / n).sqrt()
        return (centered / (std + WS_EPS)).reshape(self.weight.shape).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        top, bottom = _same_pad(x.shape[-2], kh, sh, dh)
        left, right = _same_pad(x.shape[-1], kw, sw, dw)
        x = _pad_after(x, bottom - top, right - left)  # 'SAME' puts the odd pixel after
        return F.conv2d(x, self.standardized_weight().to(x.dtype), None, self.stride, (top, left), self.dilation)


class MaxPoolSame(nn.Module):
    """3x3 stride-2 max pool with 'SAME' padding (padded with -inf), as the original's root block."""

    def __init__(self, kernel: int = 3, stride: int = 2):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = _same_pad(x.shape[-2], self.kernel, self.stride, 1)
        left, right = _same_pad(x.shape[-1], self.kernel, self.stride, 1)
        x = _pad_after(x, bottom - top, right - left, float("-inf"))
        return F.max_pool2d(x, self.kernel, self.stride, (top, left))  # torch pads pools with -inf


class Root(nn.Module):
    """The stem's root: conv -> GroupNorm -> ReLU (-> max pool).

    "bit": 7x7 stride-2 conv + 3x3 stride-2 max pool (stride 4), as BiT and the paper's hybrids for
    ImageNet-size inputs. "small": one 3x3 stride-1 conv and no pool (stride 1), for images of tens
    of pixels, where a stride-4 root would leave almost nothing for the stages.
    """

    def __init__(self, in_channels: int, width: int, kind: str):
        super().__init__()
        if kind not in ROOT_STRIDES:
            raise ValueError(f"stem root {kind!r}: use one of {', '.join(ROOT_STRIDES)}")
        big = kind == "bit"
        self.conv = StdConv2d(in_channels, width, 7 if big else 3, 2 if big else 1)
        self.norm = _group_norm(width)
        self.pool: nn.Module = MaxPoolSame() if big else nn.Identity()
        self.stride = ROOT_STRIDES[kind]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.norm(self.conv(x))))


class Downsample(nn.Module):
    """Projection shortcut: 1x1 strided StdConv + GroupNorm."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv = StdConv2d(in_ch, out_ch, 1, stride)
        self.norm = _group_norm(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """The hybrid's bottleneck unit (not pre-activation, as in the paper's code): 1x1 -> 3x3 (stride,
    dilation) -> 1x1, each conv followed by GroupNorm, ReLU after the first two and after the sum."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dilation: int):
        super().__init__()
        mid = out_ch // 4
        self.downsample = Downsample(in_ch, out_ch, stride) if stride != 1 or in_ch != out_ch else None
        self.conv1 = StdConv2d(in_ch, mid, 1)
        self.norm1 = _group_norm(mid)
        self.conv2 = StdConv2d(mid, mid, 3, stride, dilation)
        self.norm2 = _group_norm(mid)
        self.conv3 = StdConv2d(mid, out_ch, 1)
        self.norm3 = _group_norm(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return F.relu(y + shortcut)


class ResNetStage(nn.Module):
    """`depth` bottleneck units; the first one changes width and (maybe) resolution."""

    def __init__(self, in_ch: int, out_ch: int, depth: int, stride: int, dilation: int):
        super().__init__()
        self.blocks = nn.Sequential(
            *(Bottleneck(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, dilation) for i in range(depth))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetStem(nn.Module):
    """BiT-style ResNet feature extractor of the hybrid (GroupNorm, weight-standardized convs, bottlenecks).

    Stage i has bottlenecks of width `width` * 2^i (output 4x that, as in ResNet-50); the first stage
    keeps the root's resolution and each later one halves it, until `stride` is reached; stages past
    it keep the resolution and dilate their 3x3 convs instead (BiT's max output stride). Module names
    follow timm's ResNetV2 (`stem.conv` -> `root.conv`, `stages.N.blocks.M.conv1`, `downsample.conv`)
    so imported state dicts map by prefix.
    """

    def __init__(
        self, in_channels: int, stages: list[int] | tuple[int, ...], width: int = 64,
        root: str = "bit", stride: int | None = None,
    ):
        super().__init__()
        if not stages or min(stages) < 1:
            raise ValueError(f"stem stages: need at least one stage of >= 1 block, got {list(stages)}")
        self.root = Root(in_channels, width, root)
        natural = natural_stem_stride(root, len(stages))
        stride = natural if stride is None else stride
        if stride < self.root.stride or stride > natural or stride & (stride - 1):
            raise ValueError(
                f"stem_stride {stride}: must be a power of two between the {root!r} root's stride "
                f"{self.root.stride} and {natural} ({len(stages)} stages)"
            )
        self.stride = stride
        current, dilation, ch = self.root.stride, 1, width
        layers: list[nn.Module] = []
        for i, depth in enumerate(stages):
            step = 1 if i == 0 else 2
            if current * step > stride:  # stride reached: keep resolution, widen the receptive field
                dilation *= step
                step = 1
            layers.append(ResNetStage(ch, 4 * width * 2**i, depth, step, dilation))
            ch = 4 * width * 2**i
            current *= step
        self.stages = nn.Sequential(*layers)
        self.out_channels = ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.root(x))  # (B, C_out, H/stride, W/stride)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability `p`."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
    return x * mask / keep


def _headless(width: int) -> nn.Linear:
    """A (width -> 0) head: an imported checkpoint without one; fine-tuning replaces it."""
    head = nn.Linear(width, 1)  # built at size 1: torch warns when it initializes a zero-element weight
    head.weight = nn.Parameter(torch.zeros(0, width))
    head.bias = nn.Parameter(torch.zeros(0))
    head.out_features = 0
    return head


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and PyTorch's fused SDPA kernel."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # unflatten/flatten instead of reshape(B, ...): no batch size read in Python, so the ONNX
        # batch axis stays dynamic and torch.compile does not specialize on it.
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim))  # (B, N, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, N, D)


class MLP(nn.Module):
    """The block's two-layer GELU MLP with dropout after each layer (as in the paper)."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm encoder block: x + Attn(LN(x)), then x + MLP(LN(x)), each branch with stochastic depth."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float, drop_path_rate: float,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, mlp_dim, dropout)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class VisionTransformer(nn.Module):
    """ViT: patch (or stem-feature) embedding, [class] token, 1-D position embeddings, L blocks, head.

    Imported checkpoints may instead have no [class] token and average the patch tokens
    (`global_pool="avg"`), with the final norm after pooling (`fc_norm`), as timm allows.
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        num_classes: int,
        in_channels: int = 3,
        hybrid: bool = False,
        stem_root: str = "bit",
        stem_stages: list[int] | tuple[int, ...] = (3, 4, 9),
        stem_width: int = 64,
        stem_stride: int | None = None,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        class_token: bool = True,
        global_pool: str = "token",
        fc_norm: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if global_pool not in ("token", "avg") or (global_pool == "token" and not class_token):
            raise ValueError(f"global_pool {global_pool!r} with class_token={class_token}: use 'token' (needs the "
                             "class token) or 'avg'")
        self.global_pool = global_pool
        self.num_prefix_tokens = 1 if class_token else 0  # the [class] token precedes the patches in pos_embed
        self.image_size = _pair(image_size)
        self.in_channels = in_channels
        self.width = width
        self.hybrid = hybrid
        self.stem: ResNetStem | None = None
        if hybrid:
            self.stem = ResNetStem(in_channels, stem_stages, stem_width, stem_root, stem_stride)
        # The hybrid's "patches" are single pixels of the stem's map, so the stem stride plays P's role.
        self.patch_size = self.stem.stride if self.stem is not None else patch_size
        h, w = self.image_size
        if h % self.patch_size or w % self.patch_size:
            what = "the stem stride" if hybrid else "the patch size"
            raise ValueError(f"image size {self.image_size} is not divisible by {what} {self.patch_size}")
        self.grid = (h // self.patch_size, w // self.patch_size)
        n_patches = self.grid[0] * self.grid[1]

        if self.stem is not None:
            self.patch_embed = nn.Conv2d(self.stem.out_channels, width, kernel_size=1)
        else:
            self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if class_token else None  # (1, 1, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + n_patches, width))  # (1, 1+N, D)
        self.pos_drop = nn.Dropout(dropout)
        # Stochastic depth grows linearly with depth: early blocks are kept almost always.
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(width, heads, mlp_dim, dropout, r, norm_eps) for r in rates)
        # One final LayerNorm: on every token (the paper), or on the pooled vector (timm's fc_norm).
        self.norm = nn.Identity() if fc_norm else nn.LayerNorm(width, eps=norm_eps)
        self.fc_norm = nn.LayerNorm(width, eps=norm_eps) if fc_norm else nn.Identity()
        self.head = nn.Linear(width, num_classes) if num_classes else _headless(width)
        self.num_classes = num_classes
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight.numel():
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d) and m is not self.patch_embed:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, Bottleneck):
                # Each residual unit starts as its shortcut (zero scale on the last norm), as in the
                # original hybrid code (gn3 scale_init=zeros): deep stems train from the first step.
                nn.init.zeros_(m.norm3.weight)
        # LeCun normal for the embedding, as in the reference (big_vision) implementation.
        fan_in = self.patch_embed.in_channels * self.patch_embed.kernel_size[0] * self.patch_embed.kernel_size[1]
        nn.init.trunc_normal_(self.patch_embed.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.patch_embed.bias)

    def reset_head(self, num_classes: int) -> None:
        """Replace the head by a zero-initialized Linear for `num_classes` (the paper's transfer recipe)."""
        head = nn.Linear(self.width, num_classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.head = head.to(device=self.pos_embed.device, dtype=self.pos_embed.dtype)
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, 1+N, D) (B, N, D without a class token), normalized unless fc_norm."""
        # C/H/W are static for a given model, so these checks add no graph breaks or ONNX branches.
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(
                f"expected images of shape (B, {self.in_channels}, {self.image_size[0]}, {self.image_size[1]}), "
                f"got {tuple(x.shape)}; resize/convert the input or build the model at this size"
            )
        if self.stem is not None:
            x = self.stem(x)  # (B, C_stem, gh, gw)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major over the grid
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        x = x + self.pos_embed
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, 1+N, D) -> the representation the head sees (B, D)."""
        if self.global_pool == "token":
            return self.fc_norm(tokens[:, 0])  # the [class] token's output
        return self.fc_norm(tokens[:, self.num_prefix_tokens:].mean(dim=1))  # mean over patch tokens only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.pool(self.forward_features(x)))


def build_model(cfg: ModelConfig, image_size: int | tuple[int, int], num_classes: int) -> VisionTransformer:
    """Build the ViT described by `cfg` for `image_size` inputs and `num_classes` outputs."""
    return VisionTransformer(
        image_size=image_size,
        patch_size=cfg.patch_size,
        width=cfg.width,
        depth=cfg.depth,
        heads=cfg.heads,
        mlp_dim=cfg.mlp_dim,
        num_classes=num_classes,
        in_channels=cfg.in_channels,
        hybrid=cfg.hybrid,
        stem_root=cfg.stem_root,
        stem_stages=cfg.stem_stages,
        stem_width=cfg.stem_width,
        stem_stride=cfg.stem_stride,
        dropout=cfg.dropout,
        drop_path=cfg.drop_path,
        class_token=cfg.class_token,
        global_pool=cfg.global_pool,
        fc_norm=cfg.fc_norm,
        norm_eps=cfg.norm_eps,
    )


NO_DECAY_NAMES = ("pos_embed", "cls_token")


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: decayed weights, and biases/norms/pos_embed/cls_token without decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # ndim <= 1: biases and norm scales; decaying them only hurts (and the paper's code skips them).
        if p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _conv_flops(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int, int]:
    """2 * MACs of `conv` on an (h, w) input, and its output size."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    if isinstance(conv, StdConv2d):  # 'SAME' padding: output = ceil(input / stride)
        ho, wo = -(-h // sh), -(-w // sw)
    else:
        (ph, pw), (dh, dw) = conv.padding, conv.dilation  # type: ignore[misc]
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    macs = ho * wo * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw
    return 2 * macs, ho, wo


def _stem_flops(stem: ResNetStem, h: int, w: int) -> int:
    """Every conv of the stem: root, and per bottleneck conv1-3 and the projection shortcut."""
    flops, h, w = _conv_flops(stem.root.conv, h, w)
    if not isinstance(stem.root.pool, nn.Identity):
        h, w = -(-h // 2), -(-w // 2)  # the max pool: a comparison, not counted, but it halves the map
    for stage in stem.stages:
        for block in stage.blocks:
            f1, _, _ = _conv_flops(block.conv1, h, w)
            f2, ho, wo = _conv_flops(block.conv2, h, w)  # the stride sits on the 3x3 conv
            f3, _, _ = _conv_flops(block.conv3, ho, wo)
            flops += f1 + f2 + f3
            if block.downsample is not None:
                flops += _conv_flops(block.downsample.conv, h, w)[0]
            h, w = ho, wo
    return flops


def flops_per_image(model: VisionTransformer) -> int:
    """Analytic forward FLOPs for one image: 2 x MACs of every conv and matmul, attention included.

    Counted: stem convs (hybrid: root, each bottleneck's 1x1/3x3/1x1 and projection convs), patch
    embedding, per block the qkv (N*D*3D), scores QK^T (N*N*D),
    attention-weighted values (N*N*D), output projection (N*D*D) and MLP (2*N*D*M) MACs, and the head
    (D*K). Not counted: norms, activations, softmax, residual adds, biases (elementwise, O(N*D)), the
    stem's max pool and weight standardization (O(kernel size), once per forward, not per pixel).
    Training costs about 3x this (forward + backward) for MFU.
    """
    h, w = model.image_size
    n = model.grid[0] * model.grid[1]
    tokens = n + model.num_prefix_tokens
    d = model.width
    flops = 0
    if model.stem is not None:
        flops += _stem_flops(model.stem, h, w)
        h, w = model.grid
    flops += _conv_flops(model.patch_embed, h, w)[0]
    for block in model.blocks:
        m = block.mlp.fc1.out_features
        macs = tokens * d * 3 * d + 2 * tokens * tokens * d + tokens * d * d + 2 * tokens * d * m
        flops += 2 * macs
    flops += 2 * d * model.head.out_features
    return int(flops)
