"""One rank of a multi-node training stage: ``python -m pipeline.launch.entry <recipe> [key=value...] --workdir D``.

A per-node launcher (torchrun, srun + torchrun, the Kubeflow operator, the DeepSpeed launcher)
starts this module once per rank. Every rank loads the same recipe and overrides, builds the same
`TrainJob` the pretrain stage builds (`stages.pretrain`), writes it to the same path under the
shared workdir (identical bytes, atomic rename, so concurrent writers are harmless) and runs
`pipeline.train.loop.run_job` in this process: the worker code of local runs, with no nested launcher.

Layout (the one `vitpipe run` uses): reads <workdir>/prepare/manifest.json (or --manifest), writes
<workdir>/pretrain/{checkpoints/, model.safetensors, model.json, result.json, job.json}.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path


def build_job(recipe: str, overrides: list[str], workdir: Path, stage: str = "pretrain",
              manifest: str | Path | None = None):
    """The stage's TrainJob for this recipe, exactly as `stages.pretrain.run` builds it (plus tracking).

    `manifest`: a local file or folder every node can read, or an s3:// / http(s):// URL; default:
    where the recipe's prepare stage leaves it (data.output, else <workdir>/prepare).
    """
    from pipeline.config import load_config
    from pipeline.data.manifest import manifest_location
    from pipeline.data.storage import is_url
    from stages import pretrain
    from stages.recipe import dataset_manifest

    if stage != "pretrain":
        raise ValueError(f"--stage {stage}: only pretrain runs as a multi-node job")
    cfg = load_config(recipe, overrides)
    manifest = manifest or dataset_manifest(cfg, workdir)
    if not is_url(str(manifest)):
        manifest = Path(manifest)
        if not (manifest.is_file() or (manifest / "manifest.json").is_file()):
            raise FileNotFoundError(f"{manifest}: no manifest; run `vitpipe prepare {recipe} --workdir {workdir}` "
                                    "first (on a filesystem every node can read, or with data.output=s3://...)")
    manifest = manifest_location(str(manifest))
    job = pretrain.build_job(cfg.model, cfg.pretrain, manifest, workdir / stage)
    job.tracking_uri, job.run_id = os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_RUN_ID")
    return job


def write_job(job, path: Path) -> None:
    """Write the job file so that concurrent ranks on several nodes all leave the same complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.uname().nodename}.{os.getpid()}")
    job.save(tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Run this process's rank of the stage; exit 1 (with error-rank<R>.txt) on failure."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.launch.entry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--workdir", type=Path, required=True, help="shared run folder")
    parser.add_argument("--stage", default="pretrain", choices=["pretrain"])
    parser.add_argument("--manifest", help="manifest.json, its folder or an s3:// / http(s):// URL "
                        "(default: the recipe's data.output, else <workdir>/prepare/manifest.json)")
    args = parser.parse_args(argv)

    # Before deepspeed is imported: without a GPU, DeepSpeed's CPU accelerator (gloo), as in local runs.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pipeline.train.loop import run_job

    rank = os.environ.get("RANK", "0")
    job = build_job(args.recipe, args.overrides, args.workdir, args.stage, args.manifest)
    out_dir = Path(job.out_dir)
    write_job(job, out_dir / "job.json")
    try:
        run_job(job)
    except Exception as e:  # one clear line for whoever reads the run folder, then fail the rank
        (out_dir / f"error-rank{rank}.txt").write_text(f"{type(e).__name__}: {e}\n")
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
