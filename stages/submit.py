"""The orchestrator's half of a submitted job: start the stage, build the typed job once, write it where the ranks read it.

`vitpipe submit` (tools/submit_cli.py) calls `write_submitted_job` before it hands the job to a
scheduler; every rank on every node then runs `pipeline.train.worker --job <that file>`, the same
entry point as a local run. The job is the one `stages.pretrain.run` builds, with the paths the
ranks see (`targets.rank_workdir`: the shared filesystem, or the k8s volume's mount point).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.data.manifest import manifest_location
from pipeline.data.storage import is_url
from pipeline.launch.targets import JobSpec, job_file, rank_workdir
from pipeline.run_layout import MANIFEST_FILE, RunLayout
from pipeline.track import start_tracker
from pipeline.train.job import TrainJob
from stages import pretrain
from stages.recipe import dataset_manifest


def submitted_job(cfg: PipelineConfig, workdir: str | Path, stage: str = "pretrain",
                  manifest: str | Path | None = None, ranks_see: str | Path | None = None) -> TrainJob:
    """The stage's TrainJob, exactly as `stages.pretrain.run` builds it.

    `manifest`: a local file or folder every node can read, or an s3:// / http(s):// URL; default:
    where the recipe's prepare stage leaves it (data.output, else <workdir>/prepare). `ranks_see`:
    the run folder as the ranks see it (default `workdir` itself); a local manifest inside the run
    folder is named by that path. A local manifest is checked here, on the submitting machine, so
    a missing one fails before anything is queued.
    """
    if stage != "pretrain":
        raise ValueError(f"--stage {stage}: only pretrain runs as a multi-node job")
    workdir = Path(workdir)
    manifest = manifest or dataset_manifest(cfg, workdir)
    if not is_url(str(manifest)):
        manifest = Path(manifest)
        if not (manifest.is_file() or (manifest / MANIFEST_FILE).is_file()):
            raise FileNotFoundError(f"{manifest}: no manifest; run `vitpipe prepare <recipe> --workdir {workdir}` "
                                    "first (on a filesystem every node can read, or with data.output=s3://...)")
    manifest = manifest_location(str(manifest))
    out_dir = RunLayout(workdir).stage(stage)
    if ranks_see is not None and Path(ranks_see) != workdir.resolve():
        seen = Path(ranks_see)
        if not is_url(manifest) and Path(manifest).is_relative_to(workdir.resolve()):
            manifest = str(seen / Path(manifest).relative_to(workdir.resolve()))
        out_dir = RunLayout(seen).stage(stage)
    return pretrain.build_job(cfg.model, cfg.pretrain, manifest, out_dir)


def write_submitted_job(cfg: PipelineConfig, spec: JobSpec, target: str) -> Path:
    """Before `spec` is handed to a scheduler: start the stage as a local run would (checks,
    checkpoint rules, the MLflow run, `submitted.json`: `stages.pretrain.begin_submitted`) and write
    the job file where its ranks will read it; return that file (on this machine)."""
    workdir = Path(spec.workdir)
    job = submitted_job(cfg, workdir, spec.stage, spec.manifest, ranks_see=rank_workdir(spec, target))
    out_dir = RunLayout(workdir).stage(spec.stage)
    tracker = start_tracker(cfg.tracking, run_name=f"{cfg.name}/{spec.stage}",
                            tags={"vitpipe.stage": spec.stage, "vitpipe.submitted_to": target})
    job = pretrain.begin_submitted(cfg.model, cfg.pretrain, spec.manifest or dataset_manifest(cfg, workdir),
                                   out_dir, tracker, job)
    tracker.close()  # delivered; the run stays RUNNING for the ranks, and is ended when the job is recorded
    here = out_dir / Path(job_file(spec, target)).name
    here.parent.mkdir(parents=True, exist_ok=True)
    job.save(here)  # atomic: a node that starts early never reads half a file
    return here
