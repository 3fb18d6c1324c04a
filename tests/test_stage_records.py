"""Stage records: a rerun is skipped exactly when nothing it depends on changed (source content,
inputs by content), and never throws away work without saying so."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.sources import load_source
from stages import prepare


def digit_folder(root: Path, per_class: int = 6) -> Path:
    """Real 8x8 scikit-learn digits of three classes saved as PNGs in root/<class>/."""
    samples = load_source(DataConfig(source="digits")).samples
    for digit in (0, 1, 2):
        (root / f"d{digit}").mkdir(parents=True)
        for s in [s for s in samples if s.label == digit][:per_class]:
            Image.fromarray(s.array).save(root / f"d{digit}" / f"{s.key}.png")
    return root


def prepared(capsys, data: DataConfig, out: Path) -> tuple[bool, dict]:
    """(whether prepare reran, the manifest) after one `prepare.run`."""
    result = prepare.run(data, out)
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    return "up to date" not in printed, {**result, "manifest_json": manifest}


def test_folder_source_change_reruns_prepare_and_only_then(tmp_path, capsys):
    src = digit_folder(tmp_path / "src")
    data = DataConfig(source="folder", root=str(src), val_fraction=0.2, shard_max_samples=8, workers=1)
    out = tmp_path / "prep"
    ran, first = prepared(capsys, data, out)
    assert ran and first["train_samples"] + first["val_samples"] == 18
    ran, _ = prepared(capsys, data, out)
    assert not ran  # untouched: up to date

    # one more image: prepare reruns and the manifest counts it
    extra = next(s for s in load_source(DataConfig(source="digits")).samples if s.label == 1 and s.key.endswith("99"))
    Image.fromarray(extra.array).save(src / "d1" / "extra.png")
    ran, added = prepared(capsys, data, out)
    assert ran and added["train_samples"] + added["val_samples"] == 19

    # one image rotated in place (same name, same count): prepare reruns and the shards change
    victim = sorted((src / "d2").glob("*.png"))[0]
    Image.fromarray(np.rot90(np.asarray(Image.open(victim)))).save(victim)
    shas = lambda m: [s["sha256"] for split in m["splits"].values() for s in split["shards"]]  # noqa: E731
    ran, rotated = prepared(capsys, data, out)
    assert ran and rotated["train_samples"] + rotated["val_samples"] == 19
    assert shas(rotated["manifest_json"]) != shas(added["manifest_json"])
    ran, _ = prepared(capsys, data, out)
    assert not ran

    # the same tree moved elsewhere (names, sizes and mtimes kept) is the same source
    moved = Path(shutil.move(str(src), tmp_path / "elsewhere"))
    ran, _ = prepared(capsys, dataclasses.replace(data, root=str(moved)), out)
    assert not ran


def test_list_source_change_reruns_prepare(tmp_path, capsys):
    src = digit_folder(tmp_path / "src", per_class=4)
    lines = [f"{p.relative_to(src).as_posix()},{p.parent.name}" for p in sorted(src.rglob("*.png"))]
    listing = src / "list.csv"
    listing.write_text("\n".join(lines[:-1]) + "\n")
    data = DataConfig(source="list", list_file=str(listing), val_fraction=0.25, workers=1)
    out = tmp_path / "prep"
    assert prepared(capsys, data, out)[0]
    assert not prepared(capsys, data, out)[0]
    listing.write_text("\n".join(lines) + "\n")  # one more line
    ran, result = prepared(capsys, data, out)
    assert ran and result["train_samples"] + result["val_samples"] == 12


def test_inputs_are_identified_by_content_not_location(tmp_path):
    from stages import record

    a = tmp_path / "a" / "weights.json"
    a.parent.mkdir()
    a.write_text('{"w": 1}')
    fp = record.fingerprint("export", {"opset": 17}, [a])
    b = Path(shutil.move(str(tmp_path / "a"), tmp_path / "b")) / "weights.json"
    assert record.fingerprint("export", {"opset": 17}, [b]) == fp  # moved: same
    b.write_text('{"w": 2}')
    assert record.fingerprint("export", {"opset": 17}, [b]) != fp  # edited: different


def test_a_moved_stage_folder_is_complete_and_names_its_new_paths(tmp_path):
    from stages import record

    out = tmp_path / "run1" / "export"
    out.mkdir(parents=True)
    (out / "model.onnx").write_bytes(b"onnx")
    record.finish(out, "export", "fp1", [out / "model.onnx"], {"onnx": str(out / "model.onnx"), "opset": 17})
    moved = Path(shutil.move(str(tmp_path / "run1"), tmp_path / "run2")) / "export"
    done = record.completed(moved, "fp1")
    assert done == {"onnx": str((moved / "model.onnx").resolve()), "opset": 17}
    (moved / "model.onnx").unlink()
    assert record.completed(moved, "fp1") is None  # an output gone: not complete


def training_folder(tmp_path: Path, steps: int = 10, lr: float = 1e-3, committed_at=(4, 8)):
    """A pretrain folder as an interrupted run leaves it: settings.json and committed checkpoints."""
    from pipeline.train import checkpoints
    from stages import record

    out = tmp_path / "pretrain"
    config = {"model": {"width": 16}, "train": {"steps": steps, "lr": lr}}
    fp = record.fingerprint("pretrain", config, [])
    record.begin(out, fp, stage_settings=record.settings(config, []), stage="pretrain")
    root = record.mark_checkpoints(out, fp, record.settings(config, []))
    for step in committed_at:
        (root / checkpoints.tag_for(step)).mkdir()
        (root / checkpoints.tag_for(step) / "mp_rank_00_model_states.pt").write_bytes(b"state")
        checkpoints.commit(root, checkpoints.tag_for(step), step, 2, 2)
    (out / "losses.jsonl").write_text('{"step": 1, "loss": 2.3}\n')
    return out


def begin_with(out: Path, force: bool = False, **train):
    from stages import record

    config = {"model": {"width": 16}, "train": {"steps": 10, "lr": 1e-3, **train}}
    fp = record.fingerprint("pretrain", config, [])
    record.begin(out, fp, resume=not force, stage_settings=record.settings(config, []), stage="pretrain")


def tags(out: Path) -> list[str]:
    from pipeline.train import checkpoints

    return [t for _, t, _ in checkpoints.committed(out / "checkpoints")]


def test_more_steps_continue_from_the_newest_checkpoint(tmp_path, capsys):
    out = training_folder(tmp_path)
    begin_with(out, steps=14)
    assert tags(out) == ["step_00000004", "step_00000008"] and (out / "losses.jsonl").is_file()
    assert "continuing from step_00000008: steps 10 -> 14" in capsys.readouterr().out
    begin_with(out, steps=8)  # fewer steps, down to the newest checkpoint: still continues
    assert tags(out) == ["step_00000004", "step_00000008"]


def test_a_change_that_cannot_continue_is_refused_naming_it_and_keeps_the_checkpoints(tmp_path):
    from stages.record import StageError

    out = training_folder(tmp_path)
    with pytest.raises(StageError) as err:
        begin_with(out, lr=2e-3, steps=12)
    msg = str(err.value)
    assert "pretrain.lr: 0.001 -> 0.002" in msg and "pretrain.steps: 10 -> 12" in msg
    assert "2 committed checkpoint(s), newest step_00000008" in msg
    assert "set the old values again" in msg and "--force" in msg
    assert tags(out) == ["step_00000004", "step_00000008"]  # nothing deleted
    with pytest.raises(StageError, match=r"pretrain.steps: 10 -> 6[\s\S]*shrink down to 8"):
        begin_with(out, steps=6)  # before the newest checkpoint
    assert tags(out) == ["step_00000004", "step_00000008"]


def test_force_says_what_it_deletes_before_deleting(tmp_path, capsys):
    out = training_folder(tmp_path)
    begin_with(out, force=True, lr=2e-3)
    assert "--force: deleting 2 committed checkpoint(s)" in capsys.readouterr().out
    assert tags(out) == [] and not (out / "losses.jsonl").exists()


def test_uncommitted_checkpoints_of_other_settings_are_dropped_quietly(tmp_path, capsys):
    out = training_folder(tmp_path, committed_at=())
    (out / "checkpoints" / "step_00000004").mkdir()  # torn: never committed
    begin_with(out, lr=2e-3)
    assert not (out / "checkpoints").exists() and capsys.readouterr().out == ""


HOLD = """
import sys, time
from pipeline.folder_lock import FolderLock
locks = [FolderLock(f, "vitpipe run tiny") for f in sys.argv[1:]]
for lock in locks:
    lock.acquire()
print("held", flush=True)
time.sleep(300)
"""


def test_a_second_writer_of_a_folder_refuses_naming_the_holder(tmp_path, capsys):
    import os
    import socket
    import subprocess
    import sys
    import time

    from pipeline.folder_lock import FolderLock

    root = Path(__file__).resolve().parents[1]
    tiny = root / "configs" / "pipeline" / "tiny.yaml"
    env = {**os.environ, "PYTHONPATH": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    work = tmp_path / "w"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(work), str(work / "pretrain")], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        who = f"in use by pid {holder.pid} on host {socket.gethostname()} (vitpipe run tiny"
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "pipeline", "run", str(tiny), "--workdir", str(work)],
                             env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and who in run.stderr, run.stderr[-2000:]
        assert time.perf_counter() - t0 < 60  # refused, not waiting
        assert not (work / "config.yaml").exists() and not (work / "prepare").exists()  # nothing written
        stage = subprocess.run([sys.executable, "-m", "pipeline", "pretrain", str(tiny), "--workdir", str(work)],
                               env=env, capture_output=True, text=True, timeout=120)
        assert stage.returncode == 1 and f"{work / 'pretrain'}: {who}" in stage.stderr, stage.stderr[-2000:]
    finally:
        holder.kill()
        holder.wait()
    # Killed with -9, the holder's lock is released by the kernel; the next writer takes over and says so.
    capsys.readouterr()
    with FolderLock(work, "test"):
        err = capsys.readouterr().err
        assert f"taking over the lock left by pid {holder.pid}" in err and "no longer running" in err
        with pytest.raises(RuntimeError, match=f"in use by pid {os.getpid()}"):
            FolderLock(work).acquire()  # another handle in this very process is refused too
    with FolderLock(work, "test"):  # released cleanly: nothing to take over
        assert capsys.readouterr().err == ""


def test_prepare_skips_lists_and_limits_unreadable_images_and_keeps_the_old_dataset(tmp_path, capsys):
    from pipeline.data.errors import DataError
    from pipeline.data.manifest import load_manifest, verify_manifest

    src = digit_folder(tmp_path / "src")  # 18 readable images
    (src / "d0" / "broken.png").write_bytes(b"this is not a png")
    good = sorted((src / "d1").glob("*.png"))[0].read_bytes()
    (src / "d1" / "cut.png").write_bytes(good[: len(good) // 2])  # truncated
    out = tmp_path / "prep"
    data = DataConfig(source="folder", root=str(src), val_fraction=0.2, shard_max_samples=8, workers=1,
                      max_corrupt_fraction=0.15)  # up to 3 of 20
    result = prepare.run(data, out)
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert result["skipped"] == 2 and result["train_samples"] + result["val_samples"] == 18
    skipped = {Path(s["path"]).name: s for s in manifest["skipped"]}
    assert set(skipped) == {"broken.png", "cut.png"}
    assert all(s["reason"].startswith("not a readable image") and s["split"] in ("train", "val")
               for s in skipped.values())
    for name in ("broken.png", "cut.png"):
        assert f"[prepare] skipped {src / ('d0' if name == 'broken.png' else 'd1') / name}" in printed
    assert "2 unreadable image(s) skipped" in printed
    m = load_manifest(out)
    verify_manifest(m)
    assert m.num_samples("train") + m.num_samples("val") == 18
    before = (out / "manifest.json").read_bytes()

    # Over the limit: a clear error naming the files; the previous dataset is still there, intact.
    with pytest.raises(DataError) as err:
        prepare.run(dataclasses.replace(data, max_corrupt_fraction=0.05), out, force=True)
    msg = str(err.value)
    assert f"{src / 'd0' / 'broken.png'}: not a readable image" in msg and "cut.png" in msg
    assert "2 of 20 images could not be read, more than data.max_corrupt_fraction allows (1)" in msg
    assert (out / "manifest.json").read_bytes() == before
    verify_manifest(load_manifest(out))  # its shards too
    assert not (out / "stage.json").exists()  # but the stage is not complete
    assert not list(out.glob(".prepare-staging-*"))
