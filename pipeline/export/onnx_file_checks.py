"""Checks of an ONNX file made before onnxruntime sees it: where its weights live, what input it takes.

An ONNX file can keep tensors in "external data" files named by a relative ``location``; onnxruntime
and onnx resolve it against the model's folder, and a location such as ``../../etc/passwd`` or
``/home/user/.ssh/id_rsa`` would have them read any file this process can read. Every location
must stay inside the model's folder (symlinks resolved), or the file is refused, by name, before
a session exists.

A model whose input does not fit the recipe (3x32x32 for a 1x28x28 model) would otherwise fail
deep inside ``session.run`` with onnxruntime's own shape message; `check_input_shape` names the
file, the input shape it declares and the one expected. Symbolic dims (a dynamic batch, or a
dynamic-resolution export) fit any size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


class OnnxFileError(ValueError):
    """An ONNX file that must not be opened or does not fit; the message names the file and why."""


def _load_proto(path: Path):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise OnnxFileError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None


def _tensors_with_data(proto):
    """Every TensorProto of the model that may point at external data: initializers, constants, subgraphs."""
    from onnx import external_data_helper

    yield from external_data_helper._get_all_tensors(proto)


def external_data_locations(proto) -> list[str]:
    """The `location` of every tensor stored as external data, in model order, duplicates removed."""
    from onnx import TensorProto

    seen: list[str] = []
    for tensor in _tensors_with_data(proto):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location not in seen:
            seen.append(location)
    return seen


def check_external_data(path: str | os.PathLike, proto=None) -> list[Path]:
    """Refuse an ONNX file whose external-data locations leave its folder; return the data files it uses."""
    path = Path(path)
    proto = proto if proto is not None else _load_proto(path)
    folder = path.resolve().parent
    files = []
    for location in external_data_locations(proto):
        target = Path(location)
        if not location or target.is_absolute() or target.drive:
            raise OnnxFileError(f"{path}: refused: external data location {location!r} is not a relative path "
                                f"inside the model's folder {folder}")
        resolved = (folder / target).resolve()  # follows symlinks: a link out of the folder is refused too
        if resolved != folder and folder not in resolved.parents:
            raise OnnxFileError(f"{path}: refused: external data location {location!r} points outside the "
                                f"model's folder {folder} (to {resolved})")
        if not resolved.is_file():
            raise OnnxFileError(f"{path}: external data file {location!r} not found in {folder}")
        files.append(resolved)
    return files


def _dims(value_info) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def input_shape(path: str | os.PathLike, input_name: str, proto=None) -> list[int | str]:
    """The declared shape of graph input `input_name` (ints, or names for symbolic dims)."""
    path = Path(path)
    proto = proto if proto is not None else _load_proto(path)
    for value in proto.graph.input:
        if value.name == input_name:
            return _dims(value)
    names = [v.name for v in proto.graph.input]
    raise OnnxFileError(f"{path}: no graph input named {input_name!r}; its inputs are {names}")


def check_input_shape(path: str | os.PathLike, input_name: str, in_channels: int,
                      image_size: int | Sequence[int], proto=None) -> list[int | str]:
    """Refuse a model whose input is not (batch, C, H, W) for this model's C, H, W; return the shape."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    expected = ["batch", in_channels, h, w]
    shape = input_shape(path, input_name, proto)
    fits = len(shape) == 4 and all(isinstance(got, str) or got == want for got, want in zip(shape[1:], expected[1:]))
    if not fits:
        show = lambda dims: "(" + ", ".join(str(d) for d in dims) + ")"  # noqa: E731
        raise OnnxFileError(f"{path}: input {input_name!r} has shape {show(shape)}, but the model it is "
                            f"benchmarked or served as takes {show(expected)} (channels, height, width from "
                            "its weights or metadata); export this model again or point at the right file")
    return shape
