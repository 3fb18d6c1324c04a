"""Experiment tracking as a plug-in: a small interface, an MLflow implementation, a null one.

This is the only module that imports mlflow. Rank logic lives here too: `tracker_for_rank`
gives ranks > 0 a `NullTracker`, so training code never asks which rank it is before logging.
"""

from __future__ import annotations

import atexit
import collections
import json
import math
import os
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Mapping

from pipeline.config import TrackingConfig

# MLflow's usage telemetry is off unless the user opts in (MLFLOW_DISABLE_TELEMETRY=false). Its thread
# sets and unsets `_MLFLOW_TELEMETRY_SESSION_ID` in os.environ while the sender's HTTP request copies
# os.environ (requests reads proxy settings): we saw `runs/create` fail with "failed with exception
# '_MLFLOW_TELEMETRY_SESSION_ID'". It also calls an outside host from training nodes that are often
# offline. Set before mlflow is first imported (every import of mlflow is in this module, below), and
# inherited by the ranks and any `mlflow server` we start.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# A nested run is tied to its parent by this tag (what the MLflow UI and `nested=True` use).
PARENT_TAG = "mlflow.parentRunId"

# Lineage tags (see MLflowTracker.log_lineage): vitpipe.input.<kind> / vitpipe.output.<kind> = sha256.
INPUT_TAG, OUTPUT_TAG = "vitpipe.input.", "vitpipe.output."

# Delivery off the training thread (see `_Sender`). One HTTP attempt may take SEND_TIMEOUT_S;
# MLflow's own retries (7, up to 255 s) are off for the sender, which retries by itself with a
# backoff from BACKOFF_S[0] doubling to BACKOFF_S[1], for as long as the server is away.
SEND_TIMEOUT_S = 5.0
BACKOFF_S = (0.2, 5.0)
# Log calls held while the server is away (one call is usually one step's metrics: 100k calls
# are hours of logging every step); past it new calls are dropped, counted and reported once.
MAX_PENDING = 100_000
# After a delivery the sender gathers calls for up to SEND_INTERVAL_S (or LINGER_CALLS calls) and
# sends them as one request: one request a second costs the training process far less CPU than
# one per step (a flush or close does not wait for it).
SEND_INTERVAL_S, LINGER_CALLS = 1.0, 200
# How long a process that ends waits for its undelivered calls (e.g. an outage at the very end);
# what is still undelivered then is reported by count.
FLUSH_TIMEOUT_S = 300.0
# MLflow's log-batch limits.
_BATCH_METRICS, _BATCH_PARAMS = 1000, 100


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """MLFLOW_TRACKING_URI > the recipe's tracking.uri > sqlite:///<cwd>/mlflow.db."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.uri:
        return cfg.uri
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are kept as their JSON text."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


class NullTracker:
    """Tracks nothing: for ranks > 0, tests of other parts, and tracking.enabled=false."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record parameters (ignored)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record metrics (ignored)."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Record a file (ignored)."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Record tags (ignored)."""

    def log_dataset(self, name: str, digest: str, source: str, profile: Mapping[str, Any],
                    context: str = "train") -> None:
        """Record a dataset as a run input (ignored)."""

    def log_lineage(self, inputs: Mapping[str, str] | None = None, outputs: Mapping[str, str] | None = None) -> None:
        """Record the digests consumed and produced (ignored)."""

    def child(self, name: str) -> "NullTracker":
        """A nested run (another null tracker)."""
        return NullTracker()

    def system_metrics(self, interval: float, resume: bool = False):
        """No system metrics without a run."""
        return None

    def flush(self, timeout: float = 0.0) -> int:
        """Nothing is ever pending."""
        return 0

    def close(self, timeout: float = 0.0) -> None:
        """Nothing to deliver."""

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (nothing to end)."""


class MLflowTracker:
    """One MLflow run, driven through the client API so runs in other processes can attach."""

    def __init__(self, client, run_id: str, tracking_uri: str, experiment_id: str | None,
                 system_metrics_interval: float = 10.0, skip_logged_steps: bool = False):
        self._client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.system_metrics_interval = system_metrics_interval
        # Every log call goes through this thread: a training step never waits for the server.
        self._sender = _Sender(client, run_id, tracking_uri, skip_logged_steps)

    # -- creation -----------------------------------------------------------------------------

    @staticmethod
    def _client_for(uri: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(uri)
        return MlflowClient(tracking_uri=uri)

    @classmethod
    def start(
        cls,
        cfg: TrackingConfig,
        run_name: str,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> "MLflowTracker":
        """Create a run (nested under `parent_run_id` if given) in the configured experiment."""
        uri = resolve_tracking_uri(cfg)
        client = cls._client_for(uri)
        _check_reachable(uri)
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            artifact_location = None
            if uri.startswith("sqlite:///"):
                # Keep artifacts beside the database instead of wherever the process happens to run.
                db = Path(uri[len("sqlite:///"):])
                artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
            exp_id = client.create_experiment(cfg.experiment, artifact_location=artifact_location)
        else:
            exp_id = exp.experiment_id
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
        return cls(client, run.info.run_id, uri, exp_id, cfg.system_metrics_interval)

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> "MLflowTracker":
        """Continue logging to an existing run (TrackingUnreachable at once if its server does not answer)."""
        client = cls._client_for(tracking_uri)
        _check_reachable(tracking_uri)
        run = client.get_run(run_id)
        return cls(client, run_id, tracking_uri, run.info.experiment_id)

    # -- logging ------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record parameters; values are stringified and cut to MLflow's length limit."""
        self._sender.put("params", {k: str(v)[:6000] for k, v in flatten(params).items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record finite numeric metrics at `step` (queued: returns at once, whatever the server does)."""
        now = int(time.time() * 1000)
        items = [
            (k, float(v), now, step or 0)
            for k, v in metrics.items()
            if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        if items:
            self._sender.put("metrics", items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file to the run's artifact store."""
        self._sender.put("artifact", (str(path), artifact_path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Record tags."""
        self._sender.put("tags", {k: str(v) for k, v in tags.items()})

    def log_dataset(self, name: str, digest: str, source: str, profile: Mapping[str, Any],
                    context: str = "train") -> None:
        """Record a dataset as an MLflow run input (`mlflow.data`'s dataset entity): `digest` is the
        manifest's sha256 (MLflow keeps 32 characters of it), `source` its path or URL, `profile`
        the split counts; `context` is MLflow's input tag (train, eval)."""
        source_type = source.split("://", 1)[0] if "://" in source else "local"
        self._sender.put("dataset", {"name": name, "digest": digest[:32], "source_type": source_type,
                                     "source": source, "profile": json.dumps(dict(profile), sort_keys=True),
                                     "context": context})

    def log_lineage(self, inputs: Mapping[str, str] | None = None, outputs: Mapping[str, str] | None = None) -> None:
        """Tag the run with the sha256 of each artifact it consumed (`vitpipe.input.<kind>`) and
        produced (`vitpipe.output.<kind>`); each input also gets `vitpipe.input.<kind>.run`: the
        run in this experiment whose `vitpipe.output.<kind>` is that digest, when there is one. The
        chain export -> finetune -> pretrain -> prepare is walked with these tags (`lineage`)."""
        self._sender.put("lineage", {"inputs": dict(inputs or {}), "outputs": dict(outputs or {}),
                                     "experiment_id": self.experiment_id})

    def close(self, timeout: float = FLUSH_TIMEOUT_S) -> None:
        """Deliver what is queued (up to `timeout` s) and report what could not be; the run stays
        as it is (a training rank's process does this at exit)."""
        self._sender.close(timeout)

    @property
    def sender_cpu_seconds(self) -> float:
        """CPU time this run's sender thread has spent delivering so far."""
        return self._sender.cpu_seconds

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> int:
        """Wait up to `timeout` s until everything logged so far is delivered; the number of calls left."""
        return self._sender.wait_delivered(timeout)

    def child(self, name: str) -> "Tracker":
        """A nested run under this one, in the same experiment (a null tracker, with a warning, when
        the server does not answer: the stage runs untracked rather than waiting for it)."""
        try:
            _check_reachable(self.tracking_uri)
        except TrackingUnreachable as e:
            _warn(f"{e}; stage {name!r} runs without tracking")
            return NullTracker()
        run = self._client.create_run(self.experiment_id, run_name=name, tags={PARENT_TAG: self.run_id})
        return MLflowTracker(self._client, run.info.run_id, self.tracking_uri, self.experiment_id,
                             self.system_metrics_interval)

    def system_metrics(self, interval: float, resume: bool = False):
        """Start MLflow's system-metrics thread (CPU, memory, disk, network, GPU) for this run; returns
        an object with .finish(), or None when disabled."""
        if interval <= 0:
            return None
        monitor = _flushing_monitor_class()(self.run_id, sampling_interval=interval, resume_logging=resume)
        monitor.start()
        return monitor

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED, after everything logged before (waits up to
        FLUSH_TIMEOUT_S for a server that is away)."""
        for other in list(_LIVE_SENDERS):  # e.g. an in-process Trainer's rank-0 tracker of this run
            if other is not self._sender and other._run_id == self.run_id and not other._closed:
                other.wait_delivered(FLUSH_TIMEOUT_S)
        self._sender.put("status", status)
        self._sender.close(FLUSH_TIMEOUT_S)

    def reopen(self) -> None:
        """Mark a finished or killed run as running again (a resumed stage continues it)."""
        self._sender.put("status", "RUNNING")


class TrackingUnreachable(RuntimeError):
    """Nothing answers at the tracking URI when a run is to be created."""


def _is_rest(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _rest_call(uri: str, endpoint: str, body: dict, method: str = "POST") -> dict:
    """One attempt at an MLflow REST endpoint with MLflow's retries off and a short timeout."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    payload = {"params": body} if method == "GET" else {"json": body}
    response = http_request(get_default_host_creds(uri), f"/api/2.0/mlflow/{endpoint}", method, max_retries=0,
                            timeout=SEND_TIMEOUT_S, **payload)
    verify_rest_response(response, endpoint)
    return response.json() if response.text else {}


def _is_transient(error: Exception) -> bool:
    """Worth retrying: the server is away, slow, overloaded or restarting (not a refused request)."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(error, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(error, RestException):
        return error.get_http_status_code() >= 500 or error.get_http_status_code() == 429
    if isinstance(error, MlflowException):  # http_request wraps connection errors and timeouts in it
        text = str(error)
        return "failed with exception" in text or "timeout" in text or "database is locked" in text
    return "database is locked" in str(error)  # sqlite under concurrent writers


def _check_reachable(uri: str) -> None:
    """Fail at once with TrackingUnreachable when an http(s) tracking server does not answer."""
    if not _is_rest(uri):
        return
    try:
        _rest_call(uri, "experiments/get-by-name", {"experiment_name": "vitpipe-probe"}, "GET")
    except Exception as e:
        if _is_transient(e):
            raise TrackingUnreachable(f"no MLflow tracking server answers at {uri} ({type(e).__name__})") from None
        # anything else (e.g. the experiment does not exist) is an answer


_LIVE_SENDERS: "weakref.WeakSet[_Sender]" = weakref.WeakSet()  # finish() waits for a run's other senders here


class _Sender:
    """Delivers one run's log calls in order, from a thread of its own, retrying until delivered.

    The training thread only appends to a deque (bounded by MAX_PENDING; never blocks). A failed
    delivery that is transient (server away, 5xx, timeout) is retried with backoff, in order, so
    nothing is lost and nothing overtakes; one that the server refuses (4xx) is reported and dropped.
    Metrics are idempotent on the server (MLflow keys them by key, step, timestamp and value), so
    a retried batch that had in fact arrived is not stored twice. With `skip_logged_steps`, the
    run's latest step per metric is read once, before the first delivery, and metrics at or before
    it are not sent again.
    """

    def __init__(self, client, run_id: str, uri: str, skip_logged_steps: bool):
        self._client, self._run_id, self._uri = client, run_id, uri
        self._rest = _is_rest(uri)
        self._skip_logged_steps = skip_logged_steps
        self._logged_through: dict[str, int] | None = None
        self._items: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._busy = False
        self._idle = False  # the sender waits for calls (put wakes it)
        self._waiting = 0  # callers in wait_delivered: no gathering while someone waits
        self._reported = 0  # undelivered calls already reported by close()
        self.dropped = 0
        # CPU time the sender thread spent delivering (serializing, HTTP, parsing): time the
        # training thread may have waited for the GIL; `vitpipe bench tracking` reports it.
        self.cpu_seconds = 0.0
        self._outage_since: float | None = None
        self._thread: threading.Thread | None = None
        atexit.register(self.close, FLUSH_TIMEOUT_S)  # a rank's process ends without calling finish()
        _LIVE_SENDERS.add(self)

    # -- the caller's side --------------------------------------------------------------------

    def put(self, kind: str, payload) -> None:
        """Queue one call; never blocks."""
        with self._cv:
            if self._closed and kind != "status":
                return
            if len(self._items) >= MAX_PENDING:
                self.dropped += 1
                if self.dropped == 1:
                    _warn(f"{MAX_PENDING} tracking calls wait for {self._uri}; dropping new ones until it is back")
                return
            self._items.append((kind, payload))
            if self._thread is None or not self._thread.is_alive():  # first call, or a call after close()
                self._thread = threading.Thread(target=self._deliver_all, name=f"mlflow-{self._run_id[:8]}",
                                                daemon=True)
                self._thread.start()
            # Wake the sender only when it waits for work or has gathered enough: waking it at every
            # step (to sleep again through its backoff or gathering) costs the training thread the GIL.
            if self._idle or len(self._items) == LINGER_CALLS:
                self._cv.notify_all()

    def wait_delivered(self, timeout: float) -> int:
        """Wait until nothing is queued or in flight (or `timeout` s); the number of calls left."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self._waiting += 1
            self._cv.notify_all()
            try:
                while (self._items or self._busy) and time.monotonic() < deadline:
                    self._cv.wait(min(0.1, max(deadline - time.monotonic(), 0.0)))
                return len(self._items)
            finally:
                self._waiting -= 1

    def close(self, timeout: float) -> None:
        """Deliver what is queued (up to `timeout` s), then stop; reports what could not be delivered."""
        # Closed before (and what it kept reported): at exit it does not wait for that server again.
        left = self.wait_delivered(0.0 if self._closed else timeout)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            lost, self.dropped = left + self.dropped, 0
            already, self._reported = self._reported, left  # a second close (atexit) repeats nothing
        if lost > already:
            _warn(f"{lost} tracking call(s) for run {self._run_id} never reached {self._uri}")

    # -- the sender thread --------------------------------------------------------------------

    def _deliver_all(self) -> None:
        pause = BACKOFF_S[0]
        while True:
            with self._cv:
                self._idle = True
                while not self._items and not self._closed:
                    self._cv.wait()
                self._idle = False
                if not self._items:
                    return
                batch = self._take_batch()
                self._busy = True
            cpu_start = time.thread_time()
            try:
                self._deliver(batch)
            except Exception as e:
                if _is_transient(e):
                    if self._outage_since is None:
                        self._outage_since = time.monotonic()
                        _warn(f"tracking server {self._uri} unreachable ({type(e).__name__}); training goes on, "
                              f"logs are kept and sent when it is back")
                    with self._cv:
                        self._busy = False
                        self._cv.notify_all()
                        until = time.monotonic() + pause  # new calls notify: sleep through them
                        while not self._closed and time.monotonic() < until:
                            self._cv.wait(until - time.monotonic())
                        pause = min(pause * 2, BACKOFF_S[1])
                        if self._closed:  # close() has reported what is left: stop trying (no spin
                            return        # of instant retries against a server that refuses connections)
                    continue
                _warn(f"tracking server {self._uri} refused a {batch[0][0]} call, dropped: {e}")
            finally:
                self.cpu_seconds += time.thread_time() - cpu_start
            pause = BACKOFF_S[0]
            if self._outage_since is not None:
                _warn(f"tracking server {self._uri} is back after {time.monotonic() - self._outage_since:.0f} s; "
                      f"sending what was kept")
                self._outage_since = None
            with self._cv:
                for _ in batch:
                    self._items.popleft()
                self._busy = False
                self._cv.notify_all()
                until = time.monotonic() + SEND_INTERVAL_S
                while (not self._closed and not self._waiting and len(self._items) < LINGER_CALLS
                       and time.monotonic() < until):
                    self._cv.wait(until - time.monotonic())

    def _take_batch(self) -> list:
        """The head call, plus the metric calls right after it while they fit one log-batch request."""
        first = self._items[0]
        if first[0] != "metrics":
            return [first]
        batch, count = [], 0
        for kind, payload in self._items:
            if kind != "metrics" or (batch and count + len(payload) > _BATCH_METRICS):
                break
            batch.append((kind, payload))
            count += len(payload)
        return batch

    def _deliver(self, batch: list) -> None:
        kind, payload = batch[0]
        if kind == "metrics":
            if self._logged_through is None:
                self._logged_through = self._latest_steps() if self._skip_logged_steps else {}
            seen = self._logged_through
            metrics = [m for _, items in batch for m in items if m[3] > seen.get(m[0], -1)]
            for i in range(0, len(metrics), _BATCH_METRICS):
                self._log_batch(metrics=metrics[i : i + _BATCH_METRICS])
        elif kind == "params":
            # MLflow refuses to change a logged param; a resumed run re-logs its config, so only new
            # keys are logged and a changed value (e.g. world_size after resharding) becomes a tag.
            existing = self._params()
            new = [(k, v) for k, v in payload.items() if k not in existing]
            changed = [(f"param_changed.{k}", v[:5000]) for k, v in payload.items()
                       if k in existing and existing[k] != v]
            for i in range(0, len(new), _BATCH_PARAMS):
                self._log_batch(params=new[i : i + _BATCH_PARAMS])
            for i in range(0, len(changed), _BATCH_PARAMS):
                self._log_batch(tags=changed[i : i + _BATCH_PARAMS])
        elif kind == "tags":
            items = list(payload.items())
            for i in range(0, len(items), _BATCH_PARAMS):
                self._log_batch(tags=items[i : i + _BATCH_PARAMS])
        elif kind == "artifact":
            self._client.log_artifact(self._run_id, *payload)
        elif kind == "dataset":
            self._log_dataset(payload)
        elif kind == "lineage":
            tags = {f"{OUTPUT_TAG}{k}": d for k, d in payload["outputs"].items()}
            for k, d in payload["inputs"].items():
                tags[f"{INPUT_TAG}{k}"] = d
                producer = self._producer(payload["experiment_id"], k, d)
                if producer:
                    tags[f"{INPUT_TAG}{k}.run"] = producer
            self._log_batch(tags=list(tags.items()))
        elif kind == "status":
            self._set_status(payload)
        else:
            raise ValueError(f"unknown tracking call {kind!r}")

    # -- the store, over REST (MLflow's retries off) or through the client (database, files) --

    def _log_batch(self, metrics=(), params=(), tags=()) -> None:
        if self._rest:
            _rest_call(self._uri, "runs/log-batch", {
                "run_id": self._run_id,
                "metrics": [{"key": k, "value": v, "timestamp": t, "step": s} for k, v, t, s in metrics],
                "params": [{"key": k, "value": v} for k, v in params],
                "tags": [{"key": k, "value": v} for k, v in tags]})
            return
        from mlflow.entities import Metric, Param, RunTag

        self._client.log_batch(self._run_id, metrics=[Metric(*m) for m in metrics],
                               params=[Param(k, v) for k, v in params], tags=[RunTag(k, v) for k, v in tags])

    def _run_data(self) -> tuple[dict[str, str], dict[str, int]]:
        """(params, latest step per metric) of the run."""
        if self._rest:
            data = _rest_call(self._uri, "runs/get", {"run_id": self._run_id}, "GET")["run"].get("data", {})
            return ({p["key"]: p.get("value", "") for p in data.get("params", [])},
                    {m["key"]: int(m.get("step", 0)) for m in data.get("metrics", [])})
        run = self._client.get_run(self._run_id)
        return dict(run.data.params), {m.key: m.step for m in run.data._metric_objs}

    def _params(self) -> dict[str, str]:
        return self._run_data()[0]

    def _latest_steps(self) -> dict[str, int]:
        # MLflow's latest value of a metric is the one at its highest step: its step is the last recorded.
        return self._run_data()[1]

    def _producer(self, experiment_id: str | None, kind: str, digest: str) -> str | None:
        """The newest other run of the experiment that produced `digest` as its `kind` output."""
        if not experiment_id:
            return None
        query = f"tags.\"{OUTPUT_TAG}{kind}\" = '{digest}'"
        if self._rest:
            found = _rest_call(self._uri, "runs/search", {"experiment_ids": [experiment_id], "filter": query,
                                                           "max_results": 10,
                                                           "order_by": ["attributes.start_time DESC"]})
            ids = [r["info"]["run_id"] for r in found.get("runs", [])]
        else:
            ids = [r.info.run_id for r in self._client.search_runs([experiment_id], query, max_results=10,
                                                                    order_by=["attributes.start_time DESC"])]
        return next((i for i in ids if i != self._run_id), None)

    def _log_dataset(self, d: dict) -> None:
        fields = {k: d[k] for k in ("name", "digest", "source_type", "source", "profile")}
        if self._rest:
            _rest_call(self._uri, "runs/log-inputs", {"run_id": self._run_id, "datasets": [{
                "tags": [{"key": "mlflow.data.context", "value": d["context"]}],
                "dataset": {**fields, "schema": ""}}]})
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        self._client.log_inputs(self._run_id, datasets=[
            DatasetInput(Dataset(**fields), tags=[InputTag("mlflow.data.context", d["context"])])])

    def _set_status(self, status: str) -> None:
        end_time = None if status == "RUNNING" else int(time.time() * 1000)
        if self._rest:
            body = {"run_id": self._run_id, "status": status}
            if end_time is not None:
                body["end_time"] = end_time
            _rest_call(self._uri, "runs/update", body)
        elif end_time is None:
            self._client.update_run(self._run_id, status=status)
        else:
            self._client.set_terminated(self._run_id, status=status, end_time=end_time)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _flushing_monitor_class():
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class FlushingMonitor(SystemMetricsMonitor):
        """MLflow's monitor drops the samples of its last, unfinished interval at shutdown; a run
        shorter than one interval would have no system metrics at all. Publish a final sample."""

        def finish(self):
            super().finish()
            try:
                self.collect_metrics()
                self.publish_metrics(self.aggregate_metrics())
                self.mlflow_logger.flush()
            except Exception:  # best effort, like MLflow's own monitor: never fail training for it
                pass

    return FlushingMonitor


def continue_previous_run(tracker: Tracker, previous_run_id: str | None) -> tuple[Tracker, bool]:
    """(tracker to log to, whether the caller must finish it) for a stage resuming from a checkpoint.

    The resumed stage continues the MLflow run that wrote the checkpoint, so its metrics form one
    history; the run just created for this attempt gets a tag pointing there.
    """
    if not isinstance(tracker, MLflowTracker) or not previous_run_id or previous_run_id == tracker.run_id:
        return tracker, False
    try:
        previous = MLflowTracker.attach(tracker.tracking_uri, previous_run_id)
    except Exception:  # deleted, or another tracking server: keep logging to the new run
        return tracker, False
    previous.reopen()
    tracker.set_tags({"vitpipe.continued_in": previous_run_id})
    return previous, True


Tracker = MLflowTracker | NullTracker


def start_tracker(cfg: TrackingConfig, run_name: str, tags: Mapping[str, str] | None = None) -> Tracker:
    """The tracker a command starts with: MLflow unless tracking is disabled."""
    if not cfg.enabled:
        return NullTracker()
    try:
        return MLflowTracker.start(cfg, run_name, tags=tags)
    except TrackingUnreachable as e:
        print(f"warning: {e}; continuing without tracking (set tracking.enabled=false to silence this)",
              file=sys.stderr, flush=True)
        return NullTracker()


def tracker_for_rank(rank: int, tracking_uri: str | None, run_id: str | None) -> Tracker:
    """Rank 0 attaches to the stage's run; every other rank (or no run) gets a null tracker."""
    if rank != 0 or not run_id or not tracking_uri:
        return NullTracker()
    # No call to the server here: a rank started during an outage trains, and its logs wait.
    # A rank that re-runs steps (a resume from a checkpoint older than the crash, a restart by
    # torchrun) gives the same values for them (exact resume); the run already holds those, so
    # only steps after the last one recorded per metric are sent: one value per (metric, step).
    return MLflowTracker(MLflowTracker._client_for(tracking_uri), run_id, tracking_uri, None,
                         skip_logged_steps=True)



# --------------------------------------------------------------------------- the model registry


def model_requirements(package: dict) -> list[str]:
    """pip requirements of a served ONNX model: the onnxruntime distribution that benchmarked it, pinned,
    its onnx and numpy, and for onnxruntime-gpu the CUDA/cuDNN pip packages its wheel declares."""
    from importlib import metadata

    reqs = [f"{package['package']}=={package['version']}"]
    for dist in ("onnx", "numpy"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    if package["package"] == "onnxruntime-gpu":
        reqs += list(package.get("pip", []))
    return reqs


def register_onnx_model(
    tracker: Tracker,
    onnx_path: str | Path,
    *,
    name: str,
    input_example,
    num_classes: int,
    metadata: Mapping[str, Any],
    pip_requirements: list[str],
    providers: list[str],
    tags: Mapping[str, Any],
) -> dict | None:
    """Log `onnx_path` to the tracker's run with mlflow.onnx (signature, input example, pinned pip
    requirements, the providers it ran on) and register it as a new version of `name`, tagged.
    Returns {"name", "version", "model_uri", "registry_uri"}; None when tracking is off."""
    if not isinstance(tracker, MLflowTracker):
        return None
    import mlflow
    import mlflow.onnx
    import numpy as np
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.tracking import MlflowClient
    from mlflow.types.schema import Schema, TensorSpec

    example = np.asarray(input_example, dtype=np.float32)  # (1, C, H, W)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]), name="images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(num_classes)), name="logits")]),
    )
    mlflow.set_tracking_uri(tracker.tracking_uri)
    mlflow.set_registry_uri(tracker.tracking_uri)
    # The logged model belongs to the run's experiment, so its files go where that experiment's go
    # (beside a sqlite store, in the run folder). Left to itself, log_model puts a model logged
    # outside an active run into the Default experiment, whose artifacts a sqlite store keeps in
    # ./mlruns of whatever directory the first command ran in.
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    logged = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=tracker.run_id,
                                        params={k: str(v) for k, v in run.data.params.items()})  # as log_model would
    model = onnx.load(str(onnx_path))  # external data (if any) was checked to stay in the model's folder
    info = mlflow.onnx.log_model(
        model, name="model", model_id=logged.model_id, run_id=tracker.run_id, signature=signature, input_example=example,
        pip_requirements=pip_requirements, onnx_execution_providers=providers,
        metadata={"vitpipe": json.loads(json.dumps(metadata, default=str))},
        save_as_external_data=model.ByteSize() > (1 << 30),  # inline below 1 GB: one file to ship
    )
    version = mlflow.register_model(info.model_uri, name, tags={k: str(v) for k, v in tags.items()})
    uri = f"models:/{name}/{version.version}"
    tracker.set_tags({"vitpipe.registered_model": uri})
    return {"name": name, "version": int(version.version), "model_uri": uri, "logged_model_uri": info.model_uri,
            "registry_uri": tracker.tracking_uri}


def load_registered_model(model_uri: str, tracking_uri: str | None = None):
    """(predict function images -> logits, the vitpipe metadata) of a `models:/name/version` URI.

    The tracking/registry store is MLFLOW_TRACKING_URI (or `tracking_uri`), as for every other command."""
    import mlflow
    import mlflow.pyfunc
    import numpy as np

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    registry = mlflow.get_registry_uri()
    if registry.startswith("sqlite:///") and not Path(registry[len("sqlite:///"):]).is_file():
        # Opening a sqlite store creates it: a mistyped folder would get an empty mlflow.db and "not found".
        raise FileNotFoundError(f"{model_uri}: no MLflow store at {registry[len('sqlite:///'):]}; set "
                                f"MLFLOW_TRACKING_URI to the store that registered it (e.g. sqlite:///<folder>/mlflow.db)")
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as e:
        raise FileNotFoundError(f"{model_uri}: cannot load this registered model from "
                                f"{mlflow.get_registry_uri()}: {str(e).splitlines()[0]}") from None
    meta = (model.metadata.metadata or {}).get("vitpipe") if model.metadata else None
    if not meta:
        raise ValueError(f"{model_uri}: no vitpipe preprocessing metadata in this model (was it logged by vitpipe?)")

    def predict(images):
        out = model.predict(np.asarray(images, dtype=np.float32))
        return np.asarray(out["logits"] if isinstance(out, dict) else out)

    return predict, meta


def lineage(tracking_uri: str, run_id: str) -> list[dict]:
    """The chain of runs behind `run_id`, following `vitpipe.input.<kind>.run` tags: one entry per
    run ({run_id, name, inputs: {kind: digest}, outputs, datasets: [{name, digest, source}]}),
    `run_id`'s first, each input's producer after (depth first)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    chain, todo, seen = [], [run_id], set()
    while todo:
        rid = todo.pop(0)
        if rid in seen:
            continue
        seen.add(rid)
        run = client.get_run(rid)
        tags = run.data.tags
        inputs = {k[len(INPUT_TAG):]: v for k, v in tags.items() if k.startswith(INPUT_TAG) and not k.endswith(".run")}
        chain.append({
            "run_id": rid, "name": run.info.run_name, "inputs": inputs,
            "outputs": {k[len(OUTPUT_TAG):]: v for k, v in tags.items() if k.startswith(OUTPUT_TAG)},
            "datasets": [{"name": d.dataset.name, "digest": d.dataset.digest, "source": d.dataset.source,
                          "profile": json.loads(d.dataset.profile or "{}")}
                         for d in (run.inputs.dataset_inputs if run.inputs else [])],
        })
        todo += [tags[f"{INPUT_TAG}{k}.run"] for k in sorted(inputs) if f"{INPUT_TAG}{k}.run" in tags]
    return chain
