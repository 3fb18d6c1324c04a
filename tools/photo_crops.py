"""A folder of real photographs at ImageNet-like sizes, for `vitpipe bench data` on this kind of image.

No image set of that size ships with our dependencies except scikit-learn's two sample photos
(china.jpg and flower.jpg, 427 x 640). This writes N seeded random crops of them (240-427 x
200-360 pixels, JPEG quality 90, ~31 KB each, about the pixel count of an ImageNet image after the
usual resize), as a class-folder tree `out/photo0|photo1/NNNNN.jpg` that `prepare` reads with
`data.source=folder`. Nothing is downloaded.

    python -m tools.photo_crops /tmp/photos 2400
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path


def write_photo_crops(out: str | Path, count: int, seed: int = 0) -> Path:
    """Write `count` crops under `out` (created); returns `out`."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    if count < 1:
        raise ValueError(f"count: need at least 1 image, got {count}")
    out, rng = Path(out), random.Random(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    for i in range(count):
        c = i % len(photos)
        photo = photos[c]
        w, h = rng.randint(240, 427), rng.randint(200, 360)
        x, y = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        folder = out / f"photo{c}"
        folder.mkdir(parents=True, exist_ok=True)
        photo.crop((x, y, x + w, y + h)).save(folder / f"{i:05d}.jpg", quality=90)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write (class folders photo0/ and photo1/)")
    parser.add_argument("count", type=int, help="number of crops")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_photo_crops(args.out, args.count, args.seed)
    print(f"wrote {args.count} crops under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
