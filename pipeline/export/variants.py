"""The export variants: which graph each name means, its file name, and how it is written.

    fp32          torch.onnx.export of the model, no fusions: the baseline (model.onnx)
    optimized     the fused fp32 graph of `pipeline.export.graph`, CPU form (model.optimized.onnx)
    fp16          the fused graph, GPU form (SkipLayerNormalization), in fp16, fp32 I/O by default (model.fp16.onnx)
    int8_dynamic  the fused CPU graph, int8 weights, activations quantized per batch, for CPUs
    int8_static   the fused CPU graph, int8 QDQ calibrated on training images, for CPUs

Every file carries the preprocessing in its metadata_props (`preprocessing_metadata`) and is
written through `onnx_export.staged_file`, so a variant that fails while being written leaves no file.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch

from pipeline.config import EXPORT_VARIANTS, ExportConfig
from pipeline.data.eval_stream import iter_split
from pipeline.data.transforms import RESIZE_RULE, SCALE_RULE, make_transform
from pipeline.export import graph as graph_builder
from pipeline.export import precision
from pipeline.export.onnx_export import (ExportError, compare_logits, export_graph, export_onnx, onnx_logits,
                                         ort_session, save_model, set_metadata, staged_file, verify_onnx)
from pipeline.model.vit import VisionTransformer

BUILT = ("optimized", "fp16", "int8_dynamic", "int8_static")  # the variants that start from the fused graph


def variant_file(variant: str) -> str:
    """The file name of `variant`: model.onnx for fp32 (what the benchmark stage reads), model.<variant>.onnx else."""
    if variant not in EXPORT_VARIANTS:
        raise ValueError(f"variant: {variant!r} is not one of {', '.join(EXPORT_VARIANTS)}")
    return "model.onnx" if variant == "fp32" else f"model.{variant}.onnx"




def preprocessing_metadata(meta: dict, weights_sha256: str, dynamic_resolution: bool) -> dict:
    """What a consumer needs to turn an image into the model's input, from the weights pair's model.json."""
    arch = meta["architecture"]
    return {
        "class_names": meta.get("class_names"),
        "num_classes": int(meta["num_classes"]),
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
        "image_size": list(meta["image_size"]),
        "in_channels": int(arch["in_channels"]),
        "resize": RESIZE_RULE,
        "crop": None,
        "scale": SCALE_RULE,
        "pos_embed_interp": meta.get("pos_embed_interp", arch.get("pos_embed_interp", "bicubic")),
        "patch_size": int(arch["stem_stride"] if arch.get("hybrid") else arch["patch_size"]),
        "dynamic_resolution": bool(dynamic_resolution),
        "weights_sha256": weights_sha256,
    }


def write_variants(
    model: VisionTransformer,
    variants: Sequence[str],
    out_dir: str | Path,
    *,
    opset: int,
    metadata: dict,
    dynamic_resolution: bool = False,
    calibration: np.ndarray | None = None,
    fp16_keep_io_types: bool = True,
    fp16_fp32_ops: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write each of `variants` into `out_dir`; return {variant: path}. `calibration`: images for int8_static.

    `fp16_fp32_ops` None: ExportConfig's default (the norms stay fp32).
    """
    if fp16_fp32_ops is None:
        fp16_fp32_ops = ExportConfig().fp16_fp32_ops
    out_dir = Path(out_dir)
    unknown = [v for v in variants if v not in EXPORT_VARIANTS]
    if unknown:
        raise ValueError(f"variants: {unknown} unknown; use some of {', '.join(EXPORT_VARIANTS)}")
    if "int8_static" in variants and (calibration is None or len(calibration) == 0):
        raise ValueError("int8_static: needs calibration images (a sample of the training split)")
    c = model.in_channels
    size = None if dynamic_resolution else model.image_size
    paths: dict[str, Path] = {}
    if "fp32" in variants:
        paths["fp32"] = export_onnx(model, out_dir / variant_file("fp32"), image_size=model.image_size,
                                    in_channels=c, opset=opset, metadata={**metadata, "variant": "fp32",
                                                                           "dynamic_resolution": False})
    if not any(v in BUILT for v in variants):
        return paths
    def fused_graph(skip_layer_norm: bool):
        return graph_builder.build_vit_graph(model, opset=opset, dynamic_resolution=dynamic_resolution,
                                             pos_embed_mode=metadata.get("pos_embed_interp", "bicubic"),
                                             skip_layer_norm=skip_layer_norm)

    # The CPU variants (optimized, int8) use Add + LayerNormalization, the GPU one (fp16) the fused
    # SkipLayerNormalization: each is the faster form on its provider (graph.py's docstring).
    fused = fused_graph(skip_layer_norm=False) if any(v != "fp16" for v in variants if v in BUILT) else None

    def meta_for(variant: str) -> dict:
        return {**metadata, "variant": variant}

    if "optimized" in variants:
        paths["optimized"] = export_graph(_copy(fused), out_dir / variant_file("optimized"), image_size=size,
                                          in_channels=c, opset=opset, metadata=meta_for("optimized"))
    if "fp16" in variants:
        half = precision.to_fp16(fused_graph(skip_layer_norm=True), keep_io_types=fp16_keep_io_types, fp32_ops=fp16_fp32_ops)
        paths["fp16"] = export_graph(half, out_dir / variant_file("fp16"), image_size=size, in_channels=c,
                                     opset=opset, metadata={**meta_for("fp16"), "fp16_keep_io_types": fp16_keep_io_types})
    int8 = [v for v in ("int8_dynamic", "int8_static") if v in variants]
    if int8:
        # The quantizers read and write files: the fused fp32 graph goes to a scratch dir beside the outputs.
        with tempfile.TemporaryDirectory(prefix=".quantize.", dir=out_dir) as scratch:
            src = Path(scratch) / "fused.onnx"
            save_model(fused, src)
            for variant in int8:
                paths[variant] = _quantized(variant, src, out_dir / variant_file(variant), calibration,
                                            image_size=size, in_channels=c, opset=opset, metadata=meta_for(variant))
    return {v: paths[v] for v in variants}


def _copy(proto):
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def _quantized(variant: str, src: Path, path: Path, calibration: np.ndarray | None, *, image_size, in_channels: int,
               opset: int, metadata: dict) -> Path:
    reduce_range = precision.int8_reduce_range()  # 7-bit weights where this CPU's int8 kernels saturate
    with staged_file(path) as tmp:
        try:
            if variant == "int8_dynamic":
                precision.quantize_int8_dynamic(src, tmp, reduce_range=reduce_range)
            else:
                precision.quantize_int8_static(src, tmp, precision.ImageBatches(calibration), reduce_range=reduce_range)
        except Exception as e:
            raise ExportError(f"{path}: {variant} quantization failed: {type(e).__name__}: {e}") from e
        proto = onnx.load(str(tmp))
        set_metadata(proto, {**metadata, "int8_weight_bits": 7 if reduce_range else 8,
                             **({"calibration_images": int(len(calibration))}
                                if variant == "int8_static" and calibration is not None else {})})
        save_model(proto, tmp)
        verify_onnx(tmp, in_channels=in_channels, image_size=image_size, opset=opset, name=path)
    return path


def graph_summary(path: str | Path) -> dict:
    """File size, fusions and op-type counts of a saved graph (for model.onnx.json)."""
    proto = onnx.load(str(path), load_external_data=False)
    return {"bytes": Path(path).stat().st_size, "fusions": graph_builder.fusions(proto),
            "op_counts": graph_builder.op_counts(proto)}


def labelled_images(manifest: str | Path, split: str, n: int | None, meta: dict) -> tuple[torch.Tensor, np.ndarray]:
    """The first `n` (None: all) images of `split`, preprocessed as the model expects (N, C, H, W), and their labels."""
    arch = meta["architecture"]
    h, _ = meta["image_size"]
    transform = make_transform(h, arch["in_channels"], meta["mean"], meta["std"])
    pairs = [(transform(img), label) for _, img, label in itertools.islice(iter_split(manifest, split), n)]
    if not pairs:
        raise ValueError(f"{manifest}: the {split} split is empty; the export checks need its images")
    return torch.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs], dtype=np.int64)


def measure_variant(path: str | Path, reference: np.ndarray, images: torch.Tensor, labels: np.ndarray,
                    n_parity: int, providers: Sequence[str] = ("CPUExecutionProvider",)) -> tuple[dict, dict, object]:
    """(parity on the first `n_parity` images, top-1 accuracy on all, the session) of one variant file.

    `reference`: PyTorch fp32 logits of `images`; accuracy "drop_points" is PyTorch's top-1 minus
    this variant's, in points (percent).
    """
    session, used = ort_session(path, providers=list(providers))
    got = onnx_logits(session, images)
    parity = {**compare_logits(reference[:n_parity], got[:n_parity], path), "batch_size": 64, "providers": used}
    acc = float((got.argmax(1) == labels).mean())
    torch_acc = float((reference.argmax(1) == labels).mean())
    accuracy = {"top1": acc, "torch_fp32_top1": torch_acc, "drop_points": 100.0 * (torch_acc - acc),
                "n_images": int(len(labels))}
    return parity, accuracy, session
