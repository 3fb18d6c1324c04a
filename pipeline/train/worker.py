"""Entry point of one training rank: ``python -m pipeline.train.worker --job job.json``.

Started by a launcher (torchrun locally or on each node). A failure is written to
``<out_dir>/error-rank<r>.txt`` so the launching process can report one clear message.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Run the job file given on the command line as this process's rank."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--job", required=True, help="job JSON written by the stage")
    args = parser.parse_args(argv)

    from pipeline.memory import tune_malloc
    from pipeline.train.loop import TrainJob, run_job

    tune_malloc()  # usually inherited from the launcher's environment; a rank started by hand gets it too

    job = TrainJob.load(args.job)
    rank = os.environ.get("RANK", "0")
    try:
        run_job(job)
    except Exception as e:  # report, then fail the process so the launcher stops every rank
        Path(job.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(job.out_dir) / f"error-rank{rank}.txt").write_text(f"{type(e).__name__}: {e}\n")
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
