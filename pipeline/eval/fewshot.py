"""The paper's few-shot linear evaluation: ridge regression on frozen class-token features.

Dosovitskiy et al. (2021), section 4.1: "few-shot accuracies are obtained by solving a regularized
least-squares regression problem that maps the (frozen) representation of a subset of training
images to {-1, 1}^K target vectors", the closed form that makes it cheap enough to run often.
As in big_vision's fewshot evaluator: features are standardized with the statistics of the k-shot
training points, a constant bias feature is appended (large, so the ridge penalty barely touches
it), targets are one-vs-rest in {-1, +1}, and W = argmin ||XW - Y||^2 + l2 ||W||^2 is solved in the
primal (D x D system) or, with fewer points than dimensions, the dual (N x N, Woodbury identity).

The representation is the class token after the final norm: the input of the head (pre-logits).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from pipeline.data.eval_stream import eval_batches
from pipeline.data.manifest import Manifest
from pipeline.tables import format_table

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_L2 = 2.0**10  # big_vision's default l2_reg for its few-shot evaluator
BIAS_FEATURE = 100.0  # big_vision's constant: a bias column of 100 makes its penalty negligible


@torch.no_grad()
def extract_features(model: torch.nn.Module, manifest: Manifest, split: str, *, batch_size: int = 128,
                     mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, labels (N,)) of every image of `split`: what the head sees (the class
    token's output, or the pooled patch tokens of a model without one), before the head."""
    model.eval()
    h, _ = model.image_size
    feats, labels = [], []
    for images, y, mask in eval_batches(manifest, split, image_size=h, in_channels=model.in_channels, mean=mean,
                                        std=std, batch_size=batch_size, rank=0, world_size=1):
        pooled = model.pool(model.forward_features(images))  # (B, D)
        feats.append(pooled[mask].float().numpy())
        labels.append(y[mask].numpy())
    if not feats:
        raise ValueError(f"the {split} split is empty: few-shot evaluation needs images in it")
    return np.concatenate(feats), np.concatenate(labels)


def ridge_solve(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """W (D, C) minimizing ||x W - y||^2 + l2 ||W||^2 for x (N, D), y (N, C), in float64."""
    if l2 <= 0:
        raise ValueError(f"l2: the ridge penalty must be > 0, got {l2}")
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n, d = x.shape
    if n >= d:
        return np.linalg.solve(x.T @ x + l2 * np.eye(d), x.T @ y)  # (D, D) system
    return x.T @ np.linalg.solve(x @ x.T + l2 * np.eye(n), y)  # Woodbury: (N, N) system


def fewshot_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                     num_classes: int, l2: float = DEFAULT_L2) -> float:
    """Top-1 accuracy on (test_x, test_y) of the ridge classifier fitted to (train_x, train_y)."""
    mean = train_x.mean(axis=0, keepdims=True)
    std = train_x.std(axis=0, keepdims=True) + 1e-5

    def design(f: np.ndarray) -> np.ndarray:
        z = (np.asarray(f, np.float64) - mean) / std
        return np.concatenate([z, np.full((len(z), 1), BIAS_FEATURE)], axis=1)  # (N, D + 1)

    targets = 2.0 * np.eye(num_classes)[train_y] - 1.0  # (N, C), one-vs-rest in {-1, +1}
    w = ridge_solve(design(train_x), targets, l2)
    predictions = (design(test_x) @ w).argmax(axis=1)
    return float((predictions == test_y).mean())


def sample_shots(labels: np.ndarray, shots: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `shots` samples per class, drawn without replacement."""
    picked = []
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        if len(pool) < shots:
            raise ValueError(f"class {c} has {len(pool)} train image(s), fewer than {shots} shots; "
                             f"use --shots up to {len(pool)} or a larger dataset")
        picked.append(rng.choice(pool, size=shots, replace=False))
    return np.concatenate(picked)


def fewshot_eval(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], num_classes: int,
                 shots: Iterable[int] = DEFAULT_SHOTS, seeds: int = 3, l2: float = DEFAULT_L2) -> dict:
    """Per k: the val accuracy of ridge classifiers fitted on k train shots per class, one per seed."""
    if seeds < 1:
        raise ValueError(f"seeds: need at least 1, got {seeds}")
    (train_x, train_y), (val_x, val_y) = train, val
    out = {}
    for k in shots:
        if k < 1:
            raise ValueError(f"shots: every value must be >= 1, got {k}")
        accs = []
        for seed in range(seeds):
            idx = sample_shots(train_y, k, num_classes, np.random.default_rng([seed, k]))
            accs.append(fewshot_accuracy(train_x[idx], train_y[idx], val_x, val_y, num_classes, l2))
        out[int(k)] = {"accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)), "accuracies": accs}
    return out


def fewshot_table(per_shot: dict, num_classes: int, seeds: int) -> str:
    """The result of `fewshot_eval` as a plain-text table."""
    rows = [{"shots": int(k), "val accuracy": r["accuracy_mean"], "std": r["accuracy_std"]} for k, r in per_shot.items()]
    return (f"few-shot linear evaluation: ridge on class-token features, {num_classes} classes "
            f"(chance {1 / num_classes:.3f}), {seeds} seed(s)\n"
            + format_table(rows, {"val accuracy": ".4f", "std": ".4f"}))
