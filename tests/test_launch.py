"""Job submission: what each target renders, missing tools, two torchrun "nodes" on loopback, real SLURM.

The dry-run tests parse what `vitpipe submit --dry-run` prints (argv, sbatch directives, YAML).
The PyTorchJob is validated against a JSON schema derived from the Kubeflow training SDK's
OpenAPI models (kubeflow-training, which mirrors the operator's CRD) and the Kubernetes client's
models: every field name and type must exist there, required fields must be present.
The slow tests train the tiny recipe for real: two torchrun agents that meet at a c10d rendezvous
(compared with the same job as 2 ranks on one node), and a job submitted with sbatch to a
slurmctld + slurmd that the test starts on this machine.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.launch.targets import JobSpec, node_torchrun_command, render

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pipeline" / "tiny.yaml"
STEP_LINE = re.compile(r"\[pretrain\] step (\d+)/\d+ loss ([0-9.]+)")


def dry_run(capsys, *args: str) -> str:
    assert main(["submit", str(TINY), "--dry-run", *args]) == 0
    return capsys.readouterr().out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(argv: list[str]) -> dict[str, str]:
    """``--key=value`` / ``--key value`` options of a launcher command up to the ``-m`` module."""
    out, i = {}, 0
    argv = argv[: argv.index("-m")] if "-m" in argv else argv
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "=" in a:
            k, v = a[2:].split("=", 1)
            out[k] = v
        elif a.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            out[a[2:]] = "" if nxt.startswith("-") or not nxt else nxt
            i += 0 if out[a[2:]] == "" else 1
        i += 1
    return out


# --------------------------------------------------------------------------- the launcher's process


LAUNCHER_PROBE = """
import json, os, sys
from pipeline.launch.local import _has_cuda, jit_build_dir, worker_env
env = worker_env(2)
answers = {"cuda": _has_cuda(), "build_dir": str(jit_build_dir("deepspeed_shm_comm")),
           "ds_accelerator": env.get("DS_ACCELERATOR"), "torch_loaded": "torch" in sys.modules}
import torch
from torch.utils.cpp_extension import _get_build_directory
answers["torch_cuda"] = torch.cuda.is_available()
answers["torch_build_dir"] = _get_build_directory("deepspeed_shm_comm", False)
print(json.dumps(answers))
"""


@pytest.mark.parametrize("extensions_dir", [None, "set"])
def test_the_launcher_answers_what_torch_would_without_importing_it(tmp_path, extensions_dir):
    # The process that starts torchrun trains nothing: it decides the ranks' accelerator and where
    # DeepSpeed's CPU op is built (for the stale-lock check) from torch's files, not by importing
    # torch (1-2 s of every launch). Its answers must be torch's own, here and on a GPU machine.
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR")}
    if extensions_dir:
        env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "ext")
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # torch's default root follows it
    out = subprocess.run([sys.executable, "-c", LAUNCHER_PROBE], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["torch_loaded"] is False
    assert got["cuda"] == got["torch_cuda"]
    assert got["ds_accelerator"] == (None if got["torch_cuda"] else "cpu")
    assert got["build_dir"] == got["torch_build_dir"]
    assert got["build_dir"].startswith(str(tmp_path))


# --------------------------------------------------------------------------- dry runs


def test_local_dry_run_is_the_stage_command_with_nodes_times_gpus_ranks(capsys, tmp_path):
    argv = shlex.split(dry_run(capsys, "pretrain.steps=3", "--nodes", "2", "--gpus-per-node", "3",
                               "--workdir", str(tmp_path)))
    assert argv[1:5] == ["-m", "pipeline", "pretrain", str(TINY)]
    assert "pretrain.steps=3" in argv and "pretrain.ranks=6" in argv
    assert argv[argv.index("--workdir") + 1] == str(tmp_path)


@pytest.mark.parametrize("backend", ["c10d", "static"])
def test_torchrun_dry_run_renders_one_command_per_node(capsys, tmp_path, backend):
    out = dry_run(capsys, "--target", "torchrun", "--nodes", "3", "--gpus-per-node", "4", "--rdzv", "10.1.2.3:29401",
                  "--rdzv-backend", backend, "--max-restarts", "2", "--workdir", str(tmp_path))
    commands = [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]
    assert len(commands) == 3
    for rank, argv in enumerate(commands):
        f = flags(argv)
        assert argv[0] == "torchrun"
        assert (f["nnodes"], f["nproc_per_node"], f["node_rank"], f["max_restarts"]) == ("3", "4", str(rank), "2")
        assert f["rdzv_backend"] == backend
        if backend == "c10d":
            assert f["rdzv_endpoint"] == "10.1.2.3:29401" and f["rdzv_id"] == "vitpipe-tiny"
        else:
            assert (f["master_addr"], f["master_port"]) == ("10.1.2.3", "29401")
        # every node runs the one worker entry on the job file the orchestrator writes
        module = argv[argv.index("-m") + 1:]
        assert module == ["pipeline.train.worker", "--job", str(tmp_path / "pretrain" / "job.json")]
    # --node-rank prints just that node's command
    one = dry_run(capsys, "--target", "torchrun", "--nodes", "3", "--rdzv", "h:1", "--node-rank", "2")
    assert [flags(shlex.split(l))["node_rank"] for l in one.splitlines() if not l.startswith("#")] == ["2"]


def test_torchrun_without_endpoint_or_with_bad_node_rank_is_refused(capsys):
    assert main(["submit", str(TINY), "--target", "torchrun", "--nodes", "2", "--dry-run"]) == 1
    assert "--rdzv host:port" in capsys.readouterr().err
    assert main(["submit", str(TINY), "--target", "torchrun", "--nodes", "2", "--rdzv", "h:1",
                 "--node-rank", "2", "--dry-run"]) == 1
    assert "[0, 2)" in capsys.readouterr().err


def sbatch_directives(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M))


def test_slurm_dry_run_script(capsys, tmp_path):
    script = dry_run(capsys, "pretrain.steps=5", "--target", "slurm", "--nodes", "4", "--gpus-per-node", "8",
                     "--time", "02:00:00", "--partition", "gpu", "--account", "vit", "--workdir", str(tmp_path))
    d = sbatch_directives(script)
    assert d["nodes"] == "4" and d["ntasks-per-node"] == "1" and d["gpus-per-node"] == "8"
    assert d["time"] == "02:00:00" and d["partition"] == "gpu" and d["account"] == "vit"
    assert d["signal"] == "B:USR1@30"  # tiny.yaml's pretrain.preemption_grace_s and "requeue" in d and d["open-mode"] == "append"
    assert d["mem"] == "32G" and d["cpus-per-task"] == "8"
    assert d["output"] == f"{tmp_path}/logs/%x-%j.out" and d["error"] == f"{tmp_path}/logs/%x-%j.err"
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in script
    assert "trap on_preempt USR1" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    # the per-node command inside `srun ... bash -c '<cmd>'`
    srun = next(shlex.split(l) for l in script.splitlines() if l.startswith("srun "))
    assert srun[srun.index("bash") + 1] == "-c"
    assert "--cpus-per-task=8" in srun[:srun.index("bash")]  # srun does not inherit it from sbatch
    inner = shlex.split(srun[srun.index("-c") + 1])
    assert inner[:4] == ["exec", sys.executable, "-m", "torch.distributed.run"]
    f = flags(inner[4:])
    assert f["nnodes"] == "$SLURM_NNODES" and f["node_rank"] == "$SLURM_NODEID" and f["nproc_per_node"] == "8"
    assert f["rdzv_endpoint"] == "$head_node:$rdzv_port" and f["rdzv_id"] == "$SLURM_JOB_ID"
    assert f["shutdown_timeout"] == "30"  # torchrun's window to checkpoint: the same value as SLURM's lead
    assert inner[inner.index("-m", 4) + 1:] == ["pipeline.train.worker", "--job", f"{tmp_path}/pretrain/job.json"]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid shell syntax


def test_slurm_script_without_gpus(capsys):
    script = dry_run(capsys, "--target", "slurm", "--no-gpu", "--cpus-per-task", "2", "--mem-gib", "6")
    d = sbatch_directives(script)
    assert "gpus-per-node" not in d and d["cpus-per-task"] == "2" and d["mem"] == "6G"
    assert "--cpus-per-task=2" in next(l for l in script.splitlines() if l.startswith("srun "))


def test_one_preemption_window_from_the_recipe(capsys):
    """pretrain.preemption_grace_s sets torchrun's shutdown timeout, SLURM's signal lead and the
    pods' grace period, so a checkpoint that takes longer than 30 s is not killed half-written."""
    script = dry_run(capsys, "pretrain.preemption_grace_s=600", "--target", "slurm")
    assert sbatch_directives(script)["signal"] == "B:USR1@600"
    inner = shlex.split(shlex.split(next(l for l in script.splitlines() if l.startswith("srun ")))[-2])
    assert flags(inner[4:])["shutdown_timeout"] == "600"
    job = yaml.safe_load(dry_run(capsys, "pretrain.preemption_grace_s=600", "--target", "k8s", "--nodes", "2"))
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        pod = spec["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == 600
        assert "--shutdown_timeout=600" in pod["containers"][0]["command"]
    torchrun = shlex.split(dry_run(capsys, "pretrain.preemption_grace_s=600", "--target", "torchrun",
                                   "--rdzv", "h:1").splitlines()[1])
    assert flags(torchrun)["shutdown_timeout"] == "600"
    from pipeline.launch.local import standalone_torchrun_command

    local = standalone_torchrun_command(2, ["pipeline.train.worker", "--job", "j.json"], 0, 600)
    assert "--shutdown_timeout=600" in local[:local.index("-m", 3)]
    assert main(["submit", str(TINY), "pretrain.preemption_grace_s=0", "--dry-run"]) == 2
    assert "pretrain.preemption_grace_s: must be >= 1" in capsys.readouterr().err


def test_hostfile_dry_run(capsys, tmp_path):
    out = dry_run(capsys, "--target", "hostfile", "--nodes", "2", "--gpus-per-node", "4", "--hosts", "gpu-a,gpu-b",
                  "--workdir", str(tmp_path))
    lines = out.splitlines()
    assert lines[0] == f"# {tmp_path}/hostfile" and lines[1:3] == ["gpu-a slots=4", "gpu-b slots=4"]
    argv = shlex.split(lines[-1])
    # the DeepSpeed runner's own parser accepts the command and reads what we meant
    from deepspeed.launcher.runner import parse_args

    ds = parse_args(argv[1:])
    assert ds.hostfile == f"{tmp_path}/hostfile" and ds.num_nodes == 2 and ds.num_gpus == 4
    assert ds.master_addr == "gpu-a" and ds.module and ds.no_local_rank
    assert ds.user_script == "pipeline.train.worker" and ds.user_args == ["--job", f"{tmp_path}/pretrain/job.json"]
    # its hostfile parser reads our file
    from deepspeed.launcher.runner import fetch_hostfile

    (tmp_path / "hostfile").write_text("\n".join(lines[1:3]) + "\n")
    assert dict(fetch_hostfile(str(tmp_path / "hostfile"))) == {"gpu-a": 4, "gpu-b": 4}


def test_hostfile_needs_one_host_per_node(capsys):
    assert main(["submit", str(TINY), "--target", "hostfile", "--nodes", "2", "--hosts", "a", "--dry-run"]) == 1
    assert "2 host name(s), got 1" in capsys.readouterr().err


# --------------------------------------------------------------------------- Kubernetes


def _openapi_model(name: str):
    import kubernetes.client.models as k8s
    import kubeflow.training.models as kf

    # The SDK names a few upstream types by their Go package (K8sIoApiAutoscalingV2MetricSpec).
    return getattr(kf, name, None) or getattr(k8s, re.sub(r"^K8sIoApi[A-Z][a-z]+", "", name))


def openapi_schema(type_name: str, defs: dict) -> dict:
    """JSON schema of an OpenAPI-generated model type ('str', 'list[V1Container]', 'dict(str, X)', 'V1Pod')."""
    prim = {"str": {"type": "string"}, "int": {"type": "integer"}, "bool": {"type": "boolean"},
            "float": {"type": "number"}, "object": {}, "datetime": {"type": "string"}, "date": {"type": "string"},
            "Quantity": {"type": ["string", "integer", "number"]}}  # k8s resource.Quantity: int-or-string
    if type_name in prim:
        return prim[type_name]
    if m := re.fullmatch(r"list\[(.+)\]", type_name):
        return {"type": "array", "items": openapi_schema(m.group(1), defs)}
    if m := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        return {"type": "object", "additionalProperties": openapi_schema(m.group(1), defs)}
    if type_name not in defs:
        defs[type_name] = {}  # placeholder against recursion
        cls = _openapi_model(type_name)
        # The generated setters reject None for required fields: "Invalid value for `x`, must not be `None`".
        required = re.findall(r"Invalid value for `(\w+)`, must not be `None`", inspect.getsource(cls))
        defs[type_name] = {
            "type": "object", "additionalProperties": False,
            "properties": {cls.attribute_map[k]: openapi_schema(t, defs) for k, t in cls.openapi_types.items()},
            "required": sorted({cls.attribute_map[k] for k in required if k in cls.attribute_map}),
        }
    return {"$ref": f"#/$defs/{type_name}"}


@pytest.fixture(scope="module")
def pytorchjob_schema() -> dict:
    import kubeflow.training  # noqa: F401  (the test extra: it provides the PyTorchJob models)
    defs: dict = {}
    root = openapi_schema("KubeflowOrgV1PyTorchJob", defs)
    return {**root, "$defs": defs}


def test_k8s_dry_run_is_a_valid_pytorchjob(capsys, pytorchjob_schema, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.mlops:5000")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://minio.mlops:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-print-me")
    out = dry_run(capsys, "--target", "k8s", "--nodes", "3", "--gpus-per-node", "8", "--image", "reg.io/vitpipe:cuda",
                  "--max-restarts", "2", "--workdir", "/workspace/runs/tiny")
    assert "do-not-print-me" not in out
    job = yaml.safe_load(out)
    jsonschema.validate(job, pytorchjob_schema)
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"]["name"] == "vitpipe-tiny" and job["spec"]["nprocPerNode"] == "8"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    for kind, spec in replicas.items():
        (c,) = spec["template"]["spec"]["containers"]
        assert c["name"] == "pytorch" and c["image"] == "reg.io/vitpipe:cuda"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        # rendezvous flags come from the operator's PET_* variables, so none are on the command line
        assert c["command"][:2] == ["torchrun", "--max_restarts=2"] and not any("rdzv" in a for a in c["command"])
        assert c["command"][c["command"].index("-m") + 1:] == ["pipeline.train.worker", "--job",
                                                               "/workspace/runs/tiny/pretrain/job.json"]
        env = {e["name"]: e for e in c["env"]}
        assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.mlops:5000"
        assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio.mlops:9000"
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "vitpipe-s3"
        assert {m["mountPath"] for m in c["volumeMounts"]} == {"/workspace/runs/tiny", "/dev/shm"}
        assert c["resources"]["requests"] == {"cpu": "8", "memory": "32Gi"}
        assert "schedulerName" not in spec["template"]["spec"]
    assert "schedulingPolicy" not in job["spec"]["runPolicy"]
    assert replicas["Master"]["template"]["spec"]["containers"][0]["ports"][0]["name"] == "pytorchjob-port"


def test_k8s_gang_scheduling_is_a_valid_pytorchjob(capsys, pytorchjob_schema):
    job = yaml.safe_load(dry_run(capsys, "--target", "k8s", "--nodes", "4", "--gang-scheduler", "volcano",
                                 "--mem-gib", "200", "--workdir", "/workspace/runs/tiny"))
    jsonschema.validate(job, pytorchjob_schema)
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 4}  # all four replicas or none
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        assert spec["template"]["spec"]["schedulerName"] == "volcano"
        assert spec["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"] == "200Gi"


def test_pytorchjob_schema_rejects_what_the_operator_would(pytorchjob_schema):
    job = yaml.safe_load(render(JobSpec(recipe="r.yaml", workdir="/w", nodes=2), "k8s"))
    jsonschema.validate(job, pytorchjob_schema)
    bad = json.loads(json.dumps(job))
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replica"] = 1  # typo of `replicas`
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        jsonschema.validate(bad, pytorchjob_schema)
    bad = json.loads(json.dumps(job))
    del bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(jsonschema.ValidationError, match="'name' is a required property"):
        jsonschema.validate(bad, pytorchjob_schema)


# --------------------------------------------------------------------------- command jobs


def test_the_whole_pipeline_as_a_slurm_job_is_one_task_running_vitpipe_run(capsys, tmp_path):
    script = dry_run(capsys, "pretrain.steps=5", "--stage", "run", "--target", "slurm", "--gpus-per-node", "4",
                     "--workdir", str(tmp_path))
    d = sbatch_directives(script)
    assert d["nodes"] == "1" and d["gpus-per-node"] == "4" and d["signal"] == "B:USR1@30" and "requeue" in d
    srun = next(shlex.split(l) for l in script.splitlines() if l.startswith("srun "))
    assert "--cpus-per-task=8" in srun and srun[-1] == "&"
    command = srun[srun.index(sys.executable):-1]
    assert command == [sys.executable, "-m", "pipeline", "run", str(TINY), "pretrain.steps=5", "pretrain.ranks=4",
                       "finetune.ranks=4", "--workdir", str(tmp_path)]
    # requeued when SLURM preempts it and when a training stage inside stops after its checkpoint
    assert 'if [ "$preempted" = 1 ] || [ "$status" = 75 ]; then scontrol requeue "$SLURM_JOB_ID"' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@pytest.mark.parametrize("stage, ranks", [("prepare", []), ("finetune", ["finetune.ranks=2"]), ("export", []),
                                          ("benchmark", [])])
def test_every_stage_runs_as_its_own_command_on_one_node(capsys, tmp_path, stage, ranks):
    assert dry_run(capsys, "--stage", stage, "--gpus-per-node", "2", "--workdir", str(tmp_path)) == shlex.join(
        [sys.executable, "-m", "pipeline", stage, str(TINY), *ranks, "--workdir", str(tmp_path)]) + "\n"
    script = dry_run(capsys, "--stage", stage, "--target", "slurm", "--manifest", "s3://b/m.json",
                     "--workdir", str(tmp_path))
    srun = next(shlex.split(l) for l in script.splitlines() if l.startswith("srun "))
    # only the stages that read a manifest are given one
    assert ("--manifest" in srun) is (stage in ("finetune", "export"))


@pytest.fixture(scope="module")
def batch_job_schema() -> dict:
    import kubernetes.client  # noqa: F401  (installed with the test extra's kubeflow-training)
    defs: dict = {}
    root = openapi_schema("V1Job", defs)
    return {**root, "$defs": defs}


def test_a_stage_on_kubernetes_is_a_valid_batch_job(capsys, batch_job_schema):
    out = dry_run(capsys, "--stage", "export", "--target", "k8s", "--no-gpu", "--image", "reg.io/vitpipe:cpu",
                  "--mem-gib", "8", "--workdir", "runs/tiny")
    job = yaml.safe_load(out)
    jsonschema.validate(job, batch_job_schema)
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job" and job["metadata"]["labels"]["vitpipe/stage"] == "export"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] == 30
    (c,) = pod["containers"]
    assert c["command"] == ["python", "-m", "pipeline", "export", str(TINY), "--workdir", "/workspace/runs/tiny"]
    assert c["resources"]["requests"] == {"cpu": "8", "memory": "8Gi"} and c["resources"]["limits"] == {}
    assert {"name": "DS_ACCELERATOR", "value": "cpu"} in c["env"]
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/workspace/runs/tiny", "/dev/shm"}
    bad = json.loads(json.dumps(job))
    bad["spec"]["template"]["spec"]["containers"][0]["comand"] = ["typo"]
    with pytest.raises(jsonschema.ValidationError, match="comand"):
        jsonschema.validate(bad, batch_job_schema)


@pytest.mark.parametrize("args, message", [
    (["--stage", "export", "--target", "torchrun", "--rdzv", "h:1"],
     "--stage export with --target torchrun: torchrun starts the ranks of a multi-node pre-training"),
    (["--stage", "finetune", "--target", "hostfile", "--hosts", "a"], "run --stage finetune with --target local, slurm or k8s"),
    (["--stage", "run", "--target", "slurm", "--nodes", "2"],
     "--stage run runs on one node (1 rank(s) there for its training); only pretrain spans nodes"),
], ids=["export-on-torchrun", "finetune-on-hostfile", "run-on-two-nodes"])
def test_a_command_job_where_it_cannot_run_is_refused_by_name(capsys, args, message):
    assert main(["submit", str(TINY), "--dry-run", *args]) == 1
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- missing tools


@pytest.mark.parametrize("target, tool, hint", [
    ("slurm", "sbatch", "apt-get install slurm-client"),
    ("k8s", "kubectl", "install kubectl"),
    ("hostfile", "deepspeed", "pip install deepspeed"),
])
def test_missing_tool_fails_with_install_hint(tmp_path, target, tool, hint):
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin")}  # none of the tools, the interpreter by full path
    cmd = [sys.executable, "-m", "pipeline", "submit", str(TINY), "--target", target, "--workdir", str(tmp_path),
           *(["--hosts", "localhost"] if target == "hostfile" else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"{tool} not found" in proc.stderr and hint in proc.stderr and "--dry-run" in proc.stderr


def test_each_stage_submits_under_its_own_name(capsys, tmp_path):
    """A recipe's finetune, export and benchmark jobs are all batch Jobs: under one name the second
    collides with the first in the namespace. Pre-training keeps the recipe's name."""
    names = {}
    for stage in ("pretrain", "finetune", "export", "benchmark", "run"):
        extra = ["--nodes", "2"] if stage == "pretrain" else []
        job = yaml.safe_load(dry_run(capsys, "--target", "k8s", "--stage", stage, *extra, "--workdir", str(tmp_path)))
        names[stage] = job["metadata"]["name"]
    assert names == {"pretrain": "vitpipe-tiny", "finetune": "vitpipe-tiny-finetune", "export": "vitpipe-tiny-export",
                     "benchmark": "vitpipe-tiny-benchmark", "run": "vitpipe-tiny-run"}
    job = yaml.safe_load(dry_run(capsys, "--target", "k8s", "--stage", "export", "--name", "mine",
                                 "--workdir", str(tmp_path)))
    assert job["metadata"]["name"] == "mine"


def test_a_job_submitted_twice_is_refused_with_its_name_and_the_ways_out(tmp_path):
    """kubectl apply of a finished Job with the same spec answers "unchanged" and runs nothing;
    submit creates, and a name already taken is named with the two ways out. The kubectl here is a
    stand-in that keeps the names it created (a test of the failure, not of a cluster)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(f"""#!{sys.executable}
import sys, pathlib, yaml
assert sys.argv[1:] == ["create", "-f", "-"], sys.argv
obj = yaml.safe_load(sys.stdin)
kind, name = obj["kind"], obj["metadata"]["name"]
seen = pathlib.Path({str(tmp_path / "created")!r})
known = seen.read_text().split() if seen.exists() else []
if f"{{kind}}/{{name}}" in known:
    sys.exit(f'Error from server (AlreadyExists): error when creating "STDIN": jobs.batch "{{name}}" already exists')
seen.write_text(" ".join(known + [f"{{kind}}/{{name}}"]))
print(f"job.batch/{{name}} created")
""")
    kubectl.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "pipeline", "submit", str(TINY), "--target", "k8s", "--stage", "export",
           "--workdir", str(tmp_path / "w")]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert first.returncode == 0 and first.stdout.strip() == "vitpipe-tiny-export", first.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert "a Job named 'vitpipe-tiny-export' already exists: delete it (kubectl delete job vitpipe-tiny-export) " \
           "or submit under another name (--name)" in again.stderr, again.stderr


def test_ranks_build_with_the_ninja_installed_beside_their_interpreter():
    from pipeline.launch.local import use_this_environments_ninja

    bin_dir = str(Path(sys.executable).parent)
    assert (Path(bin_dir) / "ninja").is_file()  # pip's ninja, a DeepSpeed dependency
    env = {"PATH": os.pathsep.join(["/usr/local/bin", bin_dir, "/usr/bin"])}
    use_this_environments_ninja(env)
    assert env["PATH"].split(os.pathsep) == [bin_dir, "/usr/local/bin", "/usr/bin"]  # the rest keeps its order
    assert shutil.which("ninja", path=env["PATH"]) == str(Path(bin_dir) / "ninja")


# --------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A workdir with the tiny recipe's shards and manifest at <workdir>/prepare (the layout the entry reads)."""
    from stages import prepare

    work = tmp_path_factory.mktemp("launch")
    prepare.run(load_config(TINY).data, work / "prepare")
    return work


def step_losses(text: str) -> dict[int, str]:
    return {int(s): loss for s, loss in STEP_LINE.findall(text)}


@pytest.mark.slow
def test_two_torchrun_nodes_on_loopback_match_two_local_ranks(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # the submitted run's

    # reference: the pretrain stage of conftest's tiny `vitpipe run`, 2 ranks on one node
    overrides = list(tiny_run["args"][1:])
    cfg = load_config(TINY, overrides)
    ref = json.loads((tiny_run["work"] / "pretrain" / "result.json").read_text())
    ref_losses = step_losses((tiny_run["work"] / "pretrain" / "train.log").read_text())
    assert sorted(ref_losses) == [2, 4, 6] and ref["world_size"] == 2

    # two "nodes": one torchrun agent each, one rank each, meeting at a c10d rendezvous on loopback
    work = tmp_path / "multi"
    work.mkdir()
    (work / "prepare").symlink_to(tiny_run["work"] / "prepare")
    spec = JobSpec(recipe=str(TINY), overrides=overrides, workdir=str(work), nodes=2, gpus_per_node=1,
                   rdzv_endpoint=f"127.0.0.1:{free_port()}", name="two-nodes")
    from stages.submit import write_submitted_job

    write_submitted_job(cfg, spec, "torchrun")  # what `vitpipe submit` does before it starts the nodes
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(node_torchrun_command(spec, r), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, cwd=tmp_path) for r in (0, 1)]
    outs = []
    for a in agents:
        try:
            outs.append(a.communicate(timeout=240)[0])
        finally:
            a.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outs)
    result = json.loads((work / "pretrain" / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_batch"] == ref["global_batch"]
    assert step_losses("".join(outs)) == ref_losses
    assert result["train_loss"] == ref["train_loss"]  # bit for bit, not just to the printed 4 decimals
    assert json.loads((work / "pretrain" / "job.json").read_text())["out_dir"] == str(work / "pretrain")


# --------------------------------------------------------------------------- real SLURM


def _slurm_binary(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}",) if os.access(p, os.X_OK)), None)


def _wait_for(predicate, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in logs if p.is_file())
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


@pytest.fixture
def slurm_cluster(tmp_path):
    """munged, slurmctld and slurmd as root with a private slurm.conf; yields the env for the client tools."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM daemons are started as root; run the tests as root")
    if not all(_slurm_binary(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        proc = subprocess.run(["bash", str(ROOT / "tests" / "slurm" / "setup.sh")], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"slurm-wlm/munge could not be installed by tests/slurm/setup.sh: {proc.stderr.strip()[-500:]}")
    d = tmp_path / "slurm"
    for sub in ("state", "spool", "munge"):
        (d / sub).mkdir(parents=True)
    os.chmod(d / "munge", 0o700)
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    sock = d / "munge" / "munge.socket"
    node = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(f"""\
ClusterName=vitpipe-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs = []
    logs = [d / "munged.log", d / "slurmctld.log", d / "slurmd.log"]
    try:
        subprocess.run([_slurm_binary("munged"), "--force", f"--socket={sock}", f"--key-file={key}",
                        f"--pid-file={d / 'munge' / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
                        f"--seed-file={d / 'munge' / 'munged.seed'}"], check=True, capture_output=True)
        procs.append(subprocess.Popen([_slurm_binary("slurmctld"), "-D", "-i", "-f", str(conf)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        _wait_for(lambda: subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True)
                  .stdout.count("UP") > 0, 30, "slurmctld", logs)
        procs.append(subprocess.Popen([_slurm_binary("slurmd"), "-D", "-f", str(conf)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        _wait_for(lambda: subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
                  .stdout.strip() in ("idle", "mixed", "allocated"), 60, "slurmd to register", logs)
        yield {"env": env, "logs": logs, "dir": d}
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        pid_file = d / "munge" / "munged.pid"
        if pid_file.is_file():
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_slurm_submit_status_and_logs(slurm_cluster, tmp_path, monkeypatch, capsys):
    for k, v in slurm_cluster["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    work = tmp_path / "run"
    # prepared as a user would, with its stage record: the pipeline job below finds it done
    assert main(["prepare", str(TINY), "--workdir", str(work)]) == 0
    capsys.readouterr()
    args = ["submit", str(TINY), "pretrain.steps=3", "pretrain.log_every=1", "pretrain.checkpoint_every=0",
            "--target", "slurm", "--nodes", "1", "--gpus-per-node", "2", "--no-gpu", "--cpus-per-task", "2",
            "--mem-gib", "1",  # the test node declares RealMemory=1024 (MB); the script asks for --mem=1G
            "--time", "00:10:00", "--workdir", str(work), "--name", "vitpipe-slurm-test"]
    assert main(args) == 0
    job_id = capsys.readouterr().out.strip()
    assert job_id.isdigit()

    def state() -> str:
        assert main(["status", str(work)]) == 0
        return json.loads(capsys.readouterr().out)["state"]

    _wait_for(lambda: state() in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), 240,
              f"SLURM job {job_id}", slurm_cluster["logs"] + [work / "logs" / f"vitpipe-slurm-test-{job_id}.out",
                                                              work / "logs" / f"vitpipe-slurm-test-{job_id}.err"])
    assert main(["status", job_id]) == 0
    status = json.loads(capsys.readouterr().out)
    assert main(["logs", str(work)]) == 0
    logs = capsys.readouterr().out
    assert status["state"] == "COMPLETED", logs[-4000:]
    assert status["exit_code"] == "0:0" and status["source"] in ("scontrol", "sacct")
    assert f"vitpipe: job {job_id}" in logs and "rendezvous " in logs
    assert sorted(step_losses(logs)) == [1, 2, 3]
    result = json.loads((work / "pretrain" / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 3
    weights = work / "pretrain" / "model.safetensors"
    trained_at = weights.stat().st_mtime_ns
    submitted = json.loads((work / "pretrain" / "submitted.json").read_text())  # its MLflow run, RUNNING until recorded

    # The rest of the pipeline as a second job, on the same run folder: it takes the finished
    # pre-training as done and writes every stage record and MLflow run as a local run would.
    rest = ["export.variants=[fp32]", "benchmark.batch_sizes=[1]", "benchmark.concurrency=[1]"]
    assert main(["submit", str(TINY), *args[2:5], *rest, "--stage", "run", *args[5:]]) == 0
    run_id = capsys.readouterr().out.strip()
    _wait_for(lambda: state() in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), 300,
              f"SLURM job {run_id}", slurm_cluster["logs"] + [work / "logs" / f"vitpipe-slurm-test-{run_id}.out",
                                                              work / "logs" / f"vitpipe-slurm-test-{run_id}.err"])
    assert main(["logs", str(work)]) == 0
    logs = capsys.readouterr().out
    assert main(["status", run_id]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "COMPLETED", logs[-4000:]
    assert "the submitted job finished: recorded, not trained again" in logs
    assert weights.stat().st_mtime_ns == trained_at  # adopted, not trained again
    for stage in ("prepare", "pretrain", "finetune", "export", "benchmark"):
        assert json.loads((work / stage / "stage.json").read_text())["stage"] == stage
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vitpipe").experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.info.run_name == "tiny"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert parent.info.status == "FINISHED"
    assert {k: r.info.status for k, r in children.items()} == {
        s: "FINISHED" for s in ("prepare", "pretrain", "finetune", "export", "benchmark")}
    # the pipeline's pretrain run points to the submitted job's run, which the adoption ended FINISHED
    assert children["pretrain"].data.tags["vitpipe.continued_in"] == submitted["mlflow_run_id"]
    assert client.get_run(submitted["mlflow_run_id"]).info.status == "FINISHED"
    # and here, a later `vitpipe run` of the same settings finds every stage done
    assert main(["run", str(TINY), *args[2:5], *rest, "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    assert all(f"[{stage}] up to date" in out for stage in ("prepare", "pretrain", "finetune", "export", "benchmark"))
