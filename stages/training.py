"""Run a training stage from the orchestrating process: write the job, launch the ranks, read the result.

The stage layer composes the two layers below it: `pipeline.launch` starts processes (torchrun
here, schedulers for submitted jobs) and knows nothing of training; `pipeline.train` is what each
rank runs and knows nothing of how it was started. Also the one place that ends a tracked run with
the status its work ended in (`tracked_run`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.launch.local import LaunchError, launch_local
from pipeline.run_layout import CHECKPOINTS_DIR, JOB_FILE, RESULT_FILE, TRAIN_LOG, weights_file, weights_meta_file
from pipeline.track import MLflowTracker, Tracker, continue_previous_run
from pipeline.train import checkpoints
from pipeline.train.job import PREEMPTED_FILE, TrainJob
from pipeline.train.preemption import REQUEUE_EXIT, TrainingPreempted
from pipeline.train.worker import ERROR_PREFIX, EXIT_PREFIX, WORKER_MODULE


class TrainingError(RuntimeError):
    """A training stage whose ranks failed; the message is the failing rank's own error."""


@contextmanager
def tracked_run(tracker: Tracker, owned: bool = True) -> Iterator[Tracker]:
    """End `tracker`'s run with the status of the work inside: FINISHED, KILLED (preempted after a
    checkpoint; the next attempt reopens the run) or FAILED (anything else, Ctrl-C included).
    `owned=False`: the run belongs to the caller, which ends it; nothing is written here."""
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except TrainingPreempted:
        status = "KILLED"
        raise
    finally:
        if owned:
            tracker.finish(status)


def resume_tracker(tracker: Tracker, out_dir: Path) -> tuple[Tracker, bool]:
    """The run a training stage logs to: the one that wrote its newest checkpoint, if it resumes."""
    found = checkpoints.latest(Path(out_dir) / CHECKPOINTS_DIR)
    return continue_previous_run(tracker, found[2].get("mlflow_run_id") if found else None)


def run_training(job: TrainJob, nprocs: int, tracker: Tracker) -> dict:
    """Launch `job` on `nprocs` local ranks (rank 0 logs to `tracker`'s run); return rank 0's result."""
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(tracker, MLflowTracker):
        job.tracking_uri, job.run_id = tracker.tracking_uri, tracker.run_id
        job.system_metrics_interval = tracker.system_metrics_interval
    job_path = out_dir / JOB_FILE
    job.save(job_path)
    for stale in [*out_dir.glob(f"{ERROR_PREFIX}*.txt"), *out_dir.glob(f"{EXIT_PREFIX}*.txt"), out_dir / PREEMPTED_FILE]:
        stale.unlink(missing_ok=True)
    try:
        launch_local([WORKER_MODULE, "--job", str(job_path)], nprocs, out_dir / TRAIN_LOG, job.train.max_restarts,
                     job.train.preemption_grace_s)
    except LaunchError as e:
        if e.exit_code == REQUEUE_EXIT or (out_dir / PREEMPTED_FILE).is_file():
            raise TrainingPreempted(f"{job.stage} stopped on request after committing a checkpoint in "
                                    f"{out_dir / 'checkpoints'}; run the same command again to resume") from None
        raise TrainingError(failure_message(job.stage, out_dir, nprocs, str(e))) from None
    result_path = out_dir / RESULT_FILE
    if not result_path.is_file():
        raise TrainingError(f"{job.stage}: ranks exited cleanly but {result_path} was not written")
    return json.loads(result_path.read_text())


def failure_message(stage: str, out_dir: Path, nprocs: int, launch_error: str) -> str:
    """What failed, naming the rank that died first, not a survivor that then lost its peer.

    A rank that was killed (SIGKILL, the OOM killer, a crash) writes nothing, so it is the one
    without an exit file while others have theirs; otherwise the earliest error written is the
    cause (the peers' "connection closed" errors come after it)."""
    log = out_dir / TRAIN_LOG
    ended = {int(p.stem[len(EXIT_PREFIX):]) for p in out_dir.glob(f"{EXIT_PREFIX}*.txt") if p.stem[len(EXIT_PREFIX):].isdigit()}
    errors = sorted(out_dir.glob(f"{ERROR_PREFIX}*.txt"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    killed = [r for r in range(nprocs) if r not in ended]
    if ended and killed:  # some ranks ran and ended; these did not end by any path Python sees
        who = ", ".join(f"rank {r}" for r in killed)
        then = ""
        if errors:
            then = f"; then rank {errors[0].stem[len(ERROR_PREFIX):]} failed: {errors[0].read_text().strip()}"
        return (f"{stage} failed: {who} died without reporting an error (killed by a signal such as SIGKILL, "
                f"e.g. by the out-of-memory killer, or crashed){then} (log: {log})")
    if errors:
        rank = errors[0].stem[len(ERROR_PREFIX):]
        return f"{stage} failed on rank {rank}: {errors[0].read_text().strip()} (log: {log})"
    return f"{stage} failed: {launch_error}"


def run_training_stage(job: TrainJob, nprocs: int, tracker: Tracker, params: dict) -> dict:
    """A training stage's run: continue the MLflow run of a resumed checkpoint, log `params`, train,
    log model.json; the result gains `weights`. Ends a continued run FINISHED, FAILED or KILLED."""
    out_dir = Path(job.out_dir)
    tracker, owned = resume_tracker(tracker, out_dir)
    with tracked_run(tracker, owned):
        tracker.log_params(params)
        result = run_training(job, nprocs, tracker)
        result["weights"] = str(weights_file(out_dir))
        tracker.log_artifact(weights_meta_file(out_dir))
        return result
