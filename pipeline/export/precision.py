"""Lower-precision versions of an fp32 graph: fp16 for GPUs, int8 (dynamic and static) for CPUs.

All three start from the fused graph of `pipeline.export.graph`, so they keep its fused attention:
dynamic quantization turns each ``Attention`` into ``QAttention`` and each MatMul into an integer
matmul with activations quantized per batch at run time (nothing to calibrate; Convs stay fp32,
see DYNAMIC_QUANT_OPS); static quantization
inserts QuantizeLinear/DequantizeLinear pairs (QDQ) around the matmuls with activation ranges
calibrated on training images, which onnxruntime fuses into integer kernels when it loads the graph.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# Ops whose weights static quantization converts; norms and attention stay fp32 (QDQ has no fused
# int8 attention, and quantizing a norm's scale saves nothing and costs accuracy).
STATIC_QUANT_OPS = ("MatMul", "Conv", "Gemm")
# Ops dynamic quantization converts: the matmuls (QAttention, DynamicQuantizeMatMul; the fused
# graph's patch embedding is a MatMul at a fixed size). A Conv (the patch embedding with dynamic
# resolution, the hybrid's stem) stays fp32: as ConvInteger ViT-S's patch Conv took 13.0 ms of a
# forward against 1.7 ms in fp32 (onnxruntime 1.31, 2 threads), more than the int8 MatMuls of a
# block saved. The head (a Gemm) is converted to MatMul by the quantizer and quantized with them.
DYNAMIC_QUANT_OPS = ("MatMul", "Attention")
PER_CHANNEL = False


def cpu_has_vnni(cpuinfo: str | None = None) -> bool:
    """Whether this x86 CPU has VNNI int8 dot products (AVX512-VNNI or AVX-VNNI); True elsewhere.

    Without VNNI, onnxruntime's u8 x s8 kernels on x86 multiply with VPMADDUBSW, whose 16-bit
    pairwise sums saturate for large weights and activations: the quantized model loses accuracy
    (on a 2-core AMD EPYC with AVX2 only, static int8 fell 2.6 points below fp32 on held-out digits,
    within 0.5 on AVX512-VNNI Xeons). Quantizing with 7-bit weights (``reduce_range``) avoids it."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True  # ARM's int8 dot products do not saturate this way
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True  # unknown: keep full-range weights
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_reduce_range() -> bool:
    """7-bit int8 weights for the quantized variants: where this machine's kernels would saturate
    (x86 without VNNI). Recorded in the variant's metadata: a model quantized here also runs, at
    the same accuracy, on a VNNI machine or a GPU; one quantized on a VNNI machine loses accuracy
    on an AVX2-only CPU."""
    return not cpu_has_vnni()


def _deduplicate_casts(proto) -> None:
    # convert_float_to_float16 inserts one Cast per consumer of a tensor that feeds kept-fp32 nodes,
    # all with the same output name (and node name): identical nodes, which onnx's SSA rule and
    # onnxruntime reject. Keep the first of each.
    seen: set = set()
    kept = []
    for node in proto.graph.node:
        key = (node.op_type, tuple(node.input), tuple(node.output), node.SerializeToString())
        if node.op_type == "Cast" and key in seen:
            continue
        seen.add(key)
        kept.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    names: Counter = Counter()
    for node in proto.graph.node:  # any remaining clash of node names (outputs differ) gets a suffix
        names[node.name] += 1
        if names[node.name] > 1:
            node.name = f"{node.name}_{names[node.name] - 1}"


def _topological_order(proto) -> None:
    # The converter appends the Casts of the graph inputs at the end; onnx's checker needs producers first.
    available = {i.name for i in proto.graph.input} | {t.name for t in proto.graph.initializer} | {""}
    pending, ordered = list(proto.graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError(f"fp16 graph has a cycle or a missing input at {pending[0].name}")
        for n in ready:
            available.update(n.output)
        ordered += ready
        pending = [n for n in pending if all(n is not r for r in ready)]
    del proto.graph.node[:]
    proto.graph.node.extend(ordered)


def to_fp16(proto, *, keep_io_types: bool = True, fp32_ops: Sequence[str] = ()):
    """An fp16 copy of `proto` (typed, as `build_vit_graph` returns it); `keep_io_types`: fp32 "images"/"logits" at the edges.

    `fp32_ops`: op types kept in fp32 with Casts around them. The export stage keeps the norms
    there (`export.fp16_fp32_ops`): SkipLayerNormalization also carries the residual sum, so the
    residual stream stays fp32 and only the matmuls, attention and GELU run in fp16; measured on
    the trained digits model of tests/test_export_variants.py: max |dlogit| 1.2e-2 with every op
    in fp16, 6.6e-3 with the norms in fp32. The attention softmax runs inside the fused Attention
    kernel, which accumulates in fp32 on CUDA.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    import onnx

    half = onnx.ModelProto()
    half.CopyFrom(proto)  # the converter works in place; the caller's fp32 graph stays fp32
    half = convert_float_to_float16(half, keep_io_types=keep_io_types,
                                    op_block_list=list(fp32_ops) or None, disable_shape_infer=True)
    _deduplicate_casts(half)
    _topological_order(half)
    return half


class ImageBatches:
    """An onnxruntime CalibrationDataReader over preprocessed images (N, C, H, W) in fixed-size batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 16, input_name: str = "images"):
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"calibration images: expected a non-empty (N, C, H, W) array, got {images.shape}")
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.batch_size = batch_size
        self.input_name = input_name
        self._batches: Iterable | None = None
        self.rewind()

    def rewind(self) -> None:
        self._batches = iter(range(0, len(self.images), self.batch_size))

    def get_next(self) -> dict | None:
        start = next(self._batches, None)  # type: ignore[arg-type]
        if start is None:
            return None
        return {self.input_name: self.images[start : start + self.batch_size]}


@contextlib.contextmanager
def _quiet_quantizer():
    """Hide the quantizer's root-logger advice to run its pre-processing: our graph is already shape-typed."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _quantizer_options() -> dict:
    from onnx import TensorProto

    # Tensors symbolic inference could not type (none in our graphs) default to fp32 instead of failing.
    return {"DefaultTensorType": TensorProto.FLOAT}


def quantize_int8_dynamic(src: str | Path, dst: str | Path, per_channel: bool = PER_CHANNEL,
                          reduce_range: bool = False) -> None:
    """Write the dynamic int8 version of the fp32 graph at `src` to `dst` (s8 weights, u8 activations per batch).

    Only constant weights are quantized (MatMulConstBOnly: the attention's QK^T and softmax x V run
    inside QAttention in fp32 anyway); `per_channel`: one weight scale per output column.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_quantizer():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                         reduce_range=reduce_range, op_types_to_quantize=list(DYNAMIC_QUANT_OPS),
                         extra_options={**_quantizer_options(), "MatMulConstBOnly": True})


def quantize_int8_static(src: str | Path, dst: str | Path, calibration: ImageBatches,
                         reduce_range: bool = False) -> None:
    """Write the static (QDQ, per-channel s8 weights, u8 activations) int8 version of `src`, calibrated on `calibration`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with _quiet_quantizer():
        quantize_static(str(src), str(dst), calibration, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=list(STATIC_QUANT_OPS), calibrate_method=CalibrationMethod.MinMax,
                        extra_options=_quantizer_options())
