"""Experiment tracking as a plug-in: a small interface, an MLflow implementation, a null one.

This is the only module that imports mlflow. Rank logic lives here too: `tracker_for_rank`
gives ranks > 0 a `NullTracker`, so training code never asks which rank it is before logging.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.config import TrackingConfig

# A nested run is tied to its parent by this tag (what the MLflow UI and `nested=True` use).
PARENT_TAG = "mlflow.parentRunId"


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

    def child(self, name: str) -> "NullTracker":
        """A nested run (another null tracker)."""
        return NullTracker()

    def system_metrics(self, interval: float, resume: bool = False):
        """No system metrics without a run."""
        return None

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (nothing to end)."""


class MLflowTracker:
    """One MLflow run, driven through the client API so runs in other processes can attach."""

    def __init__(self, client, run_id: str, tracking_uri: str, experiment_id: str,
                 system_metrics_interval: float = 10.0):
        self._client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.system_metrics_interval = system_metrics_interval

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
        """Continue logging to an existing run (e.g. from the rank-0 training process)."""
        client = cls._client_for(tracking_uri)
        run = client.get_run(run_id)
        return cls(client, run_id, tracking_uri, run.info.experiment_id)

    # -- logging ------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record parameters; values are stringified and cut to MLflow's length limit."""
        from mlflow.entities import Param

        # MLflow refuses to change a logged param; a resumed run re-logs its config, so only new
        # keys are logged and a changed value (e.g. world_size after resharding) becomes a tag.
        existing = self._client.get_run(self.run_id).data.params
        items = []
        for k, v in flatten(params).items():
            text = str(v)[:6000]
            if k not in existing:
                items.append(Param(k, text))
            elif existing[k] != text:
                self._client.set_tag(self.run_id, f"param_changed.{k}", text[:5000])
        for i in range(0, len(items), 100):  # MLflow's per-batch limit
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record finite numeric metrics at `step`."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        if items:
            self._client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file to the run's artifact store."""
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Record tags."""
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def child(self, name: str) -> "MLflowTracker":
        """A nested run under this one, in the same experiment."""
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
        """End the run with FINISHED, FAILED or KILLED."""
        self._client.set_terminated(self.run_id, status=status)

    def reopen(self) -> None:
        """Mark a finished or killed run as running again (a resumed stage continues it)."""
        self._client.update_run(self.run_id, status="RUNNING")


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
    return MLflowTracker.start(cfg, run_name, tags=tags)


def tracker_for_rank(rank: int, tracking_uri: str | None, run_id: str | None) -> Tracker:
    """Rank 0 attaches to the stage's run; every other rank (or no run) gets a null tracker."""
    if rank != 0 or not run_id or not tracking_uri:
        return NullTracker()
    return MLflowTracker.attach(tracking_uri, run_id)



def log_files(tracker: Tracker, paths: Iterable[str | Path]) -> None:
    """Upload each existing file in `paths`."""
    for p in paths:
        if Path(p).is_file():
            tracker.log_artifact(p)


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
    from mlflow.types.schema import Schema, TensorSpec

    example = np.asarray(input_example, dtype=np.float32)  # (1, C, H, W)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]), name="images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(num_classes)), name="logits")]),
    )
    mlflow.set_tracking_uri(tracker.tracking_uri)
    mlflow.set_registry_uri(tracker.tracking_uri)
    model = onnx.load(str(onnx_path))  # external data (if any) was checked to stay in the model's folder
    info = mlflow.onnx.log_model(
        model, name="model", run_id=tracker.run_id, signature=signature, input_example=example,
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
