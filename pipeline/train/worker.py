"""The one entry point of a training rank: ``python -m pipeline.train.worker --job <out_dir>/job.json``.

Every launcher starts this module and nothing else: torchrun on this machine (`vitpipe pretrain`,
`vitpipe run`), and for a submitted job torchrun on each node, srun + torchrun (SLURM), the
Kubeflow operator's torchrun (k8s) and the DeepSpeed launcher (hostfile). The job file is the
typed `TrainJob` the orchestrating process wrote once (`stages/training.py`, `vitpipe submit`);
no rank re-reads the recipe. A failure is written to
``<out_dir>/error-rank<r>.txt`` so the launching process can report one clear message; any exit
that Python sees leaves ``exit-rank<r>.txt``, so a rank without one was killed.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

WORKER_MODULE = "pipeline.train.worker"  # what launchers run with `python -m` (pipeline.launch names it as text)
ERROR_PREFIX = "error-rank"  # <out_dir>/error-rank<r>.txt: the exception that ended rank r
EXIT_PREFIX = "exit-rank"  # <out_dir>/exit-rank<r>.txt: rank r ended by a Python path (not killed)


def main(argv: list[str] | None = None) -> int:
    """Run the job file given on the command line as this process's rank."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--job", required=True, help="job JSON written by the stage")
    args = parser.parse_args(argv)

    from pipeline.launch.lifetime import die_with_parent
    from pipeline.memory import tune_malloc

    # torchrun starts ranks in sessions of their own: without this a killed job's ranks train on
    die_with_parent()
    # Before deepspeed is imported: without a GPU, DeepSpeed's CPU accelerator (gloo). A local launch
    # sets it in the ranks' environment already; a node of a submitted job may not.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pipeline.train.loop import TrainJob, run_job

    tune_malloc()  # usually inherited from the launcher's environment; a rank started by hand gets it too

    job = TrainJob.load(args.job)
    # A submitted job's run is named by the scheduler's environment (vitpipe submit passes
    # MLFLOW_TRACKING_URI / MLFLOW_RUN_ID through); a local launch writes them into the job.
    job.tracking_uri = job.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    job.run_id = job.run_id or os.environ.get("MLFLOW_RUN_ID")
    rank = os.environ.get("RANK", "0")
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A rank that ends by any Python path (success, error, preemption) leaves exit-rank<r>.txt; one
    # killed by a signal (SIGKILL, the OOM killer) or crashing leaves none: that is how the stage
    # names the rank that died rather than the survivors that lost their peer (stage_runner).
    exit_file = out_dir / f"{EXIT_PREFIX}{rank}.txt"
    exit_file.unlink(missing_ok=True)  # from an earlier attempt (torchrun --max-restarts)
    status = "stopped"  # SystemExit (a preemption checkpoint) or KeyboardInterrupt
    try:
        run_job(job)
        status = "ok"
    except Exception as e:  # report, then fail the process so the launcher stops every rank
        status = "error"
        (out_dir / f"{ERROR_PREFIX}{rank}.txt").write_text(f"{type(e).__name__}: {e}\n")
        traceback.print_exc()
        return 1
    finally:
        exit_file.write_text(status + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
