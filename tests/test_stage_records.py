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
