"""Graceful preemption: SIGTERM/SIGUSR1 (how SLURM and Kubernetes announce it) finish the current
step, write a checkpoint and exit with `REQUEUE_EXIT`, a status the launchers requeue on."""

from __future__ import annotations

import signal

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again" — what a requeue means.
REQUEUE_EXIT = 75


class Preemption:
    """Remembers that a stop was requested; the training loop polls `requested` between steps."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.requested = False
        self.signal_name: str | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
