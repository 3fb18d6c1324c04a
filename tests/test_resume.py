"""Exact resume: the loss after resuming equals, step for step, the loss of an uninterrupted run.

Real 2-rank DeepSpeed runs with 2 loader workers per rank, stochastic depth, mixup and label
smoothing on (so model RNG, mixing RNG and the data position must all be restored), crossing an
epoch boundary after the resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.track import NullTracker
from pipeline.train import checkpoints
from pipeline.train.loop import LOSSES_FILE, TrainJob
from stages.training import TrainingError, TrainingPreempted, run_training
from stages import prepare

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pipeline" / "tiny.yaml"
OVERRIDES = ["pretrain.steps=26", "pretrain.workers=2", "pretrain.log_every=5", "pretrain.checkpoint_every=0",
             "model.drop_path=0.1", "pretrain.augment.mixup_alpha=0.2", "pretrain.label_smoothing=0.1",
             "pretrain.augment.random_resized_crop=true", "pretrain.augment.crop_scale=[0.5, 1.0]"]

pytestmark = pytest.mark.slow


def losses(out_dir: Path) -> dict[int, float]:
    """Loss per step; a resumed run's later lines win over an interrupted run's lines for the same step."""
    out = {}
    for line in (out_dir / LOSSES_FILE).read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("resume")
    cfg = load_config(TINY, OVERRIDES)
    manifest = prepare.run(cfg.data, work / "prepare")["manifest"]

    def job(out: str, **extra) -> TrainJob:
        return TrainJob(stage="pretrain", model=cfg.model, train=cfg.pretrain,
                        manifest=manifest, out_dir=str(work / out), **extra)

    reference = run_training(job("reference"), 2, NullTracker())
    return {"work": work, "cfg": cfg, "manifest": manifest, "job": job, "reference": reference,
            "ref_losses": losses(work / "reference")}


def test_reference_run_crosses_an_epoch(setup):
    assert len(setup["ref_losses"]) == 26
    assert setup["reference"]["steps"] == 26


def test_resume_after_step_k_reproduces_the_uninterrupted_losses(setup):
    job = setup["job"]
    with pytest.raises(TrainingPreempted, match="run the same command again to resume"):
        run_training(job("interrupted", stop_after=17), 2, NullTracker())
    root = setup["work"] / "interrupted" / "checkpoints"
    assert checkpoints.latest(root)[0] == 17
    result = run_training(job("interrupted"), 2, NullTracker())
    assert result["resumed_from_step"] == 17
    got, ref = losses(setup["work"] / "interrupted"), setup["ref_losses"]
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == ref[step], (step, got[step], ref[step])
    assert result["val_accuracy"] == setup["reference"]["val_accuracy"]


def test_sigterm_checkpoints_and_auto_resume_continues(setup, tmp_path):
    out_dir = setup["work"] / "sigterm"
    cmd = [sys.executable, "-m", "pipeline", "pretrain", str(TINY), *OVERRIDES, "pretrain.steps=80",
           "--manifest", setup["manifest"], "--out", str(out_dir)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    losses_file = out_dir / LOSSES_FILE
    deadline = time.time() + 240
    while time.time() < deadline and (not losses_file.exists() or len(losses_file.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what Kubernetes sends to PID 1 on preemption
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-3000:]  # EX_TEMPFAIL: a status schedulers requeue on
    assert "stopped on request after committing a checkpoint" in err
    stopped = checkpoints.latest(out_dir / "checkpoints")
    assert stopped is not None and 3 <= stopped[0] < 80
    assert not (out_dir / "model.safetensors").exists() and not (out_dir / "stage.json").exists()

    # A setting the checkpoint cannot continue under is refused, naming it; nothing is deleted.
    refused = subprocess.run([*cmd, "pretrain.lr=0.003"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300, env=env)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "pretrain.lr: 0.002 -> 0.003" in refused.stderr and "--force" in refused.stderr
    assert checkpoints.latest(out_dir / "checkpoints")[:2] == stopped[:2]

    # The same command with more steps: resume: auto continues from the committed checkpoint to
    # the new end (the schedule's end moves; steps already taken are kept).
    done = subprocess.run([*cmd, "pretrain.steps=90"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"continuing from step_{stopped[0]:08d}: steps 80 -> 90" in done.stdout
    assert f"resumed from step_{stopped[0]:08d}" in done.stdout
    result = json.loads((out_dir / "result.json").read_text())
    assert result["resumed_from_step"] == stopped[0] and result["steps"] == 90
    lines = [json.loads(x)["step"] for x in (out_dir / LOSSES_FILE).read_text().splitlines()]
    assert lines == list(range(1, 91))  # every step once: none missing, none repeated
    assert (out_dir / "model.safetensors").is_file()

    # The same MLflow run continued: one loss history across the interruption, finished at the end.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("vitpipe").experiment_id])
    assert [r.data.params for r in runs if r.info.status == "FAILED"] == [{}]  # the refused attempt, empty
    runs = [r for r in runs if r.info.status != "FAILED"]
    first = [r for r in runs if "vitpipe.continued_in" not in r.data.tags]
    second = [r for r in runs if "vitpipe.continued_in" in r.data.tags]
    assert len(first) == 1 and len(second) == 1
    assert second[0].data.tags["vitpipe.continued_in"] == first[0].info.run_id
    assert client.get_run(first[0].info.run_id).info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(first[0].info.run_id, "loss"))
    assert steps == list(range(5, 91, 5))  # every log step once, before and after the interruption


def _rank_pids(root_pid: int, rank: int) -> list[int]:
    import psutil

    pids = []
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            if "pipeline.train.worker" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                pids.append(child.pid)
        except psutil.Error:
            pass
    return pids


def _cli(setup, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "pretrain", str(TINY), *OVERRIDES, "pretrain.steps=26",
            "pretrain.checkpoint_every=4", "pretrain.max_restarts=1", "tracking.enabled=false", *extra,
            "--manifest", setup["manifest"], "--out", str(setup["work"] / out)]


def test_killed_rank_is_restarted_and_ends_with_the_uninterrupted_loss(setup, tmp_path):
    proc = subprocess.Popen(_cli(setup, "killed"), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    losses_file = setup["work"] / "killed" / LOSSES_FILE
    deadline = time.time() + 240
    while time.time() < deadline and (not losses_file.exists() or len(losses_file.read_text().splitlines()) < 10):
        time.sleep(0.05)
    pids = _rank_pids(proc.pid, 1)
    assert pids, "rank 1 not found"
    os.kill(pids[0], signal.SIGKILL)  # a node failure, as far as rank 1 is concerned
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads((setup["work"] / "killed" / "result.json").read_text())
    assert result["resumed_from_step"] > 0 and result["resumed_from_step"] % 4 == 0
    got, ref = losses(setup["work"] / "killed"), setup["ref_losses"]
    assert got[26] == ref[26]  # the same final loss as the uninterrupted run
    assert all(got[s] == ref[s] for s in ref)


def test_rank_killed_while_writing_a_checkpoint_never_uses_it(setup, tmp_path):
    env = {**os.environ, "VITPIPE_FAULT": "save:8:1",  # rank 1 dies as the step-8 checkpoint is written
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run(_cli(setup, "torn", "tracking.enabled=true", "tracking.system_metrics_interval=0"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (setup["work"] / "torn" / "train.log").read_text()
    assert "resumed from step_00000004" in log and "resumed from step_00000008" not in log
    result = json.loads((setup["work"] / "torn" / "result.json").read_text())
    assert result["resumed_from_step"] == 4
    got, ref = losses(setup["work"] / "torn"), setup["ref_losses"]
    assert all(got[s] == ref[s] for s in ref)

    # Steps 5-8 ran twice (before the crash and after the resume from step 4); the run holds one
    # value per (metric, step), the uninterrupted run's.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([client.get_experiment_by_name("vitpipe").experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [5, 10, 15, 20, 25, 26]
    step5 = [m.value for m in history if m.step == 5][0]
    assert step5 == pytest.approx(sum(ref[s] for s in range(1, 6)) / 5)  # the window mean of steps 1-5
    for key in ("lr", "images_per_s", "val_accuracy"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)


def test_killed_job_leaves_no_process_running_and_commits_nothing_after(setup, tmp_path):
    import psutil

    out_dir = setup["work"] / "killed_job"
    # A long run that commits every 2 steps, started in a process group of its own (as a shell job)
    proc = subprocess.Popen(_cli(setup, "killed_job", "pretrain.steps=400", "pretrain.checkpoint_every=2"),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    root = out_dir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and len(checkpoints.committed(root)) < 2:
        time.sleep(0.05)
    assert checkpoints.committed(root), "no checkpoint committed"
    found = _rank_pids(proc.pid, 0) + _rank_pids(proc.pid, 1)  # ranks and their forked loader workers
    ranks = [pid for pid in found if psutil.Process(pid).ppid() not in found]
    family = [p for p in psutil.Process(proc.pid).children(recursive=True)]
    assert len(ranks) == 2 and len(family) >= 3  # torchrun, two ranks (and their loader workers)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of the job: vitpipe and torchrun, not the ranks' sessions
    proc.wait(timeout=10)
    killed_at = time.time()

    def running(procs):
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        return alive

    rank_procs = [psutil.Process(pid) for pid in ranks if psutil.pid_exists(pid)]
    while time.time() - killed_at < 5 and running(rank_procs):
        time.sleep(0.05)
    assert not running(rank_procs), f"ranks survived their launcher: {running(rank_procs)}"
    while time.time() - killed_at < 10 and running(family):
        time.sleep(0.05)
    assert not running(family), f"survived the job: {[(p.pid, p.cmdline()) for p in running(family)]}"
    markers = sorted(p.parent.name for p in root.glob("*/COMMITTED"))
    time.sleep(3)
    assert sorted(p.parent.name for p in root.glob("*/COMMITTED")) == markers  # nothing committed after

    # A planted checkpoint in this interrupted run (the newest, with a marker whose digests are
    # right): resume refuses it by name, and its payload never runs.
    import torch

    target = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(target)!r}, 'w').write('payload ran')",))

    planted = root / checkpoints.tag_for(99_999)
    planted.mkdir()
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        torch.save({"module": {}, "client": Payload()}, planted / name)
    checkpoints.commit(root, planted.name, 99_999, 2, 2)
    done = subprocess.run(_cli(setup, "killed_job", "pretrain.steps=400", "pretrain.checkpoint_every=2"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert (f"{planted}/mp_rank_00_model_states.pt: holds objects a training checkpoint never holds "
            f"(the global exec); refusing to load step_00099999") in done.stderr, done.stderr[-3000:]
    assert not target.exists()


def test_the_error_names_the_rank_that_died_not_the_survivor(setup, monkeypatch):
    monkeypatch.setenv("VITPIPE_FAULT", "save:2:1")  # rank 1 SIGKILLed as it starts the step-2 checkpoint
    job = setup["job"]("rank_died")
    job.train = dataclasses.replace(job.train, checkpoint_every=2, max_restarts=0)
    with pytest.raises(TrainingError) as err:
        run_training(job, 2, NullTracker())
    msg = str(err.value)
    cause = msg.split(";")[0]
    assert cause == ("pretrain failed: rank 1 died without reporting an error (killed by a signal such as "
                     "SIGKILL, e.g. by the out-of-memory killer, or crashed)"), msg
    assert "rank 0" not in cause and str(setup["work"] / "rank_died" / "train.log") in msg
