"""Shared fixtures: real servers on loopback (an S3-compatible moto server)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _restored_environ():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# mlflow.set_tracking_uri (called by every real MLflowTracker) exports MLFLOW_TRACKING_URI into
# os.environ, and the launch targets forward that variable into the jobs they render: a test that
# tracks must not change what a later test's dry run prints. Module scope covers module fixtures
# that track; function scope covers tests.
_environ_per_module = pytest.fixture(scope="module", autouse=True)(_restored_environ)
_environ_per_test = pytest.fixture(autouse=True)(_restored_environ)


def _build_deepspeed_cpu_comm_op() -> None:
    """Build DeepSpeed's CPU communication op once, in its own process, before any test runs.

    On CPU every rank JIT-compiles `deepspeed_shm_comm` on first use, guarded by a lock file in
    ~/.cache/torch_extensions. A test that kills ranks on purpose (rank death, full disk,
    launcher death) during that first build leaves the lock behind, and every later rank waits
    on it forever. Built here, no test can interrupt the build.
    """
    if os.environ.get("DS_ACCELERATOR", "cpu") != "cpu":
        return
    code = ("from pipeline.launch.local import use_this_environments_ninja; use_this_environments_ninja(); "
            "from deepspeed.comm.torch import build_shm_op; build_shm_op()")  # as a rank builds it
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"building DeepSpeed's CPU communication op failed:\n{proc.stderr[-3000:]}")


def pytest_sessionstart(session):
    _build_deepspeed_cpu_comm_op()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's standalone server) on 127.0.0.1:<free port>."""
    import boto3  # noqa: F401  (the test extra)

    moto_server = Path(sys.executable).parent / "moto_server"
    assert moto_server.exists(), "moto_server missing: install the test extra (pip install -e '.[test]')"
    port = free_port()
    proc = subprocess.Popen([str(moto_server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    import boto3

    for k, v in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    from pipeline.data import storage

    monkeypatch.setattr(storage, "_CLIENTS", {})  # a client for this server, not a cached one
    client = boto3.client("s3", endpoint_url=s3_server)
    bucket = f"vitpipe-{time.time_ns()}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


TINY = Path(__file__).resolve().parents[1] / "configs" / "pipeline" / "tiny.yaml"
# The tiny recipe as tests/test_end_to_end.py runs it, evaluating every other step so that the
# plots (tests/test_plots.py) have an accuracy curve to draw.
TINY_RUN_ARGS = (str(TINY), "pretrain.eval_every=2")


def vitpipe(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`vitpipe ARGS` as a user runs it: a new process, output captured."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def shm_op_built_at() -> int | None:
    """mtime (ns) of DeepSpeed's built CPU communication op, None when there is none."""
    from pipeline.launch.local import jit_build_dir

    try:
        return (jit_build_dir("deepspeed_shm_comm") / "deepspeed_shm_comm.so").stat().st_mtime_ns
    except FileNotFoundError:
        return None


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One `vitpipe run` of the tiny recipe (every stage, 2 gloo ranks) against a real MLflow store
    (sqlite), shared by the end-to-end and plot tests: <cwd>/w is its run folder. Read it; a test
    that moves it puts it back. Run as from an activated venv (its bin folder first on PATH, the
    suite's own PATH may not have it); `op_built` is the CPU op's build time before and after."""
    cwd = tmp_path_factory.mktemp("e2e")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    before = shm_op_built_at()
    proc = vitpipe("run", *TINY_RUN_ARGS, "--workdir", "w", cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"cwd": cwd, "work": cwd / "w", "env": env, "proc": proc, "args": TINY_RUN_ARGS,
            "op_built": (before, shm_op_built_at())}


@pytest.fixture(scope="session")
def digits300(tmp_path_factory) -> Path:
    """300 of scikit-learn's 8x8 digits prepared into 50-sample shards (the folder holding
    manifest.json), shared by every test file that needs a small real dataset; copy it before
    changing it."""
    from pipeline.config import DataConfig
    from pipeline.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("digits300")
    prepare_dataset(DataConfig(source="digits", limit=300, shard_max_samples=50, workers=1), out)
    return out
