"""Graceful preemption: SIGTERM/SIGUSR1 (how SLURM and Kubernetes announce it) finish the current
step, write a checkpoint and exit with `REQUEUE_EXIT`, a status the launchers requeue on."""

from __future__ import annotations

import signal

from pipeline.launch.lifetime import REQUEUE_EXIT  # noqa: F401  (re-exported: the status a preempted rank exits with)


class TrainingPreempted(RuntimeError):
    """The ranks stopped on request after committing a checkpoint; running the stage again resumes."""


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
