"""Writing samples into WebDataset tar shards, reproducibly and atomically."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.data.manifest import IMAGE_SUFFIXES, DataError, file_sha256
from pipeline.data.sources import GRAY_MODES, Sample

# Fixed tar header fields: with these, identical samples give byte-identical shards
# (TarWriter otherwise stamps every member with the current time).
_TAR_MTIME = 0.0
_TAR_USER = "vitpipe"
_TAR_MODE = 0o444
_JPEG_QUALITY = 95


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split`."""
    return f"{split}-{index:06d}.tar"


def _encode_pil(image: Image.Image, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    return buf.getvalue()


def encode_sample_image(sample: Sample, image_format: str) -> tuple[str, bytes]:
    """(extension, bytes) stored for a sample: png/jpg bytes are kept as they are, the rest encoded."""
    if sample.data is not None:
        if sample.ext in IMAGE_SUFFIXES:
            return sample.ext, sample.data  # re-encoding would only lose quality or change bytes
        with Image.open(io.BytesIO(sample.data)) as im:
            # bmp/webp/gif: the loader only reads png/jpg, so transcode; palettes and alpha are flattened
            im = im.convert("L" if im.mode in GRAY_MODES else "RGB")
            return image_format, _encode_pil(im, image_format)
    # uint8 HxW becomes mode L and HxWx3 mode RGB (Sample checks dtype and shape)
    image = Image.fromarray(np.ascontiguousarray(sample.array))
    return image_format, _encode_pil(image, image_format)


def write_shards(
    samples: list[Sample], out_dir: str | Path, split: str, max_samples: int, image_format: str
) -> list[dict]:
    """Write `<split>-%06d.tar` shards of at most `max_samples` samples; return {name, samples, bytes, sha256} each."""
    if image_format not in IMAGE_SUFFIXES:
        raise DataError(f"data.image_format: must be one of {IMAGE_SUFFIXES}, got {image_format!r}")
    if max_samples < 1:
        raise DataError(f"data.shard_max_samples: must be >= 1, got {max_samples}")
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise DataError(f"split name {split!r}: use letters, digits and '_' only")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index, start in enumerate(range(0, len(samples), max_samples)):
        chunk = samples[start : start + max_samples]
        records.append(_write_one_shard(chunk, out_dir, shard_name(split, index), image_format))
    _remove_stale_shards(out_dir, split, keep=len(records))
    return records


def _write_one_shard(samples: list[Sample], out_dir: Path, name: str, image_format: str) -> dict:
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as stream:
            # encoder=False: we hand TarWriter finished bytes, so what is stored is exactly what we encoded
            with wds.TarWriter(
                stream, user=_TAR_USER, group=_TAR_USER, mode=_TAR_MODE, mtime=_TAR_MTIME, encoder=False
            ) as writer:
                for sample in samples:
                    ext, data = encode_sample_image(sample, image_format)
                    writer.write({"__key__": sample.key, ext: data, "cls": str(int(sample.label)).encode("ascii")})
        record = {"name": name, "samples": len(samples), "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)}
        os.replace(tmp, final)  # a shard under its final name is always complete
    finally:
        tmp.unlink(missing_ok=True)
    return record


def _remove_stale_shards(out_dir: Path, split: str, keep: int) -> None:
    """Delete shards of `split` left by an earlier, larger run, so the folder matches the manifest."""
    pattern = re.compile(rf"^{re.escape(split)}-(\d{{6}})\.tar$")
    for path in out_dir.iterdir():
        match = pattern.match(path.name)
        if match and int(match.group(1)) >= keep:
            path.unlink()
