"""`vitpipe submit | status | logs`: describe a training job, hand it to a launcher, read it back.

Hooked into the `vitpipe` command by `add_submit_parsers(sub)` in `build_parser` and by
`dispatch_submit(args)` in `dispatch` (it returns None for commands it does not own). A tool over
the layers: the stage layer builds and writes the job (`stages.submit`), `pipeline.launch` renders
and submits it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from pipeline.launch.targets import (SUBMIT_STAGES, SUBMIT_TOOLS, TARGETS, JobSpec, SubmitError, job_logs,
                                     job_status, passthrough_env, render, require_target, require_tool, submit)

COMMANDS = ("submit", "status", "logs")


def add_submit_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the submit, status and logs subcommands to the `vitpipe` parser's subparsers."""
    p = sub.add_parser(
        "submit", help="run a stage or the whole pipeline as a cluster job: local, torchrun, SLURM, Kubernetes, "
        "DeepSpeed hostfile",
        description="Describe a job and hand it to --target. --stage pretrain (the default) is a job of nodes x "
        "gpus-per-node ranks: every rank runs `python -m pipeline.train.worker --job <workdir>/pretrain/job.json`, "
        "the job this command writes from the recipe before it submits; it reads <workdir>/prepare/manifest.json "
        "(run `vitpipe prepare` first, or submit --stage prepare) and writes <workdir>/pretrain/. Any other "
        "--stage, or `run` for the whole pipeline, is one node running that `vitpipe` command (its training on "
        "gpus-per-node ranks) under SLURM, Kubernetes (a batch Job) or here: the same stage records and MLflow "
        "runs as a local run, so a later `vitpipe run` finds those stages done. --dry-run prints exactly what "
        "would be submitted and exits, writing nothing.")
    p.add_argument("recipe", help="recipe YAML (a path the nodes can read)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. pretrain.steps=50")
    p.add_argument("--target", choices=TARGETS, default="local", help="where the job runs (default local)")
    p.add_argument("--stage", choices=SUBMIT_STAGES, default="pretrain",
                   help="the stage to run, or `run` for the whole pipeline (default pretrain; only pretrain "
                   "spans several nodes)")
    p.add_argument("--nodes", type=int, default=1, help="machines, one launcher agent each")
    p.add_argument("--gpus-per-node", type=int, default=1, help="ranks per node (one per GPU; on CPU, processes)")
    p.add_argument("--node-rank", type=int, help="torchrun: run (or print) only this node's command")
    p.add_argument("--rdzv", metavar="HOST:PORT", help="rendezvous endpoint (torchrun, hostfile master)")
    p.add_argument("--rdzv-backend", choices=["c10d", "static"], default="c10d")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts of the worker group")
    p.add_argument("--workdir", type=Path, help="shared run folder (default runs/<recipe name>)")
    p.add_argument("--manifest", help="manifest.json, its folder or an s3:// / http(s):// URL every node can read "
                   "(default: the recipe's data.output, else <workdir>/prepare/manifest.json)")
    p.add_argument("--hosts", help="hostfile: comma-separated host names, the first is the master")
    p.add_argument("--name", help="job name (default vitpipe-<recipe name>, with -<stage> for every stage but pretrain)")
    p.add_argument("--image", default="vitpipe:cuda", help="k8s: container image built from docker/Dockerfile.cuda")
    p.add_argument("--time", default="24:00:00", help="slurm: time limit")
    p.add_argument("--partition", help="slurm: partition")
    p.add_argument("--account", help="slurm: account")
    p.add_argument("--cpus-per-task", type=int, default=8, help="slurm: CPUs per node task; k8s: CPU request")
    p.add_argument("--mem-gib", type=int, default=32, help="slurm: --mem per node; k8s: memory request (GiB)")
    p.add_argument("--gang-scheduler", metavar="NAME", help="k8s: a gang scheduler (e.g. volcano): all replicas "
                   "start together or none does")
    p.add_argument("--no-gpu", action="store_true", help="ask the scheduler for no GPUs (CPU clusters)")
    p.add_argument("--python", default=None, help="interpreter on the nodes (default: this one)")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted; submit nothing")

    for name, what in (("status", "state of a submitted job"), ("logs", "print a submitted job's log")):
        p = sub.add_parser(name, help=what, description=f"Print the {what.split(' ', 1)[1]}: a SLURM job id, or a "
                           "run folder holding submit.json (SLURM via squeue/sacct/scontrol, k8s via kubectl, "
                           "local runs from <workdir>/pretrain).")
        p.add_argument("job", help="SLURM job id or run folder")


def grace_seconds(cfg, stage: str) -> int:
    """The job's preemption window: its training stage's `preemption_grace_s` (the longer of the
    two for the whole pipeline; pre-training's for a job that trains nothing)."""
    if stage == "run":
        return max(cfg.pretrain.preemption_grace_s, cfg.finetune.preemption_grace_s)
    return (cfg.finetune if stage == "finetune" else cfg.pretrain).preemption_grace_s


def spec_from_args(args: argparse.Namespace, cfg=None) -> JobSpec:
    """The JobSpec of parsed `submit` arguments (the recipe is validated first)."""
    from pipeline.config import load_config

    cfg = cfg or load_config(args.recipe, args.overrides)  # a typo fails here, before anything is submitted
    workdir = args.workdir or Path("runs") / cfg.name
    # one name per stage (pre-training keeps the recipe's): a recipe's finetune, export and benchmark
    # jobs are all batch Jobs, and one name for them collides in the namespace
    base = "vitpipe-" + re.sub(r"[^a-z0-9-]+", "-", cfg.name.lower()).strip("-")
    name = args.name or (base if args.stage == "pretrain" else f"{base}-{args.stage}")
    return JobSpec(
        recipe=args.recipe, overrides=list(args.overrides), workdir=str(workdir), stage=args.stage, nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, name=name, rdzv_endpoint=args.rdzv, rdzv_backend=args.rdzv_backend,
        max_restarts=args.max_restarts, manifest=str(args.manifest) if args.manifest else None,
        hosts=[h for h in (args.hosts or "").split(",") if h], image=args.image, time_limit=args.time,
        partition=args.partition, account=args.account, cpus_per_task=args.cpus_per_task, gpu=not args.no_gpu,
        memory_gib=args.mem_gib, gang_scheduler=args.gang_scheduler,
        grace_seconds=grace_seconds(cfg, args.stage),  # the one preemption window (the recipe's)
        python=args.python or sys.executable, env=passthrough_env(),
    )


def run_submit(args: argparse.Namespace) -> int:
    """`vitpipe submit`: print (--dry-run) or submit; prints the job id for schedulers."""
    from pipeline.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    spec = spec_from_args(args, cfg)
    if args.dry_run:
        sys.stdout.write(render(spec, args.target, args.node_rank))
        return 0
    require_target(spec, args.target)
    if args.target != "local":
        require_tool(SUBMIT_TOOLS[args.target])  # a missing scheduler fails first, before anything is written
    if args.target != "local" and not spec.command_job:  # the stage commands write their own jobs
        from stages.submit import write_submitted_job  # torch and the stages: only for a job that is submitted

        write_submitted_job(cfg, spec, args.target)
    info = submit(spec, args.target, args.node_rank)
    if "job_id" in info:
        print(info["job_id"])
        return 0
    return int(info.get("exit", 0))


def run_status(args: argparse.Namespace) -> int:
    """`vitpipe status`: the scheduler's view of the job as JSON."""
    print(json.dumps(job_status(args.job), indent=2, default=str))
    return 0


def run_logs(args: argparse.Namespace) -> int:
    """`vitpipe logs`: the job's output."""
    sys.stdout.write(job_logs(args.job))
    return 0


def dispatch_submit(args: argparse.Namespace) -> int | None:
    """Run submit/status/logs; None when `args.command` is another command. Errors print one line, exit 1."""
    handler = {"submit": run_submit, "status": run_status, "logs": run_logs}.get(args.command)
    if handler is None:
        return None
    try:
        return handler(args)
    except SubmitError as e:
        print(f"vitpipe: error: {e}", file=sys.stderr)
        return 1
