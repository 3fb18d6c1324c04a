"""The one atomic writer: unique temporaries, clean-up on failure, folders as well as files."""

import multiprocessing as mp
import os

import pytest

from pipeline import atomic


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.json"
    atomic.write_json(p, {"x": 1})
    atomic.write_json(p, {"x": 2})
    assert p.read_text().strip().endswith("}") and '"x": 2' in p.read_text()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.json"]


def test_failed_write_keeps_old_file_and_removes_temporary(tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk"):
        with atomic.atomic_path(p) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert p.read_bytes() == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["model.bin"]


def test_temporaries_are_unique_per_writer(tmp_path):
    p = tmp_path / "x"
    with atomic.atomic_path(p) as t1, atomic.atomic_path(p) as t2:
        assert t1 != t2 and t1.parent == t2.parent == tmp_path
        assert str(os.getpid()) in t1.name and atomic.is_temporary(t1)
        t1.write_text("1")
        t2.write_text("2")
    assert p.read_text() in {"1", "2"}
    assert [f.name for f in tmp_path.iterdir()] == ["x"]


def test_atomic_dir_swaps_only_when_complete(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    (d / "old.tar").write_text("old")
    with pytest.raises(ValueError):
        with atomic.atomic_dir(d) as tmp:
            (tmp / "new.tar").write_text("new")
            raise ValueError("corrupt image")
    assert [f.name for f in d.iterdir()] == ["old.tar"]
    with atomic.atomic_dir(d) as tmp:
        (tmp / "new.tar").write_text("new")
        assert [f.name for f in d.iterdir()] == ["old.tar"]  # readers still see the old folder
    assert [f.name for f in d.iterdir()] == ["new.tar"]
    assert [f.name for f in tmp_path.iterdir()] == ["shards"]


def _die_mid_write(path):
    with atomic.atomic_path(path) as tmp:
        tmp.write_bytes(b"partial")
        os._exit(9)  # killed: no clean-up runs


def test_leftovers_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    p = tmp_path / "record.json"
    proc = mp.get_context("fork").Process(target=_die_mid_write, args=(p,))
    proc.start()
    proc.join()
    assert proc.exitcode == 9 and not p.exists()
    left = [f for f in tmp_path.iterdir() if atomic.is_temporary(f)]
    assert len(left) == 1
    with atomic.atomic_path(tmp_path / "live") as mine:
        mine.write_text("in progress")
        assert atomic.remove_leftovers(tmp_path) == left
        assert mine.exists()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["live"]


def test_move_into_place_renames_a_finished_file_over_the_old_one(tmp_path):
    from pipeline.atomic import move_into_place

    (tmp_path / "model.onnx").write_bytes(b"old")
    finished = tmp_path / "staging" / "model.onnx"
    finished.parent.mkdir()
    finished.write_bytes(b"new")
    assert move_into_place(finished, tmp_path / "model.onnx") == tmp_path / "model.onnx"
    assert (tmp_path / "model.onnx").read_bytes() == b"new" and not finished.exists()


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                        (0o077, 0o600, 0o700)])
def test_written_files_and_folders_get_the_umasks_mode_not_mkstemps(tmp_path, umask, file_mode, dir_mode):
    """What `open()` and `mkdir()` would give: mkstemp's 0o600 and mkdtemp's 0o700 made every
    manifest, shard folder and weights file unreadable to the group sharing a dataset or a model."""
    old = os.umask(umask)
    try:
        text = atomic.write_text(tmp_path / "manifest.json", "{}")
        with atomic.atomic_path(tmp_path / "model.safetensors") as tmp:
            tmp.write_bytes(b"weights")  # a writer that reopens the temporary keeps its mode
        with atomic.atomic_dir(tmp_path / "shards") as folder:
            (folder / "shard-000000.tar").write_bytes(b"tar")
        assert atomic._umask() == umask
    finally:
        os.umask(old)
    for path in (text, tmp_path / "model.safetensors", tmp_path / "shards" / "shard-000000.tar"):
        assert oct(path.stat().st_mode & 0o777) == oct(file_mode), path
    assert oct((tmp_path / "shards").stat().st_mode & 0o777) == oct(dir_mode)
