"""The training job: what the orchestrating process hands every rank, as one JSON file.

Its own module, without torch, so the processes that only build, launch and read jobs (the
`vitpipe` command, stage orchestration, submitters) never import torch or the training loop:
each such command starts ~1.5 s sooner (pipeline.train.loop, which the ranks run, re-exports it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipeline.atomic import write_json
from pipeline.config import ModelConfig, TrainConfig, from_dict

PREEMPTED_FILE = "preempted.json"
"""<out_dir>/preempted.json: written by rank 0 when a run stopped on request after a checkpoint."""


@dataclass
class TrainJob:
    """Everything one training stage needs: built once by the orchestrating process from validated
    configs, written as JSON (`save`) and read by every rank (`load`, in pipeline.train.worker)."""

    stage: str
    """pretrain or finetune (names the run and the files)."""
    model: ModelConfig
    """The architecture to build; for fine-tuning, the weights pair's own with the recipe's
    FINETUNE_MODEL_FIELDS on top (config.finetune_model_config)."""
    train: TrainConfig
    """The stage's settings."""
    manifest: str
    """Path of the shards' manifest.json."""
    out_dir: str
    """Where checkpoints/, model.safetensors, model.json and result.json go."""
    init_from: Optional[str] = None
    """Weights pair to start from (fine-tuning)."""
    tracking_uri: Optional[str] = None
    run_id: Optional[str] = None
    """MLflow run that rank 0 logs to."""
    extra_meta: dict = field(default_factory=dict)
    """Written into model.json as is (e.g. where the weights came from)."""
    system_metrics_interval: float = 0.0
    """Seconds between MLflow system metrics from rank 0 (0: off)."""
    stop_after: Optional[int] = None
    """Testing and debugging: stop (as if preempted) after this optimizer step."""

    def save(self, path: str | Path) -> None:
        """Write the job as JSON (atomically: every node may read it)."""
        write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "TrainJob":
        """Read a job written by `save`: the configs come back typed, as the orchestrator had them
        (checked again only for their types; the orchestrator validated their values)."""
        data = json.loads(Path(path).read_text())
        data["model"] = from_dict(ModelConfig, data["model"], prefix=f"{path}: model.")
        data["train"] = from_dict(TrainConfig, data["train"], prefix=f"{path}: train.")
        return cls(**data)
