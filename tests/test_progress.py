"""Progress: a bar with rate and ETA on a terminal (a real pty), plain lines at a bounded rate on a
pipe, nothing from ranks other than 0; and the real commands (prepare, shards verify) showing it."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pipeline" / "tiny.yaml"

# 300 items of ~4 ms each (about 1.2 s of work), through the real class in a child process.
WORK = """
import time
from pipeline.progress import Progress
with Progress("[work] items", 300, "items") as p:
    for _ in range(300):
        time.sleep(0.004)
        p.update()
"""


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    env.pop("RANK", None)
    env.update(extra)
    return env


def _run_on_pty(code: str, env: dict) -> str:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            env=env)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0
    return out.decode()


def test_a_terminal_gets_one_bar_redrawn_in_place_with_rate_and_eta():
    out = _run_on_pty(WORK, _env())
    frames = out.split("\r")
    assert len(frames) >= 4, out  # redrawn as it goes (every 0.1 s), not printed once at the end
    assert out.count("\n") == 1  # one line, ended once the work is done
    last = out.rstrip("\r\n").split("\r")[-1]
    assert "|########################| 300/300 items (100%)" in last and "ETA" not in last, last
    middle = [f for f in frames if "ETA" in f]
    assert middle, out
    assert re.search(r"\[work\] items \|#*\.*\| \d+/300 items \(\d+%\), [\d.]+ items/s, elapsed 0:0\d, ETA 0:0\d", middle[0])
    assert "\x1b[K" in out  # each redraw clears the rest of the previous one


def test_a_line_printed_between_updates_does_not_land_on_the_bar():
    code = """
import sys
from pipeline.progress import Progress
with Progress("[work] items", 2, "items", stream=sys.stdout, interval=0) as p:
    p.update()
    p.clear()
    print("a result line", flush=True)
    p.update()
"""
    out = _run_on_pty(code, _env())
    assert "\r\x1b[Ka result line\r\n" in out, repr(out)
    assert out.rstrip("\r\n").split("\r")[-1].startswith("[work] items |")


def test_a_pipe_gets_plain_lines_at_a_bounded_rate():
    done = subprocess.run([sys.executable, "-c", WORK], capture_output=True, text=True, timeout=60,
                          env=_env(VITPIPE_PROGRESS_INTERVAL="0.25"))
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    # ~1.2 s of work (longer on a loaded machine) at one line per 0.25 s, and a last line
    elapsed = float(re.search(r"elapsed (\d+):(\d+)", lines[-1]).group(2)) + 1
    assert 2 <= len(lines) <= elapsed / 0.25 + 2, lines
    assert all(line.startswith("[work] items ") for line in lines)
    assert re.fullmatch(r"\[work\] items \d+/300 items \(\d+%\), [\d.]+ items/s, elapsed 0:0\d, ETA 0:0\d", lines[0])
    assert re.fullmatch(r"\[work\] items done: 300/300 items \(100%\), [\d.]+ items/s, elapsed 0:0\d", lines[-1])


def test_the_default_plain_interval_prints_only_the_last_line_of_short_work():
    done = subprocess.run([sys.executable, "-c", WORK], capture_output=True, text=True, timeout=60, env=_env())
    assert done.stderr.splitlines() == [l for l in done.stderr.splitlines() if "done: 300/300" in l] != []


def test_only_rank_0_prints():
    for rank, expected in (("1", ""), ("0", "done: 300/300")):
        done = subprocess.run([sys.executable, "-c", WORK], capture_output=True, text=True, timeout=60,
                              env=_env(RANK=rank))
        assert (expected in done.stderr) if expected else done.stderr == "", (rank, done.stderr)


def test_a_bad_interval_is_named():
    done = subprocess.run([sys.executable, "-c", WORK], capture_output=True, text=True, timeout=60,
                          env=_env(VITPIPE_PROGRESS_INTERVAL="often"))
    assert done.returncode != 0 and "VITPIPE_PROGRESS_INTERVAL='often': expected a number of seconds" in done.stderr


@pytest.mark.slow
def test_prepare_and_verify_show_their_progress(tmp_path):
    env = _env()
    prep = subprocess.run([sys.executable, "-m", "pipeline", "prepare", str(TINY), "--out", str(tmp_path / "p")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert prep.returncode == 0, prep.stderr[-2000:]
    assert re.search(r"^\[prepare\] encoding done: 400/400 images \(100%\), [\d.]+ images/s", prep.stderr, re.M), prep.stderr
    verify = subprocess.run([sys.executable, "-m", "pipeline", "shards", "verify", str(tmp_path / "p" / "manifest.json")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert verify.returncode == 0, verify.stderr[-2000:]
    assert re.search(r"^\[verify\] shards done: (\d+)/\1 shards \(100%\)", verify.stderr, re.M), verify.stderr
