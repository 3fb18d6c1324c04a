"""Image transforms, without torchvision: the one transform of evaluation and serving
(`make_transform`: to L/RGB, bicubic resize, scale to [0, 1], normalize), training's
augmentations on top of it (`TrainTransform`: random resized crop, flip, RandAugment, in PIL),
and batch-level mixup/cutmix with label smoothing (`mix_batch`, torch).

Nothing distributed is imported here.

Randomness comes from a `random.Random` the caller passes in; the training stream seeds one per
batch from (seed, epoch, stream, batch), so a batch gets the same augmentations whether or not the
run was interrupted and resumed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps


# ------------------------------------------------------------------------------- the base transform

# `make_transform` in words: what every exported file's metadata says, so a consumer outside
# vitpipe can reproduce the input (and `vitpipe predict` recognizes it).
RESIZE_RULE = "convert to L (1 channel) or RGB (3), bicubic resize to image_size (aspect ratio not kept), no crop"
SCALE_RULE = "pixels / 255, then (x - mean) / std per channel; layout NCHW float32"


def _per_channel(values: Sequence[float], in_channels: int, name: str) -> torch.Tensor:
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * in_channels
    elif in_channels == 1 and len(set(values)) == 1:
        values = values[:1]  # an RGB-style [m, m, m] default is fine for a grayscale model
    elif len(values) != in_channels:
        raise ValueError(f"{name}: need 1 or {in_channels} value(s) for {in_channels}-channel images, got {values}")
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)


class ImageTransform:
    """PIL image -> normalized float32 tensor (C, H, W); a class so loader workers can pickle it."""

    def __init__(self, image_size: int, in_channels: int, mean: Sequence[float], std: Sequence[float]):
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels: must be 1 or 3, got {in_channels}")
        if image_size < 1:
            raise ValueError(f"image_size: must be >= 1, got {image_size}")
        self.image_size = image_size
        self.mode = "L" if in_channels == 1 else "RGB"
        self.mean = _per_channel(mean, in_channels, "mean")
        self.std = _per_channel(std, in_channels, "std")
        if (self.std <= 0).any():
            raise ValueError(f"std: every value must be > 0, got {list(std)}")

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of `pixels`."""
        return (self.image_size, self.image_size, 1 if self.mode == "L" else 3)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """uint8 (H, W, C), converted to L/RGB and resized, not yet normalized.

        Channels last, as PIL holds them: turning them to (C, H, W) here would make every copy into a
        batch a strided one (52 us vs 4 us per 224 px image); `normalize` moves them where the batch
        lands.
        """
        if image.mode != self.mode:
            image = image.convert(self.mode)
        size = (self.image_size, self.image_size)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BICUBIC)
        pixels = np.asarray(image)  # (H, W) or (H, W, C) uint8
        return pixels[:, :, None] if pixels.ndim == 2 else pixels

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., H, W, C) on any device -> float32 (..., C, H, W), scaled to [0, 1] and normalized."""
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        x = pixels.movedim(-1, -3).float() / 255.0
        return ((x - mean) / std).contiguous()

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(torch.from_numpy(np.array(self.pixels(image))))  # a writable copy


def make_transform(image_size: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> ImageTransform:
    """The train/eval transform: convert to L/RGB, bicubic resize to image_size, scale to [0, 1], normalize."""
    return ImageTransform(image_size, in_channels, mean, std)


# ------------------------------------------------------------------------------- RandAugment


def _level(magnitude: float, max_value: float, rng: random.Random, signed: bool = True) -> float:
    v = magnitude / 10.0 * max_value
    return -v if signed and rng.random() < 0.5 else v


def _fill(img: Image.Image):
    return 0 if img.mode == "L" else (0, 0, 0)


# name -> f(img, magnitude 0..10, rng); the op list of RandAugment (Cubuk et al., 2020).
_OPS = {
    "identity": lambda img, m, r: img,
    "autocontrast": lambda img, m, r: ImageOps.autocontrast(img),
    "equalize": lambda img, m, r: ImageOps.equalize(img),
    "rotate": lambda img, m, r: img.rotate(_level(m, 30, r), resample=Image.Resampling.BILINEAR, fillcolor=_fill(img)),
    "solarize": lambda img, m, r: ImageOps.solarize(img, 256 - int(m / 10 * 256)),
    "color": lambda img, m, r: ImageEnhance.Color(img).enhance(1 + _level(m, 0.9, r)),
    "posterize": lambda img, m, r: ImageOps.posterize(img, max(1, 8 - int(m / 10 * 4))),
    "contrast": lambda img, m, r: ImageEnhance.Contrast(img).enhance(1 + _level(m, 0.9, r)),
    "brightness": lambda img, m, r: ImageEnhance.Brightness(img).enhance(1 + _level(m, 0.9, r)),
    "sharpness": lambda img, m, r: ImageEnhance.Sharpness(img).enhance(1 + _level(m, 0.9, r)),
    "shear_x": lambda img, m, r: img.transform(img.size, Image.Transform.AFFINE, (1, _level(m, 0.3, r), 0, 0, 1, 0),
                                               resample=Image.Resampling.BILINEAR, fillcolor=_fill(img)),
    "shear_y": lambda img, m, r: img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, _level(m, 0.3, r), 1, 0),
                                               resample=Image.Resampling.BILINEAR, fillcolor=_fill(img)),
    "translate_x": lambda img, m, r: img.transform(img.size, Image.Transform.AFFINE,
                                                   (1, 0, _level(m, 0.45, r) * img.size[0], 0, 1, 0),
                                                   fillcolor=_fill(img)),
    "translate_y": lambda img, m, r: img.transform(img.size, Image.Transform.AFFINE,
                                                   (1, 0, 0, 0, 1, _level(m, 0.45, r) * img.size[1]),
                                                   fillcolor=_fill(img)),
}


def rand_augment(img: Image.Image, num_ops: int, magnitude: float, rng: random.Random) -> Image.Image:
    """Apply `num_ops` ops drawn uniformly from the RandAugment list at `magnitude` (0-10)."""
    for name in rng.choices(sorted(_OPS), k=num_ops):
        img = _OPS[name](img, magnitude, rng)
    return img


# ------------------------------------------------------------------------------- per image


def random_resized_crop_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
                            rng: random.Random) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop with area fraction in `scale` and aspect ratio in `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    side = min(width, height)  # fall back to a central square crop
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


@dataclass
class TrainTransform:
    """PIL image + rng -> normalized (C, H, W) tensor, with the configured augmentations."""

    image_size: int
    in_channels: int
    mean: Sequence[float]
    std: Sequence[float]
    random_resized_crop: bool = False
    crop_scale: Sequence[float] = (0.08, 1.0)
    crop_ratio: Sequence[float] = (3 / 4, 4 / 3)
    hflip: bool = False
    randaugment_ops: int = 0
    randaugment_magnitude: float = 9.0

    def __post_init__(self):
        self._finish = make_transform(self.image_size, self.in_channels, self.mean, self.std)

    def __call__(self, image: Image.Image, rng: Optional[random.Random] = None) -> torch.Tensor:
        """Normalized float32 (C, H, W)."""
        return self._finish.normalize(torch.from_numpy(np.array(self.pixels(image, rng))))  # a writable copy

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of `pixels`."""
        return self._finish.output_shape

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., H, W, C) from `pixels`, on any device -> normalized float32 (..., C, H, W)."""
        return self._finish.normalize(pixels)

    def pixels(self, image: Image.Image, rng: Optional[random.Random] = None) -> np.ndarray:
        """uint8 (H, W, C) after the augmentations, before normalization.

        What loader workers hand over: a quarter of float32's bytes through the worker queue, and
        the normalization runs where the batch lands (on the GPU, for free).
        """
        rng = rng or random.Random(0)
        image = image.convert("L" if self.in_channels == 1 else "RGB")
        if self.random_resized_crop:
            box = random_resized_crop_box(image.width, image.height, self.crop_scale, self.crop_ratio, rng)
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC, box=box)
        if self.hflip and rng.random() < 0.5:
            image = ImageOps.mirror(image)
        if self.randaugment_ops:
            image = rand_augment(image, self.randaugment_ops, self.randaugment_magnitude, rng)
        return self._finish.pixels(image)


# ------------------------------------------------------------------------------- per batch


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, mixup_alpha: float,
              cutmix_alpha: float, prob: float, smoothing: float, generator: np.random.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix (chosen per batch) with label smoothing -> (images, soft targets (B, classes))."""
    off = smoothing / num_classes
    targets = torch.full((len(labels), num_classes), off, dtype=torch.float32)
    targets.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)
    use_mix = (mixup_alpha > 0 or cutmix_alpha > 0) and generator.random() < prob
    if not use_mix:
        return images, targets
    flipped = torch.flip(torch.arange(len(labels)), dims=[0])  # pair each image with its mirror in the batch
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or generator.random() < 0.5)
    if use_cutmix:
        lam = float(generator.beta(cutmix_alpha, cutmix_alpha))
        h, w = images.shape[-2:]
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(generator.integers(h)), int(generator.integers(w))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        images = images.clone()
        images[..., y0:y1, x0:x1] = images[flipped][..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area really pasted
    else:
        lam = float(generator.beta(mixup_alpha, mixup_alpha))
        images = images * lam + images[flipped] * (1 - lam)
    return images, targets * lam + targets[flipped] * (1 - lam)
