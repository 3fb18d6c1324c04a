"""The "optimized" ONNX graph of a ViT, built node by node from the model's weights with onnx.helper.

Why build it instead of exporting and optimizing: neither ``torch.onnx.export`` nor
``onnxruntime.transformers.optimizer`` (model_type ``vit``) turns our attention into one fused node
(the optimizer's pattern matcher does not recognise the exporter's qkv split; measured: 0 Attention,
24 SkipLayerNormalization, 12 BiasGelu on ViT-S). Our block layout is fixed and known, so the graph
is written directly in the fused form onnxruntime runs fastest on CPU and CUDA:

    images (B, C, H, W) -> [ResNet stem] -> patch embed -> (B, N, D) -> Concat cls -> Add pos
        (patch embed: Reshape/Transpose to patches + MatMul + bias at a fixed size (`_patch_matmul`);
        the Conv for the hybrid's 1x1 projection and for dynamic resolution)
    per block:  LayerNormalization (first block only; later ones follow each residual add below)
                com.microsoft.Attention (fused qkv weights (D, 3D), one node: QK^T, softmax, V, heads)
                MatMul proj -> Add proj bias -> Add residual -> LayerNormalization norm2
                MatMul fc1 -> com.microsoft.BiasGelu (exact erf GELU, as F.gelu) -> MatMul fc2
                -> Add fc2 bias -> Add residual -> LayerNormalization (next block's norm1 / the final norm)
    the last block's MLP runs on the class token only: every later op is per token and only the
    class token reaches the head, so the other N tokens' MLP would be thrown away.
    Gather class token -> Gemm head -> logits (B, classes)

The residual add and the norm after it are two Adds and a LayerNormalization, not one
com.microsoft.SkipLayerNormalization, on CPU: onnxruntime 1.31's CPU SkipLayerNormalization kernel
took 0.48 ms on a (1, 197, 384) tensor where Add + Add + LayerNormalization took 0.08 ms (1 thread;
ViT-S has 24 of them: ~10 ms of a ~90 ms forward, and ~30 % of the int8 graph's time). onnxruntime
does not re-fuse them while the residual sum has a second consumer (it fuses only the final norm,
on the class token). ``skip_layer_norm=True`` writes SkipLayerNormalization, for the fp16 (GPU)
graph: on CUDA it is the fusion onnxruntime's own optimizer targets (not timed here: no GPU), and
kept fp32 it holds the residual stream in fp32 (precision.to_fp16).

`com.microsoft.Attention` takes our fused qkv Linear directly: its weight is (D, 3D) with Q, K, V
concatenated on the last axis, which is ``qkv.weight.T`` (the Linear's output is laid out (3, H, hd)).

With ``dynamic_resolution`` the input's H and W are symbolic and the position embeddings are
resampled inside the graph: ``Resize`` of the (1, D, gh, gw) grid to the input's patch grid with the
model's mode (cubic a=-0.75 or linear, half_pixel, no antialias), which is what
`pipeline.model.pos_embed.resample_pos_embed` computes with ``F.interpolate(align_corners=False)``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from pipeline.model.vit import VisionTransformer

MS_DOMAIN = "com.microsoft"
INPUT_NAME = "images"  # the same names as the plain export (onnx_export.INPUT_NAME / OUTPUT_NAME)
OUTPUT_NAME = "logits"
# The op types whose count says "fused": what model.onnx.json's "fusions" records.
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "BiasGelu",
             "FastGelu", "Gelu", "QAttention", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul")
RESIZE_MODES = {"bicubic": "cubic", "bilinear": "linear"}  # pos_embed.MODES -> ONNX Resize mode
MIN_OPSET = 17  # LayerNormalization entered the default domain at 17


def op_counts(model) -> dict[str, int]:
    """How many nodes of each op type the graph holds (sorted by name)."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def fusions(model) -> dict[str, int]:
    """The fused-op counts of `model` (the FUSED_OPS present), for model.onnx.json."""
    return {k: v for k, v in op_counts(model).items() if k in FUSED_OPS}


class _Builder:
    """Accumulates nodes and initializers; each helper returns its output name."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, hint: str, value: np.ndarray | torch.Tensor) -> str:
        from onnx import numpy_helper

        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, n_out: int = 1,
           domain: str = "", **attrs) -> str | list[str]:
        from onnx import helper

        base = self.name(hint or op_type)
        outs = [base] if n_out == 1 else [f"{base}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).numpy()


def _conv(b: _Builder, x: str, conv: torch.nn.Conv2d, hint: str) -> str:
    ins = [x, b.const(f"{hint}.weight", _f32(conv.weight))]
    if conv.bias is not None:
        ins.append(b.const(f"{hint}.bias", _f32(conv.bias)))
    ph, pw = conv.padding  # type: ignore[misc]
    return b.op("Conv", ins, hint, kernel_shape=list(conv.kernel_size), strides=list(conv.stride),
                pads=[ph, pw, ph, pw], group=conv.groups)


def _patchify_is_exact(model: VisionTransformer) -> bool:
    """Whether the patch Conv is a plain patchify (kernel = stride, no padding, tiling the whole image:
    vit.py refuses sizes the patches do not tile, checked again here because the reshape depends on it)."""
    conv = model.patch_embed
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    gh, gw = model.grid
    return ((kh, kw) == (sh, sw) and tuple(conv.padding) == (0, 0) and conv.groups == 1  # type: ignore[arg-type]
            and tuple(conv.dilation) == (1, 1) and tuple(model.image_size) == (gh * kh, gw * kw))


def _patch_matmul(b: _Builder, x: str, model: VisionTransformer) -> str:
    """The patch embedding as Reshape/Transpose into (B, N, C*p*p) patches + one MatMul + bias: (B, N, D).

    The same products as the Conv (kernel = stride), as a GEMM: onnxruntime's fp32 Conv ran this
    patchify at about half its MatMul rate on ViT-S, and dynamic int8 quantizes a MatMul into its
    fast integer kernel where a Conv became the slow ConvInteger.
    """
    conv = model.patch_embed
    kh, kw = conv.kernel_size
    gh, gw = model.grid
    c, d = conv.in_channels, conv.out_channels
    grid = b.op("Reshape", [x, b.const("patch_grid", np.array([-1, c, gh, kh, gw, kw], np.int64))])
    grid = b.op("Transpose", [grid], "patch_order", perm=[0, 2, 4, 1, 3, 5])  # (B, gh, gw, C, kh, kw): tokens row-major
    flat = b.op("Reshape", [grid, b.const("patch_rows", np.array([-1, gh * gw, c * kh * kw], np.int64))])
    weight = _f32(conv.weight).reshape(d, c * kh * kw).T  # (C*kh*kw, D), rows in the patches' (C, kh, kw) order
    out = b.op("MatMul", [flat, b.const("patch_embed.weight_t", weight)], "patch_embed")
    return b.op("Add", [out, b.const("patch_embed.bias", _f32(conv.bias))], "patches")


def _stem(b: _Builder, x: str, model: VisionTransformer, opset: int) -> str:
    """The hybrid's BiT stem, inlined: torch.onnx.export writes its convolutions, weight
    standardization and GroupNorms (the one exporter of the stem's ops, so this graph cannot drift
    from vit.py), and its nodes and weights become this graph's under a `stem/` prefix."""
    import tempfile
    from pathlib import Path

    import onnx
    from onnx import inliner

    from pipeline.export.onnx_export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model.stem, Path(tmp) / "stem.onnx", image_size=model.image_size,
                           in_channels=model.in_channels, opset=opset)
        stem = inliner.inline_local_functions(onnx.load(str(path)))
    g = stem.graph
    names = {g.input[0].name: x}

    def renamed(name: str) -> str:
        return names.get(name, f"stem/{name}") if name else name

    for init in g.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = renamed(init.name)
        b.inits.append(copy)
    for node in g.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"stem/{node.name or node.op_type}_{len(b.nodes)}"
        copy.input[:] = [renamed(i) for i in node.input]
        copy.output[:] = [renamed(o) for o in node.output]
        b.nodes.append(copy)
    return renamed(g.output[0].name)  # (B, C_stem, H/stride, W/stride)


def _pos_embed(b: _Builder, model: VisionTransformer, grid_map: str, dynamic: bool, mode: str) -> tuple[np.ndarray, str]:
    """(class-token row (1, 1, D) as an array, grid rows (1, N, D) as a graph value, resampled when dynamic)."""
    pos = _f32(model.pos_embed)  # (1, 1+N, D)
    d = model.width
    cls_pos = pos[:, :1]
    if not dynamic:
        return cls_pos, b.const("pos_embed.grid", pos[:, 1:])
    gh, gw = model.grid
    grid = pos[:, 1:].reshape(1, gh, gw, d).transpose(0, 3, 1, 2)  # (1, D, gh, gw), tokens row-major
    # sizes = (1, D, gh', gw') of this input's patch map; Resize needs all four.
    hw = b.op("Slice", [b.op("Shape", [grid_map]), b.const("two", np.array([2], np.int64)),
                        b.const("four", np.array([4], np.int64))], "grid_hw")
    sizes = b.op("Concat", [b.const("one_d", np.array([1, d], np.int64)), hw], "pos_sizes", axis=0)
    resized = b.op("Resize", [b.const("pos_embed.grid2d", np.ascontiguousarray(grid)), "", "", sizes], "pos_resize",
                   mode=RESIZE_MODES[mode], coordinate_transformation_mode="half_pixel",
                   cubic_coeff_a=-0.75, exclude_outside=0, nearest_mode="floor")
    flat = b.op("Reshape", [resized, b.const("pos_flat", np.array([1, d, -1], np.int64))])
    return cls_pos, b.op("Transpose", [flat], "pos_tokens", perm=[0, 2, 1])


def _layer_norm_params(b: _Builder, ln: torch.nn.LayerNorm, hint: str) -> tuple[str, str]:
    return b.const(f"{hint}.weight", _f32(ln.weight)), b.const(f"{hint}.bias", _f32(ln.bias))


def unsupported_features(model: VisionTransformer) -> list[str]:
    """What `model` has that the fused graph does not build (empty: it builds all of it).

    The builder writes the paper's ViT: patch conv (or the hybrid's stem), a class token, token
    pooling, one final norm. timm's pooling variants (imported checkpoints) are not built yet;
    refusing them by name beats a graph that would fail its parity check."""
    found = []
    if model.cls_token is None or model.global_pool != "token":
        found.append(f"no class token / global_pool={model.global_pool!r}")
    if not isinstance(model.fc_norm, torch.nn.Identity):
        found.append("fc_norm after pooling")
    return found


def build_vit_graph(model: VisionTransformer, *, opset: int, dynamic_resolution: bool = False,
                    pos_embed_mode: str = "bicubic", skip_layer_norm: bool = False):
    """The fused inference graph of `model` (eval semantics: no dropout, no drop path) as an onnx.ModelProto.

    `skip_layer_norm`: residual add + norm as com.microsoft.SkipLayerNormalization (the GPU form) instead
    of Add + LayerNormalization (the faster one on onnxruntime's CPU provider; see the module docstring).
    """
    from onnx import TensorProto, helper

    if opset < MIN_OPSET:
        raise ValueError(f"opset: the optimized graph needs opset >= {MIN_OPSET} (LayerNormalization), got {opset}")
    if pos_embed_mode not in RESIZE_MODES:
        raise ValueError(f"pos_embed_mode: {pos_embed_mode!r} is not supported; use one of {', '.join(RESIZE_MODES)}")
    unsupported = unsupported_features(model)
    if unsupported:
        raise ValueError(f"the fused graph builder does not cover this model ({'; '.join(unsupported)}); "
                         "export it with export.variants=[fp32] (torch.onnx.export, parity-checked like every variant)")
    if dynamic_resolution and model.stem is not None:
        raise ValueError("dynamic_resolution: the hybrid's stem is exported at its training size; export the "
                         "hybrid with export.dynamic_resolution=false")
    b = _Builder()
    d, heads = model.width, model.blocks[0].attn.heads if len(model.blocks) else 1
    c = model.in_channels
    h, w = model.image_size

    x = INPUT_NAME
    if model.stem is not None:
        x = _stem(b, x, model, opset)
    if model.stem is None and not dynamic_resolution and _patchify_is_exact(model):
        patches, grid_map = _patch_matmul(b, x, model), ""  # (B, N, D)
    else:
        grid_map = _conv(b, x, model.patch_embed, "patch_embed")  # (B, D, gh, gw)
        patches = b.op("Transpose", [b.op("Reshape", [grid_map, b.const("bdn", np.array([0, d, -1], np.int64))])],
                       "patches", perm=[0, 2, 1])  # (B, N, D), row-major over the grid as in vit.py
    cls_pos, grid_pos = _pos_embed(b, model, grid_map, dynamic_resolution, pos_embed_mode)
    # cls + its position embedding is one constant row, broadcast to the batch: (B, 1, D).
    cls_row = b.const("cls_token_plus_pos", _f32(model.cls_token) + cls_pos)
    batch = b.op("Slice", [b.op("Shape", [INPUT_NAME]), b.const("zero", np.array([0], np.int64)),
                           b.const("one", np.array([1], np.int64))], "batch")
    cls_shape = b.op("Concat", [batch, b.const("one_d_shape", np.array([1, d], np.int64))], "cls_shape", axis=0)
    cls = b.op("Expand", [cls_row, cls_shape], "cls")
    tokens = b.op("Concat", [cls, b.op("Add", [patches, grid_pos], "patches_pos")], "tokens", axis=1)  # (B, 1+N, D)

    # The class token as a (B, 1, D) slice, not a Gather to (B, D): the fused norms expect 3-D input.
    first, second, axis1 = (b.const(n, np.array([v], np.int64)) for n, v in (("first", 0), ("second", 1), ("axis1", 1)))

    def class_token(value: str, hint: str) -> str:
        return b.op("Slice", [value, first, second, axis1], hint)

    def residual_norm(x: str, residual: str, bias: str, norm: torch.nn.LayerNorm, norm_hint: str, hint: str) -> tuple[str, str]:
        """(LN(x + bias + residual), x + bias + residual): a block's residual add and the norm after it."""
        if skip_layer_norm:
            # SkipLayerNormalization(input, skip, gamma, beta, bias) -> (LN(input + skip + bias), _, _, input + skip + bias)
            normed, _, _, total = b.op("SkipLayerNormalization", [x, residual, *_layer_norm_params(b, norm, norm_hint), bias],
                                       hint, n_out=4, domain=MS_DOMAIN, epsilon=float(norm.eps))
            return normed, total
        total = b.op("Add", [b.op("Add", [x, bias], f"{hint}.bias"), residual], f"{hint}.residual")
        return b.op("LayerNormalization", [total, *_layer_norm_params(b, norm, norm_hint)], hint, axis=-1,
                    epsilon=float(norm.eps)), total

    depth = len(model.blocks)
    first_norm, first_hint = (model.blocks[0].norm1, "blocks.0.norm1") if depth else (model.norm, "norm")
    # each norm keeps its own eps (1e-6 for ours and timm's, 1e-12 for Hugging Face ViTs: model.norm_eps)
    normed = b.op("LayerNormalization", [tokens, *_layer_norm_params(b, first_norm, first_hint)], "ln", axis=-1,
                  epsilon=float(first_norm.eps))
    residual = tokens
    for i, blk in enumerate(model.blocks):
        p = f"blocks.{i}"
        attn = b.op("Attention", [normed, b.const(f"{p}.attn.qkv.weight_t", _f32(blk.attn.qkv.weight).T),
                                  b.const(f"{p}.attn.qkv.bias", _f32(blk.attn.qkv.bias))],
                    f"{p}.attn", domain=MS_DOMAIN, num_heads=heads)
        proj = b.op("MatMul", [attn, b.const(f"{p}.attn.proj.weight_t", _f32(blk.attn.proj.weight).T)], f"{p}.proj")
        normed, residual = residual_norm(proj, residual, b.const(f"{p}.proj.bias", _f32(blk.attn.proj.bias)),
                                         blk.norm2, f"{p}.norm2", f"{p}.add_norm1")
        last = i == depth - 1
        if last:  # class token only from here on (see the module docstring)
            normed = class_token(normed, "cls_normed")  # (B, 1, D)
            residual = class_token(residual, "cls_residual")
        hidden = b.op("MatMul", [normed, b.const(f"{p}.mlp.fc1.weight_t", _f32(blk.mlp.fc1.weight).T)], f"{p}.fc1")
        act = b.op("BiasGelu", [hidden, b.const(f"{p}.mlp.fc1.bias", _f32(blk.mlp.fc1.bias))], f"{p}.gelu",
                   domain=MS_DOMAIN)
        out = b.op("MatMul", [act, b.const(f"{p}.mlp.fc2.weight_t", _f32(blk.mlp.fc2.weight).T)], f"{p}.fc2")
        next_norm = model.norm if last else model.blocks[i + 1].norm1
        normed, residual = residual_norm(out, residual, b.const(f"{p}.mlp.fc2.bias", _f32(blk.mlp.fc2.bias)),
                                         next_norm, "norm" if last else f"blocks.{i + 1}.norm1", f"{p}.add_norm2")
    feats = b.op("Flatten", [normed if depth else class_token(normed, "cls_normed")], "cls_features", axis=1)  # (B, D)
    b.op("Gemm", [feats, b.const("head.weight", _f32(model.head.weight)), b.const("head.bias", _f32(model.head.bias))],
                  "head", transB=1)
    b.nodes[-1].output[0] = OUTPUT_NAME

    hw_dims: list = ["height", "width"] if dynamic_resolution else [h, w]
    graph = helper.make_graph(
        b.nodes, "vitpipe_vit_fused",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", c, *hw_dims])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", model.num_classes])],
        initializer=b.inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="vitpipe.graph")
    proto.ir_version = min(proto.ir_version, 10)  # the IR onnxruntime 1.2x reads; onnx may stamp a newer one
    return with_value_info(proto)


def with_value_info(proto):
    """`proto` with dtypes and shapes of every tensor (value_info): the quantizers and the fp16 converter need them.

    onnx's own shape inference stops at com.microsoft ops; onnxruntime's symbolic one knows them.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    return SymbolicShapeInference.infer_shapes(proto, auto_merge=True)

