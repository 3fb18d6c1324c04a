"""ONNX export of a ViT, how every ONNX file is written, onnxruntime sessions, and the parity check.

Here: `export_onnx` (the plain torch export), `export_graph` (any built or converted graph), the
staged write both use, the opset range (`check_opset`), metadata_props (`set_metadata` /
`read_metadata`), `session_options`/`ort_session`, and logits/parity helpers. The fused graph is
built in graph.py, its fp16/int8 versions in precision.py, the variants in variants.py.

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
import functools
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.atomic import move_into_place
from pipeline.export.onnx_file_checks import check_external_data
from pipeline.export.providers import default_providers as usable_default_providers

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
EXAMPLE_BATCH = 2  # not 0 or 1: torch.export specializes those sizes, which would pin the batch dim
# The opset torch's ONNX exporter (torchlib) is written for: below it the exporter emits 18 anyway and
# down-converts with a warning (what opset 17 used to do); at or above it the graph is emitted natively.
EXPORTER_OPSET = 18
METADATA_PREFIX = "vitpipe."  # metadata_props keys; values are JSON


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


def model_device(model: nn.Module) -> torch.device:
    """Where the model's tensors are (the export's example input goes there too)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@functools.lru_cache(maxsize=1)
def runtime_max_opset() -> int:
    """The newest default-domain opset the installed onnxruntime loads (probed with a one-node model)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", value[:1], value[1:])
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the probe's refusals are expected, not worth a red line
    for opset in range(onnx.defs.onnx_opset_version(), EXPORTER_OPSET - 1, -1):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 10
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return opset
        except Exception:
            continue
    return EXPORTER_OPSET - 1  # not even the exporter's own opset runs: every request is refused


def supported_opsets() -> tuple[int, int]:
    """(lowest, highest) opset an export may ask for: the exporter's native one up to what onnxruntime runs."""
    return EXPORTER_OPSET, runtime_max_opset()


def check_opset(opset: int) -> None:
    """Refuse, before any work, an opset the exporter would down-convert or onnxruntime cannot run."""
    import onnxruntime as ort

    lo, hi = supported_opsets()
    if not lo <= opset <= hi:
        raise ExportError(
            f"export.opset: {opset} is outside the supported range {lo}..{hi} (the torch exporter emits opset "
            f"{lo} natively; onnxruntime {ort.__version__} runs up to {hi}); set export.opset={lo}"
        )


@contextlib.contextmanager
def staged_file(path: str | os.PathLike):
    """Yield a temporary path with `path`'s name in a temp dir beside it; on success move it (and its .data) into place.

    A failure inside the block leaves nothing at `path`: the temp dir is removed either way.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise ExportError(f"{path}: cannot export, the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"{path}: cannot export, the directory {parent} is not writable")
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise ExportError(f"{path}: cannot create a temporary directory next to it: {e}") from e
    try:
        tmp = tmp_dir / path.name
        yield tmp
        # The data file first, so the .onnx never points at weights that are not there yet.
        data = tmp_dir / f"{path.name}.data"
        if data.exists():
            move_into_place(data, parent / data.name)
        move_into_place(tmp, path)
    except OSError as e:
        raise ExportError(f"{path}: writing the exported model failed: {e}") from e
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def save_model(proto, path: str | os.PathLike) -> None:
    """Save an onnx.ModelProto, inline below 2 GB (one self-contained file), as `<name>.data` above."""
    import onnx

    if proto.ByteSize() > 2**31 - 2**20:  # protobuf's 2 GB limit, with room for the graph itself
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{Path(path).name}.data")
    else:
        onnx.save_model(proto, str(path))


def set_metadata(proto, metadata: dict[str, Any]) -> None:
    """Write `metadata` into the model's metadata_props as ``vitpipe.<key>`` = JSON (replacing old values)."""
    keep = [p for p in proto.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, json.dumps(value)


def read_metadata(source: Any) -> dict[str, Any]:
    """The ``vitpipe.*`` metadata of an onnxruntime session or an .onnx path, keys without the prefix."""
    if isinstance(source, (str, os.PathLike)):
        import onnx

        props = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    else:
        props = dict(source.get_modelmeta().custom_metadata_map)
    return {k[len(METADATA_PREFIX):]: json.loads(v) for k, v in props.items() if k.startswith(METADATA_PREFIX)}


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's per-call notices that are not about our model (torchvision op registration)."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    image_size: int | Sequence[int],
    in_channels: int,
    opset: int = EXPORTER_OPSET,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Export `model` (eval, fp32) with torch.onnx.export to `path`: "images" (batch, C, H, W) -> "logits".

    `metadata` (if given) goes into the file's metadata_props (see `set_metadata`). Returns the path.
    """
    path = Path(path)
    h, w = _hw(image_size)
    if opset < EXPORTER_OPSET:
        raise ExportError(f"{path}: opset {opset} is below the exporter's native {EXPORTER_OPSET}; "
                          f"asking for it means a lossy down-conversion. Use opset >= {EXPORTER_OPSET}")
    net = _fp32(model)
    example = torch.randn(EXAMPLE_BATCH, in_channels, h, w, device=model_device(net))
    with staged_file(path) as tmp:
        with _eval_mode(net), torch.no_grad(), _quiet_exporter():
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
        for key, value in (metadata or {}).items():  # the exporter's IR model carries metadata_props through save
            program.model.metadata_props[METADATA_PREFIX + key] = json.dumps(value)
        # Weights inline below 2 GB (one self-contained file); the exporter switches to
        # `<name>.data` by itself above that, where protobuf cannot hold them.
        program.save(tmp, external_data=False)
        verify_onnx(tmp, in_channels=in_channels, image_size=(h, w), opset=opset, name=path)
    return path


def export_graph(
    proto,
    path: str | os.PathLike,
    *,
    image_size: int | Sequence[int] | None,
    in_channels: int,
    opset: int,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save a built or converted onnx.ModelProto to `path` the way `export_onnx` does (staged, checked).

    `image_size` None: the graph takes any H and W (symbolic dims), as a dynamic-resolution graph does.
    """
    path = Path(path)
    if metadata:
        set_metadata(proto, metadata)
    with staged_file(path) as tmp:
        save_model(proto, tmp)
        verify_onnx(tmp, in_channels=in_channels, image_size=image_size, opset=opset, name=path)
    return path


def verify_onnx(
    path: str | os.PathLike,
    *,
    in_channels: int,
    image_size: int | Sequence[int] | None,
    opset: int | None = None,
    name: str | os.PathLike | None = None,
) -> None:
    """Run the ONNX checker and check the "images" input is (symbolic batch, C, H, W); raise ExportError.

    `image_size` None: H and W must be symbolic (a dynamic-resolution graph).
    """
    import onnx

    path = Path(path)
    name = name or path
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
    if image_size is None:
        ok = static[0] == in_channels and all(isinstance(v, str) and v for v in static[1:])
        expected: tuple = (in_channels, "symbolic H", "symbolic W")
    else:
        expected = (in_channels, *_hw(image_size))
        ok = static == expected
    if not ok:
        raise ExportError(f"{name}: input {INPUT_NAME!r} has (C, H, W) = {static}, expected {expected}")
    if not any(o.name == OUTPUT_NAME for o in proto.graph.output):
        raise ExportError(f"{name}: no graph output named {OUTPUT_NAME!r}")


def default_providers() -> list[str]:
    """CUDA first when it can really run here (its libraries load, a device exists), then CPU."""
    return usable_default_providers()


def physical_cores() -> int:
    """Cores this process may run on, counting SMT siblings once: the intra-op thread count that degrades gracefully."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or usable
    except ImportError:
        physical = usable
    return max(1, min(usable, physical))


def session_options(threads: int = 0, spinning: bool = False):
    """onnxruntime options that hold up on a shared CPU.

    Intra-op threads default to the physical cores (0), not onnxruntime's "all logical CPUs": an SMT
    sibling adds little to a matmul and a thread pool wider than the free cores waits on its
    slowest thread every op. Spinning is off by default: a spinning pool burns the cores another
    job needs, and when that job runs the spin-waits are descheduled mid-barrier; measured in
    `vitpipe bench export`, busy case.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads > 0 else physical_cores()
    options.inter_op_num_threads = 1  # a ViT is one chain of ops: nothing to run in parallel between them
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def ort_session(
    path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int = 0, spinning: bool = False
) -> tuple[Any, list[str]]:
    """Open an onnxruntime session (options: `session_options`); return it and the providers it really got."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ONNX model not found")
    check_external_data(path)  # before onnxruntime reads any weights file the model names
    options = session_options(threads, spinning)
    requested = list(providers) if providers else default_providers()
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=requested)
    except Exception as e:
        raise RuntimeError(f"{path}: onnxruntime could not open the model with {requested}: {e}") from e
    # onnxruntime-gpu lists CUDA as available even when its libraries fail to load, and then
    # silently falls back; get_providers() is what the session actually uses.
    used = list(session.get_providers())
    return session, used


def onnx_logits(session: Any, images: torch.Tensor | np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The session's "logits" for `images` (N, C, H, W), in batches, as float32 (N, classes)."""
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    x = images.detach().to(torch.float32).cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    # An fp16 graph without fp32 I/O (keep_io_types off) takes fp16: feed what the graph declares.
    feed_dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    out = [session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch_size].astype(feed_dtype)})[0]
           for i in range(0, len(x), batch_size)]  # the last batch may be smaller
    return np.concatenate(out).astype(np.float32)


@torch.inference_mode()
def torch_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """`model`'s fp32 logits for `images` (N, C, H, W), in batches, as float32 (N, classes)."""
    net = _fp32(model)
    device = model_device(net)
    images = images.detach().to(torch.float32).cpu()
    with _eval_mode(net):
        out = [net(images[i : i + batch_size].to(device)).float().cpu().numpy() for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def compare_logits(ref: np.ndarray, got: np.ndarray, name: str | os.PathLike = "onnx") -> dict:
    """Parity figures of `got` against the reference logits `ref` (both (N, classes))."""
    if ref.shape != got.shape:
        raise RuntimeError(f"{name}: onnxruntime logits have shape {got.shape}, PyTorch {ref.shape}")
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    diff = np.abs(ref - got)
    agree = ref.argmax(axis=1) == got.argmax(axis=1)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float(agree.mean()),
        "n_images": int(len(ref)),
        "disagreements": int((~agree).sum()),
    }


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
    ref = torch_logits(model, images, batch_size)
    got = onnx_logits(session, images, batch_size)
    return {**compare_logits(ref, got, onnx_path), "batch_size": int(batch_size), "providers": providers}
