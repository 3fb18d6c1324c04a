"""The run folder's layout: where each stage writes and what its files are called.

One owner for these names, so the CLI, `vitpipe run`, the stages, the training ranks and the
launchers' status readers cannot drift apart (they did: the stage commands and `vitpipe run` took
different default weights). Pure names and paths: no I/O beyond `Path` arithmetic, no imports of
the rest of the package, so every layer may use it.

    <workdir>/
      config.yaml  summary.json  summary.txt  submit.json  .vitpipe.lock
      prepare/     shards/  manifest.json
      pretrain/    checkpoints/  model.safetensors  model.json  result.json  losses.jsonl  train.log  job.json
                   metrics.jsonl  training_curves.png  confusion.json  confusion.png
      finetune/    the same files as pretrain/
      export/      model.onnx  model.<variant>.onnx  model.onnx.json  variant_accuracy.png
      benchmark/   bench.json  bench.png
      hybrid/      prepare/ (only if its data differ)  plain/seed<N>/  hybrid/seed<N>/  compare.json  compare.txt
      <stage>/stage.json   written last: the stage's record (stages/record.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGES = ("prepare", "pretrain", "finetune", "export", "benchmark", "hybrid")
# What `vitpipe run` does unless the recipe lists its stages: "hybrid" (a second recipe's
# hybrid-vs-plain comparison under hybrid/, e.g. the demo's claim 3) runs only where a recipe asks.
DEFAULT_STAGES = STAGES[:5]
TRAINING_STAGES = ("pretrain", "finetune")

# A weights pair: the consolidated fp32 tensors and the JSON that says how to build and feed them.
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_META_FILE = "model.json"
# A training stage's folder
CHECKPOINTS_DIR = "checkpoints"
RESULT_FILE = "result.json"
LOSSES_FILE = "losses.jsonl"
METRICS_FILE = "metrics.jsonl"  # rank 0's logged metrics per step: what the training plot draws
TRAINING_PLOT = "training_curves.png"
CONFUSION_FILE, CONFUSION_PLOT = "confusion.json", "confusion.png"  # the held-out split's, at the end
TRAIN_LOG = "train.log"
JOB_FILE = "job.json"
# The export stage's fp32 graph (its other variants: pipeline/export/variants.py)
ONNX_FILE = "model.onnx"
VARIANTS_PLOT = "variant_accuracy.png"
MANIFEST_FILE = "manifest.json"
# Every stage folder: its record, written last
STAGE_RECORD = "stage.json"
# The run folder
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
SUMMARY_TEXT = "summary.txt"
SUBMIT_FILE = "submit.json"


def weights_file(folder: str | Path) -> Path:
    """The weights file of the pair a stage folder (or any folder) holds."""
    return Path(folder) / WEIGHTS_FILE


def weights_meta_file(folder: str | Path) -> Path:
    """The model.json beside `weights_file(folder)`."""
    return Path(folder) / WEIGHTS_META_FILE


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder."""

    workdir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "workdir", Path(self.workdir))

    def stage(self, name: str) -> Path:
        """The folder stage `name` writes."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(STAGES)}")
        return self.workdir / name

    def stage_dirs(self) -> dict[str, Path]:
        """Every stage's folder, by name."""
        return {s: self.stage(s) for s in STAGES}

    def weights(self, stage: str) -> Path:
        """The weights file a training stage leaves."""
        return weights_file(self.stage(stage))

    def manifest(self) -> Path:
        """Where the prepare stage leaves the manifest when the recipe names no data.output."""
        return self.stage("prepare") / MANIFEST_FILE

    def onnx(self) -> Path:
        """The export stage's fp32 graph (benchmark's default input)."""
        return self.stage("export") / ONNX_FILE

    def deployed_weights(self, stages: tuple[str, ...] | list[str]) -> Path:
        """The weights export and benchmark read: the last training stage of the recipe's `stages`.

        Decided by the recipe, never by which files happen to exist: a recipe with a finetune stage
        exports the fine-tuned weights (missing ones are an error naming them, not a quiet switch
        to the pre-trained ones); a recipe without one exports the pre-trained weights."""
        return self.weights("finetune" if "finetune" in stages else "pretrain")

    def config(self) -> Path:
        return self.workdir / CONFIG_FILE

    def summary(self) -> Path:
        return self.workdir / SUMMARY_FILE

    def summary_text(self) -> Path:
        return self.workdir / SUMMARY_TEXT

    def submit_record(self) -> Path:
        return self.workdir / SUBMIT_FILE
