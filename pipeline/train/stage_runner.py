"""Run a training stage from the orchestrating process: write the job, launch the ranks, read the result."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.launch.local import LaunchError, launch_local
from pipeline.track import MLflowTracker, Tracker, continue_previous_run
from pipeline.train import checkpoints
from pipeline.train.loop import PREEMPTED_FILE, RESULT_FILE, TrainJob
from pipeline.train.preemption import REQUEUE_EXIT


class TrainingError(RuntimeError):
    """A training stage whose ranks failed; the message is the failing rank's own error."""


class TrainingPreempted(RuntimeError):
    """The ranks stopped on request after committing a checkpoint; running the stage again resumes."""


def resume_tracker(tracker: Tracker, out_dir: Path) -> tuple[Tracker, bool]:
    """The run a training stage logs to: the one that wrote its newest checkpoint, if it resumes."""
    found = checkpoints.latest(Path(out_dir) / "checkpoints")
    return continue_previous_run(tracker, found[2].get("mlflow_run_id") if found else None)


def run_training(job: TrainJob, nprocs: int, tracker: Tracker) -> dict:
    """Launch `job` on `nprocs` local ranks (rank 0 logs to `tracker`'s run); return rank 0's result."""
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(tracker, MLflowTracker):
        job.tracking_uri, job.run_id = tracker.tracking_uri, tracker.run_id
        job.system_metrics_interval = tracker.system_metrics_interval
    job_path = out_dir / "job.json"
    job.save(job_path)
    for stale in [*out_dir.glob("error-rank*.txt"), out_dir / PREEMPTED_FILE]:
        stale.unlink(missing_ok=True)
    try:
        launch_local(job_path, nprocs, out_dir / "train.log", int(job.train.get("max_restarts", 0)))
    except LaunchError as e:
        if e.exit_code == REQUEUE_EXIT or (out_dir / PREEMPTED_FILE).is_file():
            raise TrainingPreempted(f"{job.stage} stopped on request after committing a checkpoint in "
                                    f"{out_dir / 'checkpoints'}; run the same command again to resume") from None
        errors = sorted(out_dir.glob("error-rank*.txt"))
        if errors:
            first = errors[0].read_text().strip()
            raise TrainingError(f"{job.stage} failed on {errors[0].stem.split('-')[-1]}: {first} (log: {out_dir / 'train.log'})") from None
        raise TrainingError(f"{job.stage} failed: {e}") from None
    result_path = out_dir / RESULT_FILE
    if not result_path.is_file():
        raise TrainingError(f"{job.stage}: ranks exited cleanly but {result_path} was not written")
    return json.loads(result_path.read_text())


def run_training_stage(job: TrainJob, nprocs: int, tracker: Tracker, params: dict) -> dict:
    """A training stage's run: continue the MLflow run of a resumed checkpoint, log `params`, train,
    log model.json; the result gains `weights`. Ends a continued run FINISHED, FAILED or KILLED."""
    out_dir = Path(job.out_dir)
    tracker, owned = resume_tracker(tracker, out_dir)
    status = "FAILED"
    try:
        tracker.log_params(params)
        result = run_training(job, nprocs, tracker)
        result["weights"] = str(out_dir / "model.safetensors")
        tracker.log_artifact(out_dir / "model.json")
        status = "FINISHED"
        return result
    except TrainingPreempted:
        status = "KILLED"  # checkpointed on request; the next attempt reopens this run
        raise
    finally:
        if owned:
            tracker.finish(status)
