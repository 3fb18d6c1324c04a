"""Augmentation: crops stay inside the image, the same rng gives the same result, mixing keeps
target mass and pastes the area it claims; all on real digits."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.data.transforms import TrainTransform, mix_batch, rand_augment, random_resized_crop_box


@pytest.fixture(scope="module")
def digit():
    return Image.fromarray((load_digits().images[0] * 15).astype(np.uint8)).resize((28, 28))


def test_crop_box_is_inside_and_within_scale():
    rng = random.Random(0)
    for _ in range(200):
        l, t, r, b = random_resized_crop_box(40, 30, (0.3, 1.0), (0.75, 1.333), rng)
        assert 0 <= l < r <= 40 and 0 <= t < b <= 30
        assert (r - l) * (b - t) >= 0.3 * 1200 * 0.9  # rounding aside, at least the minimum area


def test_transform_is_deterministic_per_rng_and_varies_across(digit):
    t = TrainTransform(image_size=14, in_channels=1, mean=[0.5], std=[0.5], random_resized_crop=True, hflip=True,
                       randaugment_ops=2)
    a, b = t(digit, random.Random("k1")), t(digit, random.Random("k1"))
    assert a.shape == (1, 14, 14) and torch.equal(a, b)
    outs = {t(digit, random.Random(f"k{i}")).sum().item() for i in range(10)}
    assert len(outs) > 5


def test_plain_transform_is_a_resize(digit):
    t = TrainTransform(image_size=14, in_channels=1, mean=[0.0], std=[1.0])
    x = t(digit, random.Random(0))
    expected = np.asarray(digit.resize((14, 14), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    torch.testing.assert_close(x[0], torch.from_numpy(expected))


def test_every_randaugment_op_runs_on_gray_and_rgb(digit):
    for img in (digit, digit.convert("RGB")):
        out = rand_augment(img, 14, 9, random.Random(1))
        assert out.size == img.size and out.mode == img.mode


def test_label_smoothing_targets():
    labels = torch.tensor([0, 3])
    _, targets = mix_batch(torch.zeros(2, 1, 4, 4), labels, 5, mixup_alpha=0, cutmix_alpha=0, prob=1, smoothing=0.1,
                           generator=np.random.default_rng(0))
    torch.testing.assert_close(targets.sum(1), torch.ones(2))
    assert targets[0, 0] == pytest.approx(0.9 + 0.02) and targets[0, 1] == pytest.approx(0.02)


def test_mixup_and_cutmix_keep_target_mass_and_match_the_pasted_area():
    images = torch.stack([torch.full((1, 8, 8), float(i)) for i in range(4)])
    labels = torch.arange(4)
    mixed, targets = mix_batch(images, labels, 4, mixup_alpha=0.4, cutmix_alpha=0, prob=1, smoothing=0,
                               generator=np.random.default_rng(1))
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    lam = targets[0, 0].item()  # image 0 mixed with its mirror, image 3
    torch.testing.assert_close(mixed[0], torch.full((1, 8, 8), 3 * (1 - lam)))
    cut, targets = mix_batch(images, labels, 4, mixup_alpha=0, cutmix_alpha=1.0, prob=1, smoothing=0,
                             generator=np.random.default_rng(2))
    pasted = (cut[0] == 3).float().mean().item()  # fraction of image 0 now showing image 3
    assert targets[0, 3].item() == pytest.approx(pasted) and targets[0, 0].item() == pytest.approx(1 - pasted)


def test_workers_hand_over_uint8_pixels_that_normalize_to_the_float_transform(digit):
    """Loader workers ship uint8 (H, W, C); normalizing a batch of them where it lands gives exactly
    what the float transform gives, for grayscale and RGB."""
    for channels, mean, std in ((1, [0.5], [0.25]), (3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])):
        t = TrainTransform(image_size=20, in_channels=channels, mean=mean, std=std, random_resized_crop=True,
                           hflip=True)
        pixels = t.pixels(digit, random.Random("k"))
        assert pixels.dtype == np.uint8 and pixels.shape == (20, 20, channels)  # channels last, as PIL holds them
        batch = torch.from_numpy(np.stack([pixels, pixels]))
        expected = t(digit, random.Random("k"))
        normalized = t.normalize(batch)
        assert normalized.shape == (2, channels, 20, 20) and normalized.is_contiguous()
        assert torch.allclose(normalized[1], expected, atol=1e-6)
        assert abs(float(normalized[0, 0].mean()) - (pixels[:, :, 0].mean() / 255 - mean[0]) / std[0]) < 1e-4
