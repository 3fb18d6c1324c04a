"""A tracking outage never stops training: a real `mlflow server` on loopback, stopped mid-run.

Log calls return at once (they only queue); the sender keeps what it could not deliver and sends
it when the server is back, each (metric, step) exactly once, and the run ends FINISHED.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import TrackingConfig
from pipeline.track import MLflowTracker, NullTracker, start_tracker, tracker_for_rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1:<port> over a sqlite file; stop() kills it, start() brings it back."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = root, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240) -> None:
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: starts faster
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(self.root / "server.log", "a"),
                                     start_new_session=True)
        deadline = time.time() + timeout
        import urllib.request

        while time.time() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"mlflow server did not start in {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its uvicorn worker, as a crash would
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path)
    srv.start()
    yield srv
    srv.stop()


def test_outage_mid_run_loses_no_metric_and_never_blocks_a_step(server, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exports it; undone after

    tracker = start_tracker(TrackingConfig(uri=server.url, system_metrics_interval=0), run_name="outage")
    assert isinstance(tracker, MLflowTracker)
    tracker.log_params({"train": {"lr": 0.002, "steps": 80}})
    assert tracker.flush(60) == 0  # delivered while the server is up

    rank0 = tracker_for_rank(0, tracker.tracking_uri, tracker.run_id)  # what training rank 0 logs through
    restarted = threading.Event()

    def outage():  # down for 3 s, then the same server (port, database) again
        server.stop()
        time.sleep(3)
        server.start()
        restarted.set()

    call_times, step = [], 0
    while True:
        step += 1
        t0 = time.perf_counter()
        rank0.log_metrics({"loss": 1.0 / step, "lr": 0.002 * step}, step=step)
        call_times.append(time.perf_counter() - t0)
        if step == 20:
            threading.Thread(target=outage, daemon=True).start()
        if restarted.is_set() and step >= 60:
            break
        time.sleep(0.02)  # the "training step"
    down_steps = step - 20
    assert down_steps > 100, down_steps  # many steps were logged while nothing listened
    # A log call only queues: on this shared machine it still takes well under a millisecond
    # while no call, during the outage or not, ever waits for the network.
    assert max(call_times) < 0.05, max(call_times)
    assert rank0.flush(120) == 0
    tracker.finish("FINISHED")

    client = MlflowClient(tracking_uri=server.url)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.002", "train.steps": "80"}
    loss = client.get_metric_history(tracker.run_id, "loss")
    lr = client.get_metric_history(tracker.run_id, "lr")
    assert sorted(m.step for m in loss) == list(range(1, step + 1))  # every step, exactly once
    assert sorted(m.step for m in lr) == list(range(1, step + 1))
    assert all(m.value == pytest.approx(1.0 / m.step) for m in loss)


def test_nothing_listening_warns_once_and_training_goes_on(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import mlflow.tracking  # noqa: F401  (imported first: the time below is the probe's, not the import's)
    import mlflow.utils.rest_utils  # noqa: F401

    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    tracker = start_tracker(TrackingConfig(uri=url), run_name="nobody")
    assert isinstance(tracker, NullTracker)
    assert time.monotonic() - t0 < 15  # not MLflow's 255 s of retries
    err = capfd.readouterr().err
    assert err.count("warning:") == 1 and f"no MLflow tracking server answers at {url}" in err

    # A rank whose server went away: log calls return at once; at the end it says what was lost.
    rank0 = tracker_for_rank(0, url, "0" * 32)
    t0 = time.perf_counter()
    for step in range(1, 201):
        rank0.log_metrics({"loss": 1.0 / step}, step=step)
    assert time.perf_counter() - t0 < 0.5
    assert rank0.flush(1.0) == 200
    rank0.close(0)
    err = capfd.readouterr().err
    assert "unreachable" in err and "200 tracking call(s) for run" in err
    # ...and then stops trying: its sender thread ends instead of retrying at full speed against a
    # port that refuses at once (it did, and burned a core of every later stage in the same process).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(t.name == "mlflow-00000000" for t in threading.enumerate()):
        time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name == "mlflow-00000000"]
    cpu = time.process_time()
    time.sleep(1.0)
    assert time.process_time() - cpu < 0.5  # this process is idle again


TELEMETRY_PROBE = """
import os, sys
if sys.argv[1] == "vitpipe":
    import pipeline.track  # what every vitpipe command that tracks imports before mlflow
from mlflow.telemetry.utils import is_telemetry_disabled
print(is_telemetry_disabled(), os.environ.get("MLFLOW_DISABLE_TELEMETRY"))
"""


@pytest.mark.parametrize("importer, user_setting, disabled", [
    ("mlflow", None, "False"),       # mlflow alone, outside CI: telemetry on (so the probe can tell)
    ("vitpipe", None, "True"),       # through vitpipe: off, and the ranks inherit the setting
    ("vitpipe", "false", "False"),   # a user who opts in keeps it
])
def test_mlflow_telemetry_is_off_unless_the_user_opts_in(importer, user_setting, disabled):
    """MLflow's telemetry thread rewrites os.environ while the sender's requests copy it (a `runs/create`
    failed with '_MLFLOW_TELEMETRY_SESSION_ID'), and it calls out from offline nodes: vitpipe turns it
    off before mlflow is imported. The child has no CI or pytest variables, which disable it anyway."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if user_setting is not None:
        env["MLFLOW_DISABLE_TELEMETRY"] = user_setting
    out = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE, importer], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out[0] == disabled
    assert out[1] == {"mlflow": "None", "vitpipe": user_setting or "true"}[importer]
