"""ONNX export of a ViT, onnxruntime sessions, and the PyTorch-vs-onnxruntime parity check.

Exporter choice: the torch.export-based ("dynamo") exporter, ``torch.onnx.export(..., dynamo=True)``.
It is the default since PyTorch 2.9, the TorchScript exporter is deprecated (it warns on every call),
and on our ViT it gives a much smaller graph (about a third of the nodes: no Shape/Cast/Where
scaffolding around attention) with a symbolic batch dimension declared through ``dynamic_shapes``.
A model that specializes on the batch size fails loudly at export instead of silently baking it in.

Files are written the way every stage writes them (ARCHITECTURE.md): into a temporary directory
next to the target, checked there, then renamed into place, so a failed export leaves nothing
that looks complete. The temporary directory keeps the final file name, because a model over 2 GB
stores its weights in ``<name>.data`` and the .onnx file refers to that name.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.export.onnx_file_checks import check_external_data
from pipeline.export.providers import default_providers as usable_default_providers

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
EXAMPLE_BATCH = 2  # not 0 or 1: torch.export specializes those sizes, which would pin the batch dim


class ExportError(RuntimeError):
    """An export that failed or produced a model that does not match its contract; names the path."""


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Put `model` in eval mode for the duration, then restore its training flag."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _fp32(model: nn.Module) -> nn.Module:
    """`model` itself when all its floating tensors are fp32, else an fp32 copy (the caller's is untouched)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.dtype == torch.float32 for t in tensors if t.is_floating_point()):
        return model
    return copy.deepcopy(model).float()


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    image_size: int | Sequence[int],
    in_channels: int,
    opset: int = 17,
) -> Path:
    """Export `model` (eval, fp32) to `path` with input "images" (batch, C, H, W) -> "logits"; return the path."""
    path = Path(path)
    h, w = _hw(image_size)
    parent = path.parent
    if not parent.is_dir():
        raise ExportError(f"{path}: cannot export, the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"{path}: cannot export, the directory {parent} is not writable")

    net = _fp32(model)
    example = torch.randn(EXAMPLE_BATCH, in_channels, h, w, device=_device(net))
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise ExportError(f"{path}: cannot create a temporary directory next to it: {e}") from e
    try:
        tmp = tmp_dir / path.name
        with _eval_mode(net), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            try:
                program = torch.onnx.export(
                    net,
                    (example,),
                    f=None,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    opset_version=opset,
                    dynamo=True,
                    dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},),
                    verbose=False,
                )
            except Exception as e:
                raise ExportError(f"{path}: torch.onnx.export failed: {type(e).__name__}: {e}") from e
        # Weights inline below 2 GB (one self-contained file); the exporter switches to
        # `<name>.data` by itself above that, where protobuf cannot hold them.
        program.save(tmp, external_data=False)
        verify_onnx(tmp, in_channels=in_channels, image_size=(h, w), opset=opset, name=path)
        # The data file first, so the .onnx never points at weights that are not there yet.
        data = tmp_dir / f"{path.name}.data"
        if data.exists():
            os.replace(data, parent / data.name)
        os.replace(tmp, path)
    except OSError as e:
        raise ExportError(f"{path}: writing the exported model failed: {e}") from e
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def verify_onnx(
    path: str | os.PathLike,
    *,
    in_channels: int,
    image_size: int | Sequence[int],
    opset: int | None = None,
    name: str | os.PathLike | None = None,
) -> None:
    """Run the ONNX checker and check the "images" input is (symbolic batch, C, H, W); raise ExportError."""
    import onnx

    path = Path(path)
    name = name or path
    h, w = _hw(image_size)
    try:
        # By path, not by loaded proto: the only form that works for models over 2 GB.
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"{name}: ONNX checker rejected the model: {e}") from e
    proto = onnx.load(str(path), load_external_data=False)
    if opset is not None:
        got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if got != opset:
            raise ExportError(f"{name}: asked for opset {opset} but the model declares opset {got}")
    inputs = [i for i in proto.graph.input if i.name == INPUT_NAME]
    if not inputs:
        names = [i.name for i in proto.graph.input]
        raise ExportError(f"{name}: no graph input named {INPUT_NAME!r}; inputs are {names}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ExportError(f"{name}: input {INPUT_NAME!r} has rank {len(dims)}, expected 4 (batch, C, H, W)")
    if dims[0].HasField("dim_value") or not dims[0].dim_param:
        raise ExportError(
            f"{name}: the batch dim of {INPUT_NAME!r} is fixed ({dims[0].dim_value}), expected a symbolic dim"
        )
    static = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims[1:])
    if static != (in_channels, h, w):
        raise ExportError(f"{name}: input {INPUT_NAME!r} has (C, H, W) = {static}, expected {(in_channels, h, w)}")
    if not any(o.name == OUTPUT_NAME for o in proto.graph.output):
        raise ExportError(f"{name}: no graph output named {OUTPUT_NAME!r}")


def default_providers() -> list[str]:
    """CUDA first when it can really run here (its libraries load, a device exists), then CPU."""
    return usable_default_providers()


def ort_session(
    path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int = 0
) -> tuple[Any, list[str]]:
    """Open an onnxruntime session; return it and the providers it really got (not the ones asked for)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ONNX model not found")
    check_external_data(path)  # before onnxruntime reads any weights file the model names
    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
    requested = list(providers) if providers else default_providers()
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=requested)
    except Exception as e:
        raise RuntimeError(f"{path}: onnxruntime could not open the model with {requested}: {e}") from e
    # onnxruntime-gpu lists CUDA as available even when its libraries fail to load, and then
    # silently falls back; get_providers() is what the session actually uses.
    used = list(session.get_providers())
    return session, used


@torch.inference_mode()
def check_parity(
    onnx_path: str | os.PathLike,
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 64,
    session: Any = None,
) -> dict:
    """Compare fp32 logits of `model` and the ONNX model on the same `images` (N, C, H, W), in batches."""
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images: expected a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if session is None:
        session, providers = ort_session(onnx_path)
    else:
        providers = list(session.get_providers())
    net = _fp32(model)
    device = _device(net)
    images = images.detach().to(torch.float32).cpu()
    torch_out, ort_out = [], []
    with _eval_mode(net):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]  # (b, C, H, W); the last one may be smaller
            torch_out.append(net(batch.to(device)).float().cpu().numpy())
            ort_out.append(session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0])
    ref = np.concatenate(torch_out).astype(np.float64)  # (N, classes)
    got = np.concatenate(ort_out).astype(np.float64)
    if ref.shape != got.shape:
        raise RuntimeError(f"{onnx_path}: onnxruntime logits have shape {got.shape}, PyTorch {ref.shape}")
    diff = np.abs(ref - got)
    agree = ref.argmax(axis=1) == got.argmax(axis=1)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float(agree.mean()),
        "n_images": int(len(images)),
        "disagreements": int((~agree).sum()),
        "batch_size": int(batch_size),
        "providers": providers,
    }
