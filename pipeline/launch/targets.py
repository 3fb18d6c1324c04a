"""Describe one job and render it for a launcher: local, torchrun, SLURM, Kubernetes, DeepSpeed.

A job is one stage of a recipe, or the whole pipeline (``stage="run"``). Pre-training is the one
multi-node stage: every multi-node target runs the same per-rank program, ``python -m <spec.worker_module> --job
<workdir>/<stage>/job.json`` (the training worker, reading the typed job the orchestrator wrote
once; this module names it but never imports it), under a launcher that starts one agent per node:

  local     ``vitpipe pretrain`` with ``pretrain.ranks = nodes x gpus_per_node`` on this machine
  torchrun  one ``torchrun`` command per node (c10d or static rendezvous at host:port)
  slurm     an sbatch script: one task per node runs torchrun; rendezvous on the allocation's first node
  k8s       a Kubeflow PyTorchJob (Master + Workers); torchrun takes its arguments from the PET_* env
            the training operator injects
  hostfile  a DeepSpeed hostfile and the ``deepspeed --hostfile`` command (pdsh/ssh to every host)

Every other stage, and the whole pipeline, is a *command job*: one node runs the stage's own
``vitpipe <stage>`` (or ``vitpipe run``) command, its training stages on ``gpus_per_node`` ranks
there, so it writes the same stage records and MLflow runs as a run on a workstation and a later
``vitpipe run`` of the same settings finds its stages done (a finished pre-training job it did not
start is adopted, `stages.pretrain`). Targets: local, slurm (an sbatch script of one task), k8s
(a batch/v1 Job of one pod); torchrun and hostfile start ranks of a multi-node pre-training only.

Rendering is pure (a `JobSpec` in, text or argv out); `submit` and the status/log readers run tools.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from pipeline.atomic import write_json
from pipeline.launch.lifetime import REQUEUE_EXIT
from pipeline.run_layout import JOB_FILE, RESULT_FILE, STAGE_RECORD, TRAIN_LOG, RunLayout

TARGETS = ("local", "torchrun", "slurm", "k8s", "hostfile")
SUBMIT_STAGES = ("prepare", "pretrain", "finetune", "export", "benchmark", "run")  # "run": the whole pipeline
MULTI_NODE_STAGES = ("pretrain",)  # ranks on many nodes, started by a launcher per node
COMMAND_TARGETS = ("local", "slurm", "k8s")  # where a command job (every other stage) can run
# `vitpipe <stage>` options that name the stage's inputs: only these stages take --manifest
MANIFEST_STAGES = ("pretrain", "finetune", "export")
# The command each target hands the job to (checked before anything is written or submitted).
SUBMIT_TOOLS = {"torchrun": "torchrun", "slurm": "sbatch", "k8s": "kubectl", "hostfile": "deepspeed"}
DEFAULT_RDZV_PORT = 29500
# The port the Kubeflow training operator looks for (by this name) on the Master container.
K8S_MASTER_PORT = 23456
# Forwarded to the ranks as is: where to track, and the object store behind MLflow's artifacts.
PASSTHROUGH_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_S3_ENDPOINT_URL",
                   "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                   "AWS_SESSION_TOKEN")
# Never written into a manifest or script in clear text (k8s reads them from a Secret; sbatch
# exports the submitting shell's environment).
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# torchrun forwards these to its workers; SIGUSR1 is how SLURM announces the end of the time limit.
ELASTIC_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"

INSTALL_HINTS = {
    "sbatch": "install the SLURM client (Debian: apt-get install slurm-client)",
    "squeue": "install the SLURM client (Debian: apt-get install slurm-client)",
    "scontrol": "install the SLURM client (Debian: apt-get install slurm-client)",
    "kubectl": "install kubectl (https://kubernetes.io/docs/tasks/tools/) and point it at the cluster",
    "deepspeed": "install DeepSpeed (pip install deepspeed) and pdsh for ssh fan-out (apt-get install pdsh)",
    "torchrun": "install PyTorch (pip install torch), which provides torchrun",
}


class SubmitError(RuntimeError):
    """A job that could not be rendered or handed to its scheduler; the message says how to fix it."""


class ToolMissing(SubmitError):
    """A scheduler or launcher command that is not on PATH."""


@dataclass
class JobSpec:
    """One training job, independent of where it runs."""

    recipe: str
    """Recipe YAML, as a path the nodes can read (shared filesystem or inside the image)."""
    workdir: str
    """Shared run folder: <workdir>/prepare/manifest.json is read, <workdir>/<stage>/ is written."""
    overrides: list[str] = field(default_factory=list)
    """Dotted ``key=value`` overrides, passed through unchanged."""
    stage: Literal["prepare", "pretrain", "finetune", "export", "benchmark", "run"] = "pretrain"
    """The stage the job runs, or "run" for the whole pipeline; only pretrain spans several nodes."""
    nodes: int = 1
    """Number of machines (one launcher agent each)."""
    gpus_per_node: int = 1
    """Ranks per node: one per GPU (on a CPU-only machine, processes)."""
    name: str = "vitpipe"
    """Job name (SLURM job name, PyTorchJob name, rendezvous id); [a-z0-9-]."""
    rdzv_endpoint: Optional[str] = None
    """host:port where the nodes meet; SLURM and k8s derive it from the allocation."""
    rdzv_backend: Literal["c10d", "static"] = "c10d"
    """c10d: any node may host the store, ranks assigned at join; static: node_rank fixes the ranks."""
    max_restarts: int = 0
    """torchrun restarts of the whole worker group after a failure."""
    manifest: Optional[str] = None
    """manifest.json (default <workdir>/prepare/manifest.json)."""
    hosts: list[str] = field(default_factory=list)
    """Host names for the hostfile target (first one is the master)."""
    image: str = "vitpipe:cuda"
    """Container image for k8s (built from docker/Dockerfile.cuda)."""
    time_limit: str = "24:00:00"
    """SLURM wall-clock limit (HH:MM:SS or D-HH:MM:SS)."""
    partition: Optional[str] = None
    account: Optional[str] = None
    cpus_per_task: int = 8
    """CPUs per node task (SLURM) or container CPU request (k8s)."""
    memory_gib: int = 32
    """Memory per node: SLURM's --mem, the container's memory request (k8s)."""
    grace_seconds: int = 120
    """Preemption window, from the recipe's `<stage>.preemption_grace_s`: torchrun's shutdown timeout,
    Kubernetes' terminationGracePeriodSeconds, SLURM's --signal lead time."""
    gang_scheduler: Optional[str] = None
    """k8s: a gang scheduler (e.g. volcano) that starts all replicas together or none; None: the default scheduler."""
    gpu: bool = True
    """Ask the scheduler for GPUs (off for CPU-only clusters and tests)."""
    python: str = "python"
    """Interpreter on the nodes (SLURM, hostfile): e.g. the venv's python on a shared filesystem."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment for the ranks (MLflow, object storage); see `passthrough_env`."""
    k8s_secret: str = "vitpipe-s3"
    """Kubernetes Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."""
    worker_module: str = "pipeline.train.worker"
    """The per-rank program, run as ``python -m <worker_module> --job <job file>``."""

    def __post_init__(self) -> None:
        if self.stage not in SUBMIT_STAGES:
            raise SubmitError(f"--stage {self.stage}: choose one of {', '.join(SUBMIT_STAGES)}")
        if self.command_job and self.nodes > 1:
            raise SubmitError(
                f"--stage {self.stage} runs on one node ({self.gpus_per_node} rank(s) there for its training); "
                "only pretrain spans nodes: submit `--stage pretrain --nodes N` first, then "
                f"`--stage {self.stage}` with --nodes 1, which takes the finished pre-training as done")
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise SubmitError(f"--nodes ({self.nodes}) and --gpus-per-node ({self.gpus_per_node}) must be >= 1")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?", self.name):
            raise SubmitError(f"job name {self.name!r}: use lower-case letters, digits and '-' (a Kubernetes name)")
        if self.rdzv_endpoint is not None:
            split_endpoint(self.rdzv_endpoint)
        if self.max_restarts < 0:
            raise SubmitError("--max-restarts must be >= 0")
        if self.memory_gib < 1 or self.cpus_per_task < 1:
            raise SubmitError(f"--mem-gib ({self.memory_gib}) and --cpus-per-task ({self.cpus_per_task}) must be >= 1")
        if self.grace_seconds < 1:
            raise SubmitError(f"preemption grace {self.grace_seconds} s: must be >= 1")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def command_job(self) -> bool:
        """True: one process runs the stage's own command (every stage but a multi-node pretrain)."""
        return self.stage not in MULTI_NODE_STAGES

    @property
    def logs_dir(self) -> Path:
        return Path(self.workdir) / "logs"


def passthrough_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The MLflow and object-storage variables of `environ` (default os.environ) that are set."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in PASSTHROUGH_ENV if environ.get(k)}


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` -> (host, port), with a message that says what is wrong."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SubmitError(f"rendezvous endpoint {endpoint!r}: expected host:port, e.g. node001:{DEFAULT_RDZV_PORT}")
    return host, int(port)


def rank_workdir(spec: JobSpec, target: str) -> str:
    """The run folder as the ranks see it: the shared filesystem's absolute path, or for k8s the
    mount point of the shared volume (a relative workdir is mounted under /workspace)."""
    if target == "k8s":
        workdir = str(Path(spec.workdir))
        return workdir if workdir.startswith("/") else f"/workspace/{workdir}"
    return str(Path(spec.workdir).resolve())


def job_file(spec: JobSpec, target: str) -> str:
    """The job file the ranks read (written by the orchestrator before it submits)."""
    return str(RunLayout(Path(rank_workdir(spec, target))).stage(spec.stage) / JOB_FILE)


def worker_args(spec: JobSpec, target: str) -> list[str]:
    """Arguments after ``-m`` for the per-rank program (the same on every node)."""
    return [spec.worker_module, "--job", job_file(spec, target)]


def require_tool(name: str) -> str:
    """Full path of `name` on PATH, or a `ToolMissing` error saying what to install."""
    path = shutil.which(name)
    if path is None:
        raise ToolMissing(f"{name} not found: {INSTALL_HINTS.get(name, 'install it')} or use --dry-run")
    return path


# --------------------------------------------------------------------------- local


def stage_command(spec: JobSpec, python: str, workdir: str) -> list[str]:
    """The job's own `vitpipe` command: ``python -m pipeline <stage|run> RECIPE overrides --workdir W``,
    its training stages on ``nodes x gpus_per_node`` ranks (the ranks of one machine)."""
    ranks = {"pretrain": ["pretrain"], "finetune": ["finetune"], "run": ["pretrain", "finetune"]}
    manifest = ["--manifest", spec.manifest] if spec.manifest and spec.stage in MANIFEST_STAGES else []
    return [python, "-m", "pipeline", spec.stage, spec.recipe, *spec.overrides,
            *(f"{s}.ranks={spec.world_size}" for s in ranks.get(spec.stage, [])), "--workdir", workdir, *manifest]


def local_command(spec: JobSpec) -> list[str]:
    """The stage command on this machine with nodes x gpus_per_node ranks."""
    return stage_command(spec, sys.executable, spec.workdir)


def require_target(spec: JobSpec, target: str) -> None:
    """A command job (any stage but pretrain) only runs where one process can run it."""
    if spec.command_job and target not in COMMAND_TARGETS:
        raise SubmitError(f"--stage {spec.stage} with --target {target}: {target} starts the ranks of a multi-node "
                          f"pre-training; run --stage {spec.stage} with --target local, slurm or k8s")


# --------------------------------------------------------------------------- torchrun


def node_torchrun_command(spec: JobSpec, node_rank: int | str, endpoint: str | None = None,
                          rdzv_id: str | None = None, nnodes: str | int | None = None,
                          target: str = "torchrun") -> list[str]:
    """torchrun for one node of a multi-node job; `node_rank`/`endpoint` may be shell expressions
    (SLURM). (`local.standalone_torchrun_command` is a job on this machine alone.)"""
    endpoint = endpoint or spec.rdzv_endpoint
    if endpoint is None:
        raise SubmitError("the torchrun target needs --rdzv host:port (the address of node 0, reachable from every node)")
    if isinstance(node_rank, int) and not 0 <= node_rank < spec.nodes:
        raise SubmitError(f"--node-rank {node_rank}: must be in [0, {spec.nodes})")
    cmd = ["torchrun", f"--nnodes={nnodes or spec.nodes}", f"--nproc_per_node={spec.gpus_per_node}",
           f"--node_rank={node_rank}", f"--max_restarts={spec.max_restarts}",
           f"--shutdown_timeout={spec.grace_seconds}"]
    if spec.rdzv_backend == "static":
        host, port = endpoint.rsplit(":", 1)
        cmd += ["--rdzv_backend=static", f"--master_addr={host}", f"--master_port={port}"]
    else:
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", f"--rdzv_id={rdzv_id or spec.name}"]
    return cmd + ["-m", *worker_args(spec, target)]


def render_torchrun(spec: JobSpec, node_rank: int | None = None) -> str:
    """One shell line per node (or only `node_rank`'s), each preceded by a ``# node R`` comment."""
    ranks = range(spec.nodes) if node_rank is None else [node_rank]
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in spec.env.items() if k not in SECRET_ENV)
    lines = []
    for r in ranks:
        cmd = shlex.join(node_torchrun_command(spec, r))
        lines += [f"# node {r} of {spec.nodes}", f"{env} {cmd}" if env else cmd]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- SLURM


def slurm_log_paths(spec: JobSpec) -> tuple[str, str]:
    """sbatch --output/--error patterns (%x job name, %j job id)."""
    logs = Path(spec.workdir).resolve() / "logs"
    return str(logs / "%x-%j.out"), str(logs / "%x-%j.err")


def _sbatch_header(spec: JobSpec) -> list[str]:
    """The #SBATCH lines, the run's log folder and environment: the same for every kind of job."""
    out, err = slurm_log_paths(spec)
    sb = [f"--job-name={spec.name}", f"--nodes={spec.nodes}", "--ntasks-per-node=1",
          f"--cpus-per-task={spec.cpus_per_task}", f"--time={spec.time_limit}",
          f"--mem={spec.memory_gib}G", f"--output={out}", f"--error={err}", "--open-mode=append", "--requeue",
          f"--signal=B:USR1@{spec.grace_seconds}"]
    if spec.gpu:
        sb.insert(3, f"--gpus-per-node={spec.gpus_per_node}")
    if spec.partition:
        sb.append(f"--partition={spec.partition}")
    if spec.account:
        sb.append(f"--account={spec.account}")
    return ["#!/bin/bash", *(f"#SBATCH {a}" for a in sb),
            f"# vitpipe {spec.stage}: {spec.nodes} node(s) x {spec.gpus_per_node} rank(s), workdir {spec.workdir}",
            "set -euo pipefail",
            f"mkdir -p {shlex.quote(str(Path(spec.workdir).resolve() / 'logs'))}",
            *(f"export {k}={shlex.quote(v)}" for k, v in spec.env.items() if k not in SECRET_ENV),
            f"export TORCHELASTIC_SIGNALS_TO_HANDLE={ELASTIC_SIGNALS}"]


def _srun_and_requeue(spec: JobSpec, task: str) -> list[str]:
    """Start `task` (a shell command) with srun, one per node, and requeue the job when it was
    preempted: SIGUSR1 from SLURM, forwarded through srun, or the task's own REQUEUE_EXIT (a
    training stage that stopped after its checkpoint)."""
    return ["preempted=0",
            "on_preempt() {",
            '  preempted=1',
            '  echo "vitpipe: SIGUSR1 (time limit or preemption): checkpointing, then requeueing"',
            '  kill -USR1 "$srun_pid" 2>/dev/null || true',
            "}",
            "trap on_preempt USR1",
            # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05): repeat it, or each task gets one CPU
            f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task={spec.cpus_per_task} {task} &",
            "srun_pid=$!",
            # `wait` returns early when a trapped signal arrives; wait again for the checkpoint.
            'status=0; wait "$srun_pid" || status=$?',
            'if [ "$preempted" = 1 ]; then wait "$srun_pid" || true; fi',
            f'if [ "$preempted" = 1 ] || [ "$status" = {REQUEUE_EXIT} ]; then scontrol requeue "$SLURM_JOB_ID"; exit 0; fi',
            'exit "$status"']


def slurm_script(spec: JobSpec) -> str:
    """An sbatch script. Pre-training: one task per node running torchrun, rendezvous on the
    allocation's first node. Any other stage, or the whole pipeline: one task running the stage's
    own `vitpipe` command (`stage_command`).

    Preemption: SLURM sends SIGUSR1 to this batch shell `grace_seconds` before the time limit (or on
    preemption with a grace time); the trap forwards it through srun to torchrun (or to `vitpipe`,
    which passes it on to its torchrun), which forwards it to the ranks
    (TORCHELASTIC_SIGNALS_TO_HANDLE) so they can write a checkpoint; then the job is requeued and
    continues from that checkpoint.
    """
    if spec.command_job:
        # The node's shell runs the command in the folder sbatch was called from (its default).
        task = shlex.join(stage_command(spec, spec.python, str(Path(spec.workdir).resolve())))
        return "\n".join([*_sbatch_header(spec),
                           f'echo "vitpipe: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on '
                           f'$SLURM_JOB_NODELIST: vitpipe {spec.stage}"',
                           *_srun_and_requeue(spec, task)]) + "\n"
    port = split_endpoint(spec.rdzv_endpoint)[1] if spec.rdzv_endpoint else DEFAULT_RDZV_PORT
    # Node rank and endpoint are expanded on each node by the shell that srun starts there.
    per_node = node_torchrun_command(spec, node_rank="$SLURM_NODEID", endpoint="$head_node:$rdzv_port",
                                     rdzv_id="$SLURM_JOB_ID", nnodes="$SLURM_NNODES", target="slurm")
    # No reliance on torchrun being on PATH: the interpreter the nodes use runs the launcher module.
    per_node = [spec.python, "-m", "torch.distributed.run", *per_node[1:]]
    inner = "exec " + " ".join(f'"{a}"' if "$" in a else shlex.quote(a) for a in per_node)
    lines = [*_sbatch_header(spec),
             'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
             f"export head_node rdzv_port={port}",
             'echo "vitpipe: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, '
             'rendezvous $head_node:$rdzv_port"',
             # Quoted: $SLURM_NODEID etc. are expanded by the task's shell on its own node.
             *_srun_and_requeue(spec, f"bash -c {shlex.quote(inner)}")]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- Kubernetes


def _k8s_env(spec: JobSpec) -> list[dict]:
    env = [{"name": k, "value": v} for k, v in spec.env.items() if k not in SECRET_ENV]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": spec.k8s_secret, "key": k, "optional": True}}}
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    env += [{"name": "TORCHELASTIC_SIGNALS_TO_HANDLE", "value": ELASTIC_SIGNALS}]
    if not spec.gpu:
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})
    return env


def pytorchjob_manifest(spec: JobSpec, pvc: str = "vitpipe-work") -> dict:
    """A Kubeflow PyTorchJob (kubeflow.org/v1): Master + (nodes - 1) Workers, one torchrun each.

    The training operator injects PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR
    and PET_MASTER_PORT into every replica; torchrun reads PET_<ARG> as the default of each
    argument, so the container command names no rendezvous flags (a static rendezvous at the
    Master's service). The workdir is a shared volume (a ReadWriteMany PVC) mounted at the same path.
    """
    def replica(count: int, master: bool) -> dict:
        command = ["torchrun", f"--max_restarts={spec.max_restarts}", f"--shutdown_timeout={spec.grace_seconds}",
                   "-m", *worker_args(spec, "k8s")]
        # the operator finds the training container by its name, "pytorch"
        template = _pod_template(spec, "pytorch", command, pvc, port=K8S_MASTER_PORT if master else None)
        return {"replicas": count, "restartPolicy": "OnFailure", "template": template}

    replicas = {"Master": replica(1, master=True)}
    if spec.nodes > 1:
        replicas["Worker"] = replica(spec.nodes - 1, master=False)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": spec.name, "labels": {"app.kubernetes.io/name": "vitpipe",
                                                  "vitpipe/stage": spec.stage}},
        "spec": {
            "nprocPerNode": str(spec.gpus_per_node),
            "runPolicy": {"backoffLimit": max(spec.max_restarts, 0) + 3, "cleanPodPolicy": "None",
                          # gang scheduling: every replica starts, or none holds GPUs while waiting
                          **({"schedulingPolicy": {"minAvailable": spec.nodes}} if spec.gang_scheduler else {})},
            "pytorchReplicaSpecs": replicas,
        },
    }


def _pod_template(spec: JobSpec, name: str, command: list[str], pvc: str, port: int | None = None) -> dict:
    """One pod of the job: its container (image, command, env, CPU/memory/GPU requests, the shared
    run folder and a memory-backed /dev/shm) and the preemption window."""
    resources: dict = {"requests": {"cpu": str(spec.cpus_per_task), "memory": f"{spec.memory_gib}Gi"}, "limits": {}}
    if spec.gpu:
        resources["limits"]["nvidia.com/gpu"] = str(spec.gpus_per_node)
    container = {
        "name": name,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "env": _k8s_env(spec),
        "resources": resources,
        # the ranks see the shared volume at the run folder's path
        "volumeMounts": [{"name": "workdir", "mountPath": rank_workdir(spec, "k8s")},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if port is not None:
        container["ports"] = [{"name": "pytorchjob-port", "containerPort": port}]
    return {"spec": {
        # the kubelet's SIGTERM -> SIGKILL window: the ranks' time to write a checkpoint
        "terminationGracePeriodSeconds": spec.grace_seconds,
        **({"schedulerName": spec.gang_scheduler} if spec.gang_scheduler else {}),
        "containers": [container],
        "volumes": [{"name": "workdir", "persistentVolumeClaim": {"claimName": pvc}},
                    # NCCL and DataLoader workers need more shared memory than the default 64 MiB
                    {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }}


def command_job_manifest(spec: JobSpec, pvc: str = "vitpipe-work") -> dict:
    """A Kubernetes batch/v1 Job of one pod running the stage's own `vitpipe` command (a command
    job: any stage but a multi-node pretrain, or the whole pipeline). A preempted training stage
    exits with REQUEUE_EXIT and the pod is retried (backoffLimit), resuming from its checkpoint."""
    command = stage_command(spec, "python", rank_workdir(spec, "k8s"))
    template = _pod_template(spec, "vitpipe", command, pvc)
    template["spec"]["restartPolicy"] = "Never"  # a failed pod is replaced by a new one, up to backoffLimit
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": spec.name, "labels": {"app.kubernetes.io/name": "vitpipe", "vitpipe/stage": spec.stage}},
        "spec": {"backoffLimit": max(spec.max_restarts, 0) + 3, "template": template},
    }


def k8s_kind(spec: JobSpec) -> str:
    """The Kubernetes object a job is: a PyTorchJob (multi-node pretrain) or a batch Job."""
    return "Job" if spec.command_job else "PyTorchJob"


def render_k8s(spec: JobSpec) -> str:
    """The PyTorchJob, or for a command job the batch Job, as YAML (what ``kubectl create -f -`` receives)."""
    import yaml

    return yaml.safe_dump(command_job_manifest(spec) if spec.command_job else pytorchjob_manifest(spec),
                          sort_keys=False)


# --------------------------------------------------------------------------- DeepSpeed hostfile


def deepspeed_hostfile(spec: JobSpec) -> str:
    """``host slots=G`` per node, the MPI-style format deepspeed.launcher.runner parses."""
    if len(spec.hosts) != spec.nodes:
        raise SubmitError(f"the hostfile target needs --hosts with {spec.nodes} host name(s), got {len(spec.hosts)}")
    return "".join(f"{h} slots={spec.gpus_per_node}\n" for h in spec.hosts)


def hostfile_path(spec: JobSpec) -> Path:
    return Path(spec.workdir).resolve() / "hostfile"


def deepspeed_command(spec: JobSpec) -> list[str]:
    """The DeepSpeed launcher: ssh (pdsh) to every host, start G ranks there running the entry module."""
    master = split_endpoint(spec.rdzv_endpoint)[0] if spec.rdzv_endpoint else (spec.hosts or ["localhost"])[0]
    port = split_endpoint(spec.rdzv_endpoint)[1] if spec.rdzv_endpoint else DEFAULT_RDZV_PORT
    module, *args = worker_args(spec, "hostfile")
    # --no_local_rank: the worker reads LOCAL_RANK from the environment, like under torchrun.
    return ["deepspeed", f"--hostfile={hostfile_path(spec)}", f"--num_nodes={spec.nodes}",
            f"--num_gpus={spec.gpus_per_node}", f"--master_addr={master}", f"--master_port={port}",
            "--module", "--no_local_rank", module, *args]


def render_hostfile(spec: JobSpec) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in spec.env.items() if k not in SECRET_ENV)
    cmd = shlex.join(deepspeed_command(spec))
    return (f"# {hostfile_path(spec)}\n{deepspeed_hostfile(spec)}# command (run on {spec.hosts[0]})\n"
            + (f"{env} {cmd}" if env else cmd) + "\n")


# --------------------------------------------------------------------------- render / submit


def render(spec: JobSpec, target: str, node_rank: int | None = None) -> str:
    """Exactly what `submit` would hand over: a command line, a script or a manifest."""
    require_target(spec, target)
    if target == "local":
        return shlex.join(local_command(spec)) + "\n"
    if target == "torchrun":
        return render_torchrun(spec, node_rank)
    if target == "slurm":
        return slurm_script(spec)
    if target == "k8s":
        return render_k8s(spec)
    if target == "hostfile":
        return render_hostfile(spec)
    raise SubmitError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")


def _record(spec: JobSpec, info: dict) -> None:
    write_json(Path(spec.workdir) / "submit.json", info)


def submit(spec: JobSpec, target: str, node_rank: int | None = None) -> dict:
    """Run or hand over the job; returns what was submitted (``job_id`` for schedulers, ``exit`` for local runs)."""
    workdir = Path(spec.workdir)
    env = {**os.environ, **spec.env}
    require_target(spec, target)
    if target == "local":
        code = subprocess.call(local_command(spec), env=env)
        info = {"target": target, "name": spec.name, "exit": code}
    elif target == "torchrun":
        if node_rank is None and spec.nodes > 1:
            raise SubmitError("the torchrun target runs one node per call: pass --node-rank R on each node "
                              "(or --dry-run to print every node's command)")
        require_tool(SUBMIT_TOOLS[target])
        code = subprocess.call(node_torchrun_command(spec, node_rank or 0), env=env)
        info = {"target": target, "name": spec.name, "node_rank": node_rank or 0, "exit": code}
    elif target == "slurm":
        sbatch = require_tool(SUBMIT_TOOLS[target])
        script = workdir.resolve() / "logs" / f"{spec.name}.sbatch"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(slurm_script(spec))
        proc = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SubmitError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
        job_id = proc.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
        out, err = slurm_log_paths(spec)
        info = {"target": target, "name": spec.name, "job_id": job_id, "script": str(script),
                "output": out.replace("%x", spec.name).replace("%j", job_id),
                "error": err.replace("%x", spec.name).replace("%j", job_id)}
    elif target == "k8s":
        kubectl = require_tool(SUBMIT_TOOLS[target])
        # create, not apply: apply of a finished Job with the same spec answers "unchanged" and runs
        # nothing, and of one with another spec fails on its immutable pod template
        proc = subprocess.run([kubectl, "create", "-f", "-"], input=render_k8s(spec), capture_output=True, text=True)
        if proc.returncode != 0:
            kind = k8s_kind(spec)
            hint = (f"; a {kind} named {spec.name!r} already exists: delete it (kubectl delete {kind.lower()} "
                    f"{spec.name}) or submit under another name (--name)") if "AlreadyExists" in proc.stderr else ""
            raise SubmitError(f"kubectl create failed (exit {proc.returncode}): {proc.stderr.strip()}{hint}")
        info = {"target": target, "name": spec.name, "job_id": spec.name, "kind": k8s_kind(spec),
                "kubectl": proc.stdout.strip()}
    elif target == "hostfile":
        deepspeed = require_tool(SUBMIT_TOOLS[target])
        path = hostfile_path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(deepspeed_hostfile(spec))
        code = subprocess.call([deepspeed, *deepspeed_command(spec)[1:]], env=env)
        info = {"target": target, "name": spec.name, "hostfile": str(path), "exit": code}
    else:
        raise SubmitError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    info["workdir"], info["stage"] = str(workdir.resolve()), spec.stage
    _record(spec, info)
    return info


# --------------------------------------------------------------------------- status / logs


def _resolve(ref: str) -> dict:
    """A job reference (a workdir with submit.json, or a bare SLURM job id) -> submission record."""
    path = Path(ref)
    if (record := RunLayout(path).submit_record()).is_file():
        return json.loads(record.read_text())
    if path.is_dir():
        return {"target": "local", "workdir": str(path.resolve())}
    if re.fullmatch(r"\d+(_\d+)?", ref):
        return {"target": "slurm", "job_id": ref}
    raise SubmitError(f"{ref!r} is neither a run folder nor a SLURM job id")


def scontrol_fields(text: str) -> dict[str, str]:
    """``Key=Value`` pairs of ``scontrol show job`` output (values without spaces)."""
    return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", text))


def slurm_status(job_id: str) -> dict:
    """State of a SLURM job: squeue while it is known to the controller's queue, else sacct, else scontrol."""
    squeue = require_tool("squeue")
    proc = subprocess.run([squeue, "-h", "-j", job_id, "-o", "%T|%M|%N|%r"], capture_output=True, text=True)
    if proc.returncode == 0 and proc.stdout.strip():
        state, elapsed, nodes, reason = proc.stdout.strip().splitlines()[0].split("|")
        return {"job_id": job_id, "state": state, "elapsed": elapsed, "nodes": nodes, "reason": reason, "source": "squeue"}
    if shutil.which("sacct"):
        proc = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode,Elapsed,NodeList"],
                              capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.strip():
            state, exit_code, elapsed, nodes = proc.stdout.strip().splitlines()[-1].split("|")
            return {"job_id": job_id, "state": state.split()[0], "exit_code": exit_code, "elapsed": elapsed,
                    "nodes": nodes, "source": "sacct"}
    # No accounting storage (sacct fails): the controller remembers finished jobs for MinJobAge.
    proc = subprocess.run([require_tool("scontrol"), "show", "job", job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SubmitError(f"SLURM does not know job {job_id}: {proc.stderr.strip()}")
    f = scontrol_fields(proc.stdout)
    return {"job_id": job_id, "state": f.get("JobState", "UNKNOWN"), "exit_code": f.get("ExitCode"),
            "elapsed": f.get("RunTime"), "nodes": f.get("NodeList"), "reason": f.get("Reason"),
            "output": f.get("StdOut"), "error": f.get("StdErr"), "source": "scontrol"}


def job_status(ref: str) -> dict:
    """What the scheduler (or, for local runs, the run folder) says about a job."""
    rec = _resolve(ref)
    if rec["target"] == "slurm":
        return {**rec, **slurm_status(rec["job_id"])}
    if rec["target"] == "k8s":
        kind = rec.get("kind", "PyTorchJob").lower()
        proc = subprocess.run([require_tool("kubectl"), "get", kind, rec["name"], "-o", "json"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SubmitError(f"kubectl get {kind} {rec['name']} failed: {proc.stderr.strip()}")
        conditions = json.loads(proc.stdout).get("status", {}).get("conditions", [])
        state = next((c["type"] for c in reversed(conditions) if c.get("status") == "True"), "Created")
        return {**rec, "state": state, "conditions": conditions}
    layout, stage = RunLayout(Path(rec["workdir"])), rec.get("stage", "pretrain")
    # a command job is done when its stage record (the whole pipeline: its summary) is written
    result = layout.summary() if stage == "run" else layout.stage(stage) / (
        RESULT_FILE if stage in MULTI_NODE_STAGES else STAGE_RECORD)
    if result.is_file():
        return {**rec, "state": "COMPLETED", "result": json.loads(result.read_text())}
    exit_code = rec.get("exit")
    return {**rec, "state": "FAILED" if exit_code not in (None, 0) else "UNKNOWN"}


def job_logs(ref: str) -> str:
    """The job's log text: SLURM's output files, ``kubectl logs`` of the master, or train.log."""
    rec = _resolve(ref)
    if rec["target"] == "slurm":
        paths = [rec.get("output"), rec.get("error")]
        if not paths[0]:
            st = slurm_status(rec["job_id"])
            paths = [st.get("output"), st.get("error")]
        text = ""
        for p in paths:
            if p and Path(p).is_file():
                text += f"==> {p} <==\n{Path(p).read_text(errors='replace')}"
        if not text:
            raise SubmitError(f"no log file yet for SLURM job {rec['job_id']} (looked at {', '.join(filter(None, paths))})")
        return text
    if rec["target"] == "k8s":
        pod = [f"job/{rec['name']}"] if rec.get("kind") == "Job" else [f"{rec['name']}-master-0", "-c", "pytorch"]
        proc = subprocess.run([require_tool("kubectl"), "logs", *pod], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SubmitError(f"kubectl logs failed: {proc.stderr.strip()}")
        return proc.stdout
    stage = rec.get("stage", "pretrain")
    log = RunLayout(Path(rec["workdir"])).stage("pretrain" if stage == "run" else stage) / TRAIN_LOG
    if not log.is_file():
        raise SubmitError(f"no log at {log}")
    return log.read_text(errors="replace")
