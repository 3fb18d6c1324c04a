"""The Vision Transformer of Dosovitskiy et al. (2021), optionally with a small ResNet stem (the hybrid).

Torch only: distribution, activation checkpointing and compilation are applied from outside.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # only for annotations; keeps this module free of the config loader at runtime
    from pipeline.config import ModelConfig


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _group_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: statistics do not depend on the (small, per-rank) batch, as in BiT.
    return nn.GroupNorm(math.gcd(32, channels), channels)


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


class ResidualBlock(nn.Module):
    """Basic ResNet block: conv3x3-GN-ReLU-conv3x3-GN plus a (projected) shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.norm1 = _group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.norm2 = _group_norm(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), _group_norm(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNetStem(nn.Module):
    """Small ResNet feature extractor with total stride `stride` (a power of two >= 2)."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        if stride < 2 or stride & (stride - 1):
            raise ValueError(f"stem_stride must be a power of two >= 2, got {stride}")
        n_down = int(math.log2(stride))
        # Root: a 3x3 stride-2 conv (not the 7x7 + max-pool of ImageNet ResNets: images here are small).
        self.root = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, 2, 1, bias=False), _group_norm(channels), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        ch = channels
        if n_down == 1:
            blocks.append(ResidualBlock(ch, ch, 1))  # at least one residual block even at stride 2
        for _ in range(n_down - 1):
            blocks.append(ResidualBlock(ch, ch * 2, 2))  # each further halving doubles the channels
            ch *= 2
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = ch
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.root(x))  # (B, C_out, H/stride, W/stride)


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
        stem_channels: int = 64,
        stem_stride: int = 4,
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
        # The hybrid's "patches" are single pixels of the stem's map, so the stem stride plays P's role.
        self.patch_size = stem_stride if hybrid else patch_size
        h, w = self.image_size
        if h % self.patch_size or w % self.patch_size:
            what = "the stem stride" if hybrid else "the patch size"
            raise ValueError(f"image size {self.image_size} is not divisible by {what} {self.patch_size}")
        self.grid = (h // self.patch_size, w // self.patch_size)
        n_patches = self.grid[0] * self.grid[1]

        if hybrid:
            self.stem: nn.Module | None = ResNetStem(in_channels, stem_channels, stem_stride)
            self.patch_embed = nn.Conv2d(self.stem.out_channels, width, kernel_size=1)
        else:
            self.stem = None
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
        stem_channels=cfg.stem_channels,
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
    ph, pw = conv.padding  # type: ignore[misc]
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    macs = ho * wo * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw
    return 2 * macs, ho, wo


def _stem_flops(stem: ResNetStem, h: int, w: int) -> int:
    flops, h, w = _conv_flops(stem.root[0], h, w)
    for block in stem.blocks:
        f1, ho, wo = _conv_flops(block.conv1, h, w)
        f2, _, _ = _conv_flops(block.conv2, ho, wo)
        flops += f1 + f2
        if isinstance(block.shortcut, nn.Sequential):
            flops += _conv_flops(block.shortcut[0], h, w)[0]
        h, w = ho, wo
    return flops


def flops_per_image(model: VisionTransformer) -> int:
    """Analytic forward FLOPs for one image: 2 x MACs of every conv and matmul, attention included.

    Counted: stem convs (hybrid), patch embedding, per block the qkv (N*D*3D), scores QK^T (N*N*D),
    attention-weighted values (N*N*D), output projection (N*D*D) and MLP (2*N*D*M) MACs, and the head
    (D*K). Not counted: norms, activations, softmax, residual adds, biases (elementwise, O(N*D)).
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
