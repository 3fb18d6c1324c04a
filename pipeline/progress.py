"""Progress of long work (prepare, verify, training steps, export, benchmark): a bar with rate and
ETA on a terminal, plain log lines at a bounded rate otherwise (a pipe, a log file, a batch job).

Our own small class rather than tqdm: tqdm is not a declared dependency, and the plain mode is the
one that matters on clusters (one line every `VITPIPE_PROGRESS_INTERVAL` seconds, default 10, and a
last line at the end, so a log shows where the work was without a line per item).

Rank logic lives here, once: in a multi-rank job only rank 0 (torchrun's RANK) prints.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

# A terminal bar is redrawn at most this often (a redraw per item would cost more than small items).
TTY_REFRESH_S = 0.1
PLAIN_INTERVAL_S = 10.0
_BAR_WIDTH = 24


def is_main_rank() -> bool:
    """Whether this process prints progress: rank 0 of a torchrun job, or a process that is no rank."""
    return os.environ.get("RANK", "0") == "0"


def plain_interval() -> float:
    """Seconds between plain progress lines (VITPIPE_PROGRESS_INTERVAL, default 10)."""
    value = os.environ.get("VITPIPE_PROGRESS_INTERVAL")
    try:
        return max(float(value), 0.0) if value else PLAIN_INTERVAL_S
    except ValueError:
        raise ValueError(f"VITPIPE_PROGRESS_INTERVAL={value!r}: expected a number of seconds") from None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _rate(rate: float) -> str:
    return f"{rate:.3g}" if rate < 100 else f"{rate:.0f}"


class Progress:
    """Counts work done towards `total` (None: unknown) and shows it on `stream` (default stderr).

    Use as a context manager, or call `close()`: the last state is always shown once at the end.
    The rate is the mean since the start (what is left divided by it gives the ETA); `initial` work
    (e.g. the steps a resumed run already has) counts as done but not into the rate."""

    def __init__(self, label: str, total: int | None = None, unit: str = "it", initial: int = 0,
                 stream: TextIO | None = None, enabled: bool | None = None, interval: float | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.done = self._initial = initial
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = is_main_rank() if enabled is None else enabled
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):  # a closed or unusual stream: plain lines
            self.tty = False
        self.interval = interval if interval is not None else (TTY_REFRESH_S if self.tty else plain_interval())
        self._start = time.monotonic()
        self._last_shown = self._start
        self._closed = False
        self.lines = 0  # plain lines written (what the rate bound is about)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count `n` more done; shows the state if the last showing is `interval` old."""
        self.done += n
        if not self.enabled or self._closed:
            return
        now = time.monotonic()
        if now - self._last_shown >= self.interval:
            self._show(now)

    def clear(self) -> None:
        """Erase a terminal bar's line, so a line printed next starts clean (the next update redraws
        the bar under it); nothing in plain mode."""
        if self.enabled and self.tty and not self._closed:
            try:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
            except (OSError, ValueError):
                self.enabled = False

    def close(self) -> None:
        """Show the final state (a bar ends its line); later updates show nothing."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._show(time.monotonic(), final=True)

    def text(self, now: float | None = None) -> str:
        """The state as one line: done/total, percent, rate, elapsed and ETA."""
        elapsed = (now if now is not None else time.monotonic()) - self._start
        rate = (self.done - self._initial) / elapsed if elapsed > 0 else 0.0
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        parts = [f"{count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts.append(f"{_rate(rate)} {self.unit}/s")
        parts.append(f"elapsed {_duration(elapsed)}")
        if self.total is not None and rate > 0 and self.done < self.total:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        return ", ".join(parts)

    def _show(self, now: float, final: bool = False) -> None:
        self._last_shown = now
        try:
            if self.tty:
                bar = ""
                if self.total:
                    filled = int(_BAR_WIDTH * min(self.done / self.total, 1.0))
                    bar = "|" + "#" * filled + "." * (_BAR_WIDTH - filled) + "| "
                # \r back to the line's start, \x1b[K clears what a longer previous line left
                self.stream.write(f"\r{self.label} {bar}{self.text(now)}\x1b[K" + ("\n" if final else ""))
            else:
                self.stream.write(f"{self.label} {'done: ' if final else ''}{self.text(now)}\n")
                self.lines += 1
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe or terminal must not stop the work it reports on
            self.enabled = False
