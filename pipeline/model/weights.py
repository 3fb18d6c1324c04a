"""The consolidated "weights pair": ``model.safetensors`` (fp32 state dict) + ``model.json`` (metadata).

This is the model-only file that fine-tune, export and benchmark read; resumable training state
lives elsewhere. ``model.json`` is written last, so a pair whose json exists is complete.

model.json keys: "format" ("vitpipe.weights/1"), "architecture" (the ModelConfig fields),
"image_size" [h, w], "num_classes", "class_names", "mean", "std", "pos_embed_interp", plus any
extra keys the caller adds (e.g. "stage", "metrics"; imports add "source": format, path, sha256).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.atomic import atomic_path, write_text
from pipeline.model.config import FINETUNE_MODEL_FIELDS, ModelConfig, validate_model
from pipeline.model.pos_embed import INITS, transfer_pos_embed
from pipeline.model.vit import VisionTransformer, build_model
from pipeline.run_layout import WEIGHTS_FILE, WEIGHTS_META_FILE
from pipeline.schema import from_dict

FORMAT = "vitpipe.weights/1"
WEIGHTS_NAME = WEIGHTS_FILE  # the pair's file names are the run folder's (pipeline/run_layout.py)
META_NAME = WEIGHTS_META_FILE
REQUIRED_META = ("architecture", "image_size", "num_classes")


def weights_meta(
    cfg: ModelConfig,
    image_size: int | Sequence[int],
    num_classes: int,
    class_names: Optional[Sequence[str]] = None,
    **extra: Any,
) -> dict:
    """The model.json content for a model built from `cfg`; `extra` keys (stage, metrics...) are kept."""
    size = [image_size, image_size] if isinstance(image_size, int) else [int(s) for s in image_size]
    return {
        "format": FORMAT,
        "architecture": dataclasses.asdict(cfg),
        "image_size": size,
        "num_classes": int(num_classes),
        "class_names": list(class_names) if class_names is not None else None,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "pos_embed_interp": cfg.pos_embed_interp,
        **extra,
    }


def save_weights_pair(out_dir: str | Path, state_dict: dict[str, torch.Tensor], meta: dict) -> Path:
    """Atomically write model.safetensors (fp32, contiguous) and then model.json into `out_dir`; return the .safetensors path."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"weights meta is missing {missing}; build it with weights_meta(...)")
    meta = {**meta, "format": FORMAT}
    text = json.dumps(meta, indent=2, sort_keys=True)  # serialize first: a bad meta writes nothing
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach()
        # copy=True: ZeRO params can be views into one flat buffer, which safetensors refuses to save.
        dtype = torch.float32 if v.is_floating_point() else v.dtype
        tensors[k] = v.to(device="cpu", dtype=dtype, copy=True).contiguous()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_NAME
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_text(out_dir / META_NAME, text + "\n")
    return weights


def pair_paths(path: str | Path) -> tuple[Path, Path]:
    """(.safetensors, .json) of the weights pair `path` names: its folder, its .safetensors or its
    .json (what `--weights` accepts), so a stage fingerprints and hashes the files, never a folder."""
    path = Path(path)
    if path.is_dir():
        return path / WEIGHTS_NAME, path / META_NAME
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    raise ValueError(f"{path}: expected a weights-pair directory, a .safetensors or a .json file")


def _read_json(meta_path: Path) -> Any:
    try:
        return json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path}: not valid JSON: {e}") from None


def _read_pair_meta(path: str | Path) -> tuple[Path, dict]:
    """(weights file, meta) of a weights pair, its metadata checked; the tensors are not read."""
    weights, meta_path = pair_paths(path)
    for p in (weights, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: weights-pair file not found (a pair is {WEIGHTS_NAME} + {META_NAME})")
    meta = _read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_path}: not a vitpipe weights pair (format {found!r}, expected {FORMAT!r})")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"{meta_path}: metadata is missing {missing}")
    return weights, meta


def read_weights_pair(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a weights pair from its directory, .safetensors or .json path -> (state_dict, meta)."""
    weights, meta = _read_pair_meta(path)
    try:
        state_dict = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights}: cannot read safetensors: {e}") from None
    return state_dict, meta


def check_model_classes(weights: str | Path, class_names: Optional[Sequence[str]], against: str,
                        num_classes: Optional[int] = None) -> None:
    """Raise ValueError unless the weights pair predicts `class_names` (those of `against`, e.g. a
    dataset), in order; where either side has no names, at least their number (`num_classes`) must agree."""
    meta_path = pair_paths(weights)[1]
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: weights-pair file not found (a pair is {WEIGHTS_NAME} + {META_NAME})")
    meta = _read_json(meta_path)
    theirs = meta.get("class_names")
    count = int(meta.get("num_classes", len(theirs or [])))
    want = len(class_names) if class_names is not None else num_classes
    if (want is not None and want != count) or (
            theirs is not None and class_names is not None and list(theirs) != list(class_names)):
        shown = lambda names, n: _short(names) if names is not None else "(unnamed)"  # noqa: E731
        raise ValueError(f"{meta_path}: the model predicts {count} classes {shown(theirs, count)} but {against} "
                         f"has {want} classes {shown(class_names, want)}; use the dataset the model was "
                         f"fine-tuned on, or fine-tune it on this one first")


def _short(names: Sequence[str]) -> str:
    names = list(names)
    return str(names) if len(names) <= 8 else str(names[:8])[:-1] + f", ... ({len(names)} in all)]"


def model_config_from_meta(meta: dict) -> ModelConfig:
    """The ModelConfig stored in a weights pair's metadata (validated like a recipe's)."""
    arch = meta.get("architecture")
    if not isinstance(arch, dict):
        raise ValueError(f"weights meta: 'architecture' must be a mapping of ModelConfig fields, got {arch!r}")
    cfg = from_dict(ModelConfig, arch, prefix="architecture.")  # ConfigError (a ValueError) on bad fields
    validate_model(cfg, prefix="architecture.")
    return cfg


def _describe(shape: Optional[tuple[int, ...]]) -> str:
    return "absent" if shape is None else str(tuple(shape))


def _check_stored_shapes(weights_file: Path, cfg: ModelConfig, meta: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every key and shape of the stored tensors must be those of the stored architecture at the
    stored resolution and classes (a ValueError listing the first differences otherwise)."""
    with torch.device("meta"):  # shapes only: no memory, no initialization
        stored = build_model(cfg, tuple(int(s) for s in meta["image_size"]), int(meta["num_classes"]))
    expected = {k: tuple(v.shape) for k, v in stored.state_dict().items()}
    problems = [
        f"{k}: checkpoint {_describe(shapes.get(k))}, model {_describe(expected.get(k))}"
        for k in sorted(set(expected) | set(shapes))
        if k not in shapes or k not in expected or tuple(shapes[k]) != expected[k]
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise ValueError(
            f"{weights_file}: weights do not match the architecture in its model.json "
            f"(a checkpoint from another model?): {shown}"
        )


def check_weights_pair(path: str | Path) -> tuple[ModelConfig, dict]:
    """What `model_from_pair` would refuse in the pair itself, found without reading or resampling
    the tensors (only the safetensors header): not a pair, bad metadata, tensors that do not fit the
    architecture. Returns (the stored ModelConfig, meta). For the orchestrating process, which must
    fail before any rank starts but never needs the weights."""
    weights, meta = _read_pair_meta(path)
    try:
        cfg = model_config_from_meta(meta)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights}: cannot read safetensors: {e}") from None
    _check_stored_shapes(weights, cfg, meta, shapes)
    return cfg, meta


def model_from_pair(
    path: str | Path,
    image_size: int | Sequence[int] | None = None,
    num_classes: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
    settings: Optional[dict] = None,
    pos_embed_init: str = "resample",
) -> tuple[VisionTransformer, dict]:
    """Build the stored ViT at `image_size` (default: stored), resampling pos_embed and resetting the head as needed.

    `settings` overrides ModelConfig fields that leave the architecture as stored (FINETUNE_MODEL_FIELDS:
    dropout, drop_path, pos_embed_interp, which then also picks the resampling mode).
    `pos_embed_init` says how the position embeddings start at a new grid (`pos_embed.INITS`):
    resampled with the mode in model.json (the default), nearest, zeros or reinit (the last two
    also at the stored grid; reinit draws from torch's global RNG, so seed it first).
    Returns (model, meta) where meta describes the returned model (image_size, num_classes,
    class_names, architecture updated) and adds "head_reset" (bool), "source_image_size" (the stored
    size) and "pos_embed_init".
    """
    if pos_embed_init not in INITS:
        raise ValueError(f"pos_embed_init: {pos_embed_init!r} is not supported; use one of {', '.join(INITS)}")
    state_dict, meta = read_weights_pair(path)
    weights_file = pair_paths(path)[0]
    try:
        cfg = model_config_from_meta(meta)
    except ValueError as e:
        raise ValueError(f"{weights_file}: {e}") from None
    settings = dict(settings or {})
    if unknown := sorted(set(settings) - set(FINETUNE_MODEL_FIELDS)):
        raise ValueError(f"{weights_file}: {unknown} would change the stored architecture; only "
                         f"{list(FINETUNE_MODEL_FIELDS)} can be set when loading a weights pair")
    if settings:
        cfg = dataclasses.replace(cfg, **settings)
        meta = {**meta, "architecture": dataclasses.asdict(cfg), "pos_embed_interp": cfg.pos_embed_interp}
    stored_size = tuple(int(s) for s in meta["image_size"])
    stored_classes = int(meta["num_classes"])
    stored_names = meta.get("class_names")
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise ValueError(f"num_classes={num_classes} but {len(class_names)} class_names were given")
    if num_classes is None:
        num_classes = len(class_names) if class_names is not None else stored_classes
    size = stored_size if image_size is None else image_size

    # Every key and shape must be the stored architecture's (pos_embed: the *stored* grid's).
    _check_stored_shapes(weights_file, cfg, meta, {k: tuple(v.shape) for k, v in state_dict.items()})
    # Built with the stored head so the checkpoint loads strictly; the head is swapped afterwards.
    model = build_model(cfg, size, stored_classes)
    p = model.patch_size
    old_grid = (stored_size[0] // p, stored_size[1] // p)

    if model.grid != old_grid or pos_embed_init in ("zeros", "reinit"):
        mode = meta.get("pos_embed_interp", cfg.pos_embed_interp)
        state_dict["pos_embed"] = transfer_pos_embed(
            state_dict["pos_embed"], model.grid, old_grid, model.num_prefix_tokens, pos_embed_init, mode
        )
    model.load_state_dict(state_dict, strict=True)

    names_differ = class_names is not None and list(class_names) != stored_names
    head_reset = num_classes != stored_classes or names_differ
    if head_reset:
        model.reset_head(num_classes)
    out_meta = {
        **meta,
        "image_size": list(model.image_size),
        "num_classes": num_classes,
        # A reset head without given names has no known labels: do not carry the stored ones over.
        "class_names": list(class_names) if class_names is not None else (None if head_reset else stored_names),
        "head_reset": head_reset,
        "source_image_size": list(stored_size),
        "pos_embed_init": pos_embed_init,
    }
    return model, out_meta
