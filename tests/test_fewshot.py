"""The paper's few-shot linear evaluation: the closed-form ridge solver, its accuracy on real digits,
and `vitpipe eval fewshot` on a real weights pair and real shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config import ModelConfig
from pipeline.eval.fewshot import fewshot_eval, ridge_solve, sample_shots
from pipeline.model.vit import build_model
from pipeline.model.weights import save_weights_pair, weights_meta

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pipeline" / "tiny.yaml"


@pytest.mark.parametrize("n, d", [(40, 7), (6, 25)])  # the primal (N >= D) and the dual (Woodbury) branch
def test_ridge_solver_matches_numpy_lstsq(n, d):
    rng = np.random.default_rng(0)
    x, y, l2 = rng.normal(size=(n, d)), rng.normal(size=(n, 3)), 2.5
    # ridge = least squares on the system stacked with sqrt(l2) I
    reference = np.linalg.lstsq(np.vstack([x, np.sqrt(l2) * np.eye(d)]), np.vstack([y, np.zeros((d, 3))]), rcond=None)[0]
    np.testing.assert_allclose(ridge_solve(x, y, l2), reference, rtol=1e-9, atol=1e-11)


def test_on_real_digits_it_beats_chance_and_more_shots_are_not_worse():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)  # 1,797 real 8x8 digits, 64 pixel features
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    result = fewshot_eval((x[:1200], y[:1200]), (x[1200:], y[1200:]), 10, shots=(1, 5, 10, 25), seeds=5)
    means = [result[k]["accuracy_mean"] for k in (1, 5, 10, 25)]
    assert means[0] > 0.3 and means[-1] > 0.8  # chance is 0.1
    assert means == sorted(means), means
    assert all(len(result[k]["accuracies"]) == 5 for k in result)


def test_shots_are_drawn_per_class_and_too_many_is_an_error():
    labels = np.array([0] * 5 + [1] * 3)
    idx = sample_shots(labels, 3, 2, np.random.default_rng(0))
    assert sorted(labels[idx].tolist()) == [0, 0, 0, 1, 1, 1] and len(set(idx.tolist())) == 6
    with pytest.raises(ValueError, match="class 1 has 3 train image"):
        sample_shots(labels, 4, 2, np.random.default_rng(0))


def test_vitpipe_eval_fewshot_on_a_weights_pair(digits300, tmp_path, capsys):
    torch.manual_seed(0)
    cfg = ModelConfig(width=32, depth=1, heads=2, mlp_dim=64, patch_size=2, in_channels=1, mean=[0.5], std=[0.5])
    weights = save_weights_pair(tmp_path / "pair", build_model(cfg, 8, 10).state_dict(),
                                weights_meta(cfg, 8, 10, [str(i) for i in range(10)]))
    out = tmp_path / "fewshot.json"
    common = ["eval", "fewshot", str(TINY), "--weights", str(weights), "--manifest", str(digits300), "--seeds", "2",
              "tracking.enabled=false"]
    assert main(common + ["--shots", "1,5,25", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["shots"]) == ["1", "5", "25"] and result["num_classes"] == 10
    assert result["train_images"] == 270 and result["val_images"] == 30 and result["feature_dim"] == 32
    # even the class token of an untrained ViT carries the digit: 25 shots are well above chance
    assert result["shots"]["25"]["accuracy_mean"] > 2 * result["chance"]
    table = capsys.readouterr().out
    assert "few-shot linear evaluation" in table and "   25" in table
    # 30 shots per class are more than this train split has: an error naming the class, no output
    assert main(common + ["--shots", "30", "--out", str(tmp_path / "none.json")]) == 1
    assert "fewer than 30 shots" in capsys.readouterr().err and not (tmp_path / "none.json").exists()
