"""`vitpipe predict MODEL IMAGE...`: top-k classes of image files, from any form of the model.

MODEL is a model.onnx or any exported variant (preprocessing from model.onnx.json beside it, else
from the file's own vitpipe.* metadata_props), a weights pair (model.safetensors / model.json / their folder, run in PyTorch),
a folder holding either, or a registry URI ``models:/<name>/<version>`` (the metadata logged
with it). Every form goes through the one image transform training and evaluation use
(`pipeline.data.transforms.make_transform`: to L or RGB, bicubic resize, /255, (x - mean) / std), so
the same image gives the same input tensor whichever form is asked.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.data.sources import FOLDER_IMAGE_EXTENSIONS, images_below
from pipeline.data.transforms import RESIZE_RULE, make_transform
from pipeline.export.onnx_export import INPUT_NAME, OUTPUT_NAME, ort_session, read_metadata
from pipeline.run_layout import ONNX_FILE, WEIGHTS_FILE
from pipeline.export.onnx_file_checks import check_external_data, check_input_shape

SUPPORTED_RESIZE = ("bicubic",)


@dataclass
class Preprocessing:
    """What turns an image file into the model's input, and its logits into names."""

    in_channels: int
    image_size: tuple[int, int]
    mean: list[float]
    std: list[float]
    class_names: list[str]
    resize: str = "bicubic"

    @classmethod
    def from_metadata(cls, meta: dict, where: str) -> "Preprocessing":
        """From model.onnx.json / registry metadata ({"input": {"shape", "mean", "std"}, "class_names"})
        or model.json ({"architecture": {"in_channels"}, "image_size", "mean", "std", "class_names"})."""
        try:
            if "input" in meta:
                _, c, h, w = meta["input"]["shape"]
                mean, std = meta["input"]["mean"], meta["input"]["std"]
                resize = meta["input"].get("resize", "bicubic")
                n = meta.get("num_classes") or (meta.get("output", {}).get("shape") or [None, None])[1]
            else:
                c = meta["architecture"]["in_channels"]
                h, w = meta["image_size"]
                mean, std, resize, n = meta["mean"], meta["std"], "bicubic", meta["num_classes"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: preprocessing metadata is incomplete ({type(e).__name__}: {e}); it needs "
                             "the input shape (batch, C, H, W), mean and std") from None
        if resize not in SUPPORTED_RESIZE:
            raise ValueError(f"{where}: resize rule {resize!r} is not supported (only {', '.join(SUPPORTED_RESIZE)})")
        if h != w:
            raise ValueError(f"{where}: non-square input {h}x{w} is not supported by the image transform")
        names = meta.get("class_names") or ([str(i) for i in range(int(n))] if n else [])
        return cls(int(c), (int(h), int(w)), list(mean), list(std), [str(x) for x in names], resize)


@dataclass
class Predictor:
    """A model in any form: preprocessing, and a function from (N, C, H, W) float32 to logits (N, classes)."""

    source: str
    kind: str  # "onnx" | "weights" | "registry"
    preprocessing: Preprocessing
    logits: Callable[[np.ndarray], np.ndarray]
    providers: list[str]


def _onnx_metadata(path: Path) -> dict:
    """model.onnx.json beside the file, else the ONNX metadata_props: the `vitpipe.*` keys every
    exported variant carries (`variants.preprocessing_metadata`), or another tool's plain
    mean/std keys or one JSON blob."""
    sidecar = path.with_name(path.name + ".json")
    if sidecar.is_file():
        try:
            return json.loads(sidecar.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{sidecar}: not valid JSON: {e}") from None
    import onnx

    ours = read_metadata(path)
    if {"mean", "std", "image_size", "in_channels"} <= ours.keys():
        resize = ours.get("resize", RESIZE_RULE)  # the rule in words; another rule is refused by name
        return {"input": {"shape": ["batch", ours["in_channels"], *ours["image_size"]], "mean": ours["mean"],
                          "std": ours["std"], "resize": "bicubic" if resize == RESIZE_RULE else resize},
                "class_names": ours.get("class_names"), "num_classes": ours.get("num_classes")}
    proto = onnx.load(str(path), load_external_data=False)
    props = {}
    for p in proto.metadata_props:
        try:
            props[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            props[p.key] = p.value
    for key in ("vitpipe", "preprocessing"):  # one JSON blob holding everything
        if isinstance(props.get(key), dict):
            return props[key]
    if {"mean", "std"} <= props.keys():
        dims = [d.dim_value or d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
        return {"input": {"shape": props.get("input_shape", dims), "mean": props["mean"], "std": props["std"],
                          "resize": props.get("resize", "bicubic")}, "class_names": props.get("class_names")}
    raise ValueError(f"{path}: no preprocessing metadata: neither {sidecar.name} beside it nor mean/std in its "
                     "metadata_props")


def _onnx_predictor(path: Path, providers: Sequence[str] | None) -> Predictor:
    check_external_data(path)  # a hostile file is refused before anything else reads it
    prep = Preprocessing.from_metadata(_onnx_metadata(path), str(path))
    check_input_shape(path, INPUT_NAME, prep.in_channels, prep.image_size)
    session, used = ort_session(path, providers=providers)
    dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32

    def logits(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: x.astype(dtype, copy=False)})[0], dtype=np.float32)

    return Predictor(str(path), "onnx", prep, logits, used)


def _weights_predictor(path: Path) -> Predictor:
    from pipeline.model.weights import model_from_pair

    model, meta = model_from_pair(path)
    model.eval()
    prep = Preprocessing.from_metadata(meta, str(path))

    @torch.inference_mode()
    def logits(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x)).float().numpy()

    return Predictor(str(path), "weights", prep, logits, ["torch-cpu"])


def _registry_predictor(uri: str) -> Predictor:
    from pipeline.track import load_registered_model

    logits, meta = load_registered_model(uri)
    return Predictor(uri, "registry", Preprocessing.from_metadata(meta, uri), logits, ["mlflow.pyfunc"])


def load_predictor(model: str | Path, providers: Sequence[str] | None = None) -> Predictor:
    """The predictor for MODEL: a models:/ URI, a .onnx file, a weights pair, or a folder with one of them."""
    text = str(model)
    if text.startswith("models:/"):
        return _registry_predictor(text)
    path = Path(model)
    if path.is_dir():
        for candidate in (ONNX_FILE, WEIGHTS_FILE):
            if (path / candidate).is_file():
                path = path / candidate
                break
        else:
            raise FileNotFoundError(f"{path}: no model.onnx or model.safetensors in this folder")
    if not path.exists():
        raise FileNotFoundError(f"{path}: model not found (expected a model.onnx, a weights pair "
                                "model.safetensors/model.json, or a models:/<name>/<version> URI)")
    if path.suffix == ".onnx":
        return _onnx_predictor(path, providers)
    if path.suffix in (".safetensors", ".json"):
        return _weights_predictor(path)
    raise ValueError(f"{path}: not a model: expected a .onnx file, a weights pair (.safetensors/.json) or a "
                     "models:/<name>/<version> URI")


def image_files(args: Sequence[str | Path]) -> list[Path]:
    """The image files `args` name: a file as given (PIL decides whether it is an image), a folder
    as every image below it (FOLDER_IMAGE_EXTENSIONS, any depth, hidden parts skipped, sorted)."""
    files: list[Path] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = images_below(p)
            if not found:
                raise FileNotFoundError(f"{p}: folder holds no image files ({', '.join(FOLDER_IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: image not found")
    if not files:
        raise ValueError("no images given")
    return files


def load_images(paths: Sequence[str | Path], prep: Preprocessing) -> np.ndarray:
    """(N, C, H, W) float32 of the image files, each named in the error if it is missing or unreadable."""
    transform = make_transform(prep.image_size[0], prep.in_channels, prep.mean, prep.std)
    batch = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: image not found")
        try:
            with Image.open(p) as img:
                img.load()
                batch.append(transform(img).numpy())
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise ValueError(f"{p}: cannot read this image ({type(e).__name__}: {e})") from None
    if not batch:
        raise ValueError("no images given")
    return np.stack(batch).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable: the row maximum is subtracted first)."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def iter_predictions(predictor: Predictor, images: Sequence[str | Path], top_k: int = 5,
                     batch_size: int = 64) -> Iterator[dict]:
    """Per image file (folders expanded by `image_files`), in order: its path and the top-k
    {"class", "index", "probability"}, most probable first. Images are read `batch_size` at a
    time, so memory stays bounded however many there are."""
    if top_k < 1:
        raise ValueError(f"--top-k: must be >= 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {batch_size}")
    files = image_files(images)
    names = predictor.preprocessing.class_names
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        logits = predictor.logits(load_images(chunk, predictor.preprocessing))
        if names and len(names) != logits.shape[1]:
            raise ValueError(f"{predictor.source}: {logits.shape[1]} outputs but {len(names)} class names in its metadata")
        for path, p in zip(chunk, softmax(logits)):
            order = np.argsort(-p, kind="stable")[: min(top_k, len(p))]
            yield {"image": str(path), "top_k": [
                {"class": names[i] if names else str(i), "index": int(i), "probability": float(p[i])} for i in order]}


def predict(predictor: Predictor, images: Sequence[str | Path], top_k: int = 5, batch_size: int = 64) -> list[dict]:
    """`iter_predictions` as a list."""
    return list(iter_predictions(predictor, images, top_k=top_k, batch_size=batch_size))


def run_predict(args) -> int:
    """The `vitpipe predict` command: print a line per image (or JSON with --json)."""
    predictor = load_predictor(args.model, providers=args.providers)
    results = iter_predictions(predictor, args.images, top_k=args.top_k, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"model": predictor.source, "kind": predictor.kind, "providers": predictor.providers,
                          "predictions": list(results)}, indent=2))
        return 0
    for r in results:  # a line per image as its batch is done: a large folder shows progress
        best = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top_k"])
        print(f"{r['image']}: {best}", flush=True)
    print(f"({predictor.kind} model {predictor.source}, {', '.join(predictor.providers)})", file=sys.stderr)
    return 0


def add_predict_parser(sub) -> None:
    """`vitpipe predict MODEL IMAGE... [--top-k K] [--json]`."""
    p = sub.add_parser("predict", help="top-k classes of image files (model.onnx, weights pair or models:/ URI)",
                       description="Classify PNG/JPEG files (or every image below a folder) with a model.onnx (preprocessing from model.onnx.json), "
                       "a weights pair (PyTorch) or a registered model models:/<name>/<version> (the registry at "
                       "MLFLOW_TRACKING_URI). Prints the top-k class names and probabilities per image.")
    p.add_argument("model", help="model.onnx, model.safetensors/model.json (or their folder), or models:/<name>/<version>")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...) or folders (every image below them)")
    p.add_argument("--batch-size", type=int, default=64, help="images read and run at a time (default 64)")
    p.add_argument("--top-k", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of one line per image")
    p.add_argument("--providers", nargs="+", metavar="PROVIDER",
                   help="onnxruntime execution providers for a .onnx model (default: CUDA where it runs, else CPU)")

