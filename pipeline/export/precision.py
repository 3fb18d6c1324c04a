"""Lower-precision versions of an fp32 graph: fp16 for GPUs, int8 (dynamic and static) for CPUs.

All three start from the fused graph of `pipeline.export.graph`, so they keep its fused attention:
dynamic quantization turns each ``Attention`` into ``QAttention`` and each MatMul into an integer
matmul with activations quantized per batch at run time (nothing to calibrate); static quantization
inserts QuantizeLinear/DequantizeLinear pairs (QDQ) around the matmuls with activation ranges
calibrated on training images, which onnxruntime fuses into integer kernels when it loads the graph.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# Ops whose weights static quantization converts; norms and attention stay fp32 (QDQ has no fused
# int8 attention, and quantizing a norm's scale saves nothing and costs accuracy).
STATIC_QUANT_OPS = ("MatMul", "Conv", "Gemm")


def _unique_node_names(proto) -> None:
    # convert_float_to_float16 names the Cast it inserts after the tensor, so a tensor that feeds two
    # kept-fp32 nodes gets two nodes of the same name, which onnxruntime rejects.
    seen: Counter = Counter()
    for node in proto.graph.node:
        seen[node.name] += 1
        if seen[node.name] > 1:
            node.name = f"{node.name}_{seen[node.name] - 1}"


def to_fp16(proto, *, keep_io_types: bool = True, fp32_ops: Sequence[str] = ()):
    """An fp16 copy of `proto` (typed, as `build_vit_graph` returns it); `keep_io_types`: fp32 "images"/"logits" at the edges.

    `fp32_ops`: op types kept in fp32 with Casts around them. onnxruntime's fused kernels already
    take fp16 in and out but keep the norm statistics and the attention softmax in fp32 accumulators,
    so none need to be listed for accuracy; the option is there for an op that does lose it.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(proto, keep_io_types=keep_io_types,
                                    op_block_list=list(fp32_ops) or None, disable_shape_infer=True)
    _unique_node_names(half)
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


def _quantizer_options() -> dict:
    from onnx import TensorProto

    # Tensors symbolic inference could not type (none in our graphs) default to fp32 instead of failing.
    return {"DefaultTensorType": TensorProto.FLOAT}


def quantize_int8_dynamic(src: str | Path, dst: str | Path) -> None:
    """Write the dynamic int8 version of the fp32 graph at `src` to `dst` (s8 weights, u8 activations per batch)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False,
                     extra_options=_quantizer_options())


def quantize_int8_static(src: str | Path, dst: str | Path, calibration: ImageBatches) -> None:
    """Write the static (QDQ, per-channel s8 weights, u8 activations) int8 version of `src`, calibrated on `calibration`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(src), str(dst), calibration, quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    op_types_to_quantize=list(STATIC_QUANT_OPS), calibrate_method=CalibrationMethod.MinMax,
                    extra_options=_quantizer_options())
