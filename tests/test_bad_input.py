"""Bad input through the `vitpipe` command: one clear message naming the file or key, a non-zero
exit, and nothing left behind that looks complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.config import ModelConfig
from pipeline.model.vit import build_model
from pipeline.model.weights import save_weights_pair, weights_meta

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pipeline" / "tiny.yaml"
DIGITS = ["data.source=digits", "data.limit=200", "data.shard_max_samples=50"]


def vitpipe(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def prepared(tmp_path):
    proc = vitpipe("prepare", TINY, *DIGITS, "tracking.enabled=false", "--out", tmp_path / "prep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "prep" / "manifest.json"


def test_config_error_exits_2_naming_the_key(tmp_path):
    proc = vitpipe("run", TINY, "pretrain.stepz=3", cwd=tmp_path)
    assert proc.returncode == 2
    assert "pretrain.stepz: unknown key; did you mean 'steps'?" in proc.stderr
    assert not (tmp_path / "runs").exists()  # rejected before any work


def test_an_output_folder_that_is_a_file_is_named_without_a_traceback(tmp_path):
    """--out on a file, or below one: the path and what is wrong, exit 1 (was an OSError traceback)."""
    afile = tmp_path / "model.onnx"
    afile.write_text("keep me")
    for out, why in ((afile, "is a file; a folder is needed here"),
                     (afile / "sub", "a part of this path is a file, not a folder")):
        proc = vitpipe("prepare", TINY, *DIGITS, "tracking.enabled=false", "--out", out, cwd=tmp_path)
        assert proc.returncode == 1 and f"vitpipe: error: {out}: {why}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert afile.read_text() == "keep me"


def test_missing_dataset_folder(tmp_path):
    proc = vitpipe("prepare", TINY, "data.source=folder", f"data.root={tmp_path / 'nowhere'}",
                   "tracking.enabled=false", "--out", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 1 and "nowhere" in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_empty_dataset_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = vitpipe("prepare", TINY, "data.source=folder", f"data.root={tmp_path / 'empty'}",
                   "tracking.enabled=false", "--out", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 1 and "empty" in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_non_image_file_is_named(tmp_path):
    root = tmp_path / "imgs"
    digits = load_digits()
    for label in (0, 1):
        (root / str(label)).mkdir(parents=True)
        for i in np.flatnonzero(digits.target == label)[:5]:
            Image.fromarray((digits.images[i] * 15).astype(np.uint8)).save(root / str(label) / f"{i}.png")
    (root / "1" / "broken.png").write_bytes(b"this is not a png")
    proc = vitpipe("prepare", TINY, "data.source=folder", f"data.root={root}", "tracking.enabled=false",
                   "--out", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 1 and "broken.png" in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_truncated_shard_stops_pretrain_before_training(tmp_path, prepared):
    shard = prepared.parent / "shards" / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    proc = vitpipe("pretrain", TINY, *DIGITS, "tracking.enabled=false", "--manifest", prepared,
                   "--out", tmp_path / "pre", cwd=tmp_path)
    assert proc.returncode == 1
    assert "train-000001.tar" in proc.stderr and "bytes" in proc.stderr
    assert not (tmp_path / "pre" / "model.safetensors").exists()
    assert not (tmp_path / "pre" / "stage.json").exists()


def test_too_few_shards_for_the_ranks_are_refused_before_any_rank_starts(tmp_path):
    """One train shard cannot feed two ranks: the launcher says so at once, with the fixes in the
    recipe's own keys, where the ranks used to find it after ~45 s of start-up (a user's folder of
    80 photos hit it). The same check answers for finetune, in finetune's keys."""
    from pipeline.config import load_config
    from pipeline.data.errors import DataError
    from pipeline.data.manifest import load_manifest
    from pipeline.data.plan import check_train_plan

    prep = vitpipe("prepare", TINY, *DIGITS[:2], "data.shard_max_samples=1000", "tracking.enabled=false",
                   "--out", tmp_path / "prep", cwd=tmp_path)
    assert prep.returncode == 0, prep.stderr
    manifest = tmp_path / "prep" / "manifest.json"
    proc = vitpipe("pretrain", TINY, *DIGITS[:2], "tracking.enabled=false", "--manifest", manifest,
                   "--out", tmp_path / "pre", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert (f"{manifest}: 1 train shard(s) cannot feed 2 rank(s) x 1 loader worker(s): need at least 2 shards. "
            "Re-run prepare with data.shard_max_samples <= 90, use fewer pretrain.workers, or set "
            "pretrain.sampling=auto") in proc.stderr
    assert not (tmp_path / "pre" / "train.log").exists() and not (tmp_path / "pre" / "job.json").exists()
    cfg = load_config(TINY, [*DIGITS[:2]])
    with pytest.raises(DataError, match="use fewer finetune.workers, or set finetune.sampling=auto"):
        check_train_plan(load_manifest(manifest), cfg.finetune, keys="finetune.")
    auto = load_config(TINY, [*DIGITS[:2], "finetune.sampling=auto", "finetune.micro_batch=500"])
    with pytest.raises(DataError, match="fewer than micro_batch=500 samples per stream; lower finetune.micro_batch"):
        check_train_plan(load_manifest(manifest), auto.finetune, keys="finetune.")
    check_train_plan(load_manifest(manifest), load_config(TINY, ["finetune.sampling=auto"]).finetune, keys="finetune.")


def test_manifest_whose_hash_disagrees(tmp_path, prepared):
    info = json.loads(prepared.read_text())
    info["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    prepared.write_text(json.dumps(info))
    proc = vitpipe("pretrain", TINY, *DIGITS, "tracking.enabled=false", "--manifest", prepared,
                   "--out", tmp_path / "pre", cwd=tmp_path)
    assert proc.returncode == 1 and "train-000000.tar" in proc.stderr and "sha256" in proc.stderr


def test_manifest_whose_count_disagrees(tmp_path, prepared):
    info = json.loads(prepared.read_text())
    info["splits"]["val"]["shards"][0]["samples"] += 1
    info["splits"]["val"]["samples"] += 1
    prepared.write_text(json.dumps(info))
    proc = vitpipe("pretrain", TINY, *DIGITS, "tracking.enabled=false", "--manifest", prepared,
                   "--out", tmp_path / "pre", cwd=tmp_path)
    assert proc.returncode == 1 and "val-000000.tar" in proc.stderr


def test_checkpoint_from_another_architecture(tmp_path, prepared):
    # model.json says width 32, the tensors are width 64: another architecture's checkpoint.
    wide = build_model(ModelConfig(patch_size=2, width=64, depth=1, heads=2, mlp_dim=64, in_channels=1), 14, 10)
    meta = weights_meta(ModelConfig(patch_size=2, width=32, depth=1, heads=2, mlp_dim=64, in_channels=1), 14, 10,
                        [str(i) for i in range(10)])
    save_weights_pair(tmp_path / "foreign", wide.state_dict(), meta)
    proc = vitpipe("finetune", TINY, *DIGITS, "tracking.enabled=false", "--manifest", prepared,
                   "--init", tmp_path / "foreign" / "model.safetensors", "--out", tmp_path / "ft", cwd=tmp_path)
    assert proc.returncode == 1
    assert "foreign/model.safetensors" in proc.stderr and "checkpoint (192, 64), model (96, 32)" in proc.stderr
    assert not (tmp_path / "ft" / "model.safetensors").exists()


def test_not_a_weights_pair(tmp_path, prepared):
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    (tmp_path / "junk.json").write_text("{}")
    proc = vitpipe("finetune", TINY, *DIGITS, "tracking.enabled=false", "--manifest", prepared,
                   "--init", tmp_path / "junk.safetensors", "--out", tmp_path / "ft", cwd=tmp_path)
    assert proc.returncode == 1 and "junk.json" in proc.stderr and "not a vitpipe weights pair" in proc.stderr


def test_missing_onnx_for_benchmark(tmp_path):
    proc = vitpipe("benchmark", TINY, "tracking.enabled=false", "--onnx", tmp_path / "none.onnx",
                   "--weights", tmp_path / "none.safetensors", cwd=tmp_path)
    assert proc.returncode == 1 and "none.onnx" in proc.stderr


def test_init_weights_are_never_unpickled(tmp_path, prepared):
    # --init/--weights are read with safetensors, which holds no code: a pickle under that name is
    # refused by name, and its payload does not run.
    import pickle

    target = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(target)!r}, 'w').write('payload ran')",))

    pair = tmp_path / "planted"
    pair.mkdir()
    (pair / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    meta = weights_meta(ModelConfig(patch_size=2, width=32, depth=1, heads=2, mlp_dim=64, in_channels=1), 14, 10,
                        [str(i) for i in range(10)])
    (pair / "model.json").write_text(json.dumps(meta))
    for command, flag in (("finetune", "--init"), ("export", "--weights")):
        proc = vitpipe(command, TINY, *DIGITS, "tracking.enabled=false", "--manifest", prepared,
                       flag, pair / "model.safetensors", "--out", tmp_path / command, cwd=tmp_path)
        assert proc.returncode == 1 and "planted/model.safetensors: cannot read safetensors" in proc.stderr, proc.stderr
        assert not target.exists()
