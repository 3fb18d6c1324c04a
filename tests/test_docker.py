"""docker/ checked statically (no Docker engine needed): hadolint on both Dockerfiles, the compose
file against the Compose specification's JSON schema, and the facts the images must keep."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent


def venv_tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not path:
        pytest.fail(f"{name} not found: install the test extras (pip install -e '.[test]')")
    return str(path)


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cuda", "Dockerfile.cpu"])
def test_dockerfile_passes_hadolint(dockerfile):
    proc = subprocess.run([venv_tool("hadolint"), "--no-color", str(DOCKER / dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, f"hadolint {dockerfile}:\n{proc.stdout}{proc.stderr}"


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", (DOCKER / dockerfile).read_text())
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^([A-Za-z]+)\s+(.*)$", text, re.M)
            if not m.group(0).startswith("#")]


def test_cpu_image_is_torch_cpu_wheel_on_deepspeed_cpu_accelerator():
    ins = instructions("Dockerfile.cpu")
    assert ins[0][0] == "FROM" and ins[0][1].startswith("python:3.11")
    run = " ".join(a for k, a in ins if k == "RUN")
    assert "download.pytorch.org/whl/cpu" in run
    assert "ARG TORCH_VERSION=2.13.0" in [f"{k} {a}" for k, a in ins]
    assert any(k == "ENV" and "DS_ACCELERATOR=cpu" in a for k, a in ins)
    assert [a for k, a in ins if k == "USER"][-1] == "1000:1000"  # never root at run time


def test_cuda_image_prebuilds_deepspeed_ops_and_runs_unprivileged():
    ins = instructions("Dockerfile.cuda")
    assert ins[0][0] == "FROM" and ins[0][1].startswith("nvidia/cuda:") and "devel" in ins[0][1]
    run = " ".join(a for k, a in ins if k == "RUN")
    for op in ("DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1"):
        assert op in run
    assert "onnxruntime-gpu==" in run and "ds_report" in run
    assert ("USER", "1000:1000") in ins
    # every pip requirement is pinned
    for spec in re.findall(r'"([A-Za-z0-9_.-]+(?:[=<>!~]=?[^"]*)?)"', run):
        if re.match(r"^[a-z0-9_-]+[=<>]", spec):
            assert "==" in spec, spec


def check_compose_schema(path: Path) -> None:
    proc = subprocess.run([venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_validates_against_the_compose_spec():
    check_compose_schema(DOCKER / "compose.yaml")


_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?|-|\?)(?P<arg>[^}]*))?\}")


class MissingVariable(ValueError):
    """What `docker compose` stops with when a ${VAR:?message} variable is unset or empty."""


def render_compose(text: str, env: dict[str, str]) -> dict:
    """The compose file as `docker compose config` renders it: Compose's interpolation rules for
    $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message} and ${VAR?message}."""
    def substitute(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        value = env.get(name)
        if op == ":?" and not value or op == "?" and value is None:
            raise MissingVariable(f"required variable {name} is missing a value: {arg}")
        if op == ":-" and not value or op == "-" and value is None:
            return arg
        return value or ""

    return yaml.safe_load(_INTERPOLATION.sub(substitute, text))


CREDENTIALS = {"POSTGRES_PASSWORD": "pg-secret", "MINIO_ROOT_USER": "vitpipe", "MINIO_ROOT_PASSWORD": "minio-secret",
               "MLFLOW_ADMIN_USER": "ops", "MLFLOW_ADMIN_PASSWORD": "mlflow-secret", "MLFLOW_SECRET_KEY": "k" * 32}


def test_compose_refuses_to_start_without_each_credential():
    text = (DOCKER / "compose.yaml").read_text()
    assert "minioadmin" not in yaml.safe_dump(yaml.safe_load(text))  # no well-known default (comments aside)
    for name in CREDENTIALS:
        with pytest.raises(MissingVariable, match=f"required variable {name} is missing a value: set {name}"):
            render_compose(text, {k: v for k, v in CREDENTIALS.items() if k != name})
        with pytest.raises(MissingVariable, match=name):
            render_compose(text, {**CREDENTIALS, name: ""})  # empty counts as unset


def test_rendered_compose_is_valid_binds_loopback_and_puts_mlflow_behind_auth(tmp_path):
    text = (DOCKER / "compose.yaml").read_text()
    compose = render_compose(text, CREDENTIALS)
    rendered = tmp_path / "compose.rendered.yaml"
    rendered.write_text(yaml.safe_dump(compose))
    check_compose_schema(rendered)
    services = compose["services"]
    published = {name: svc.get("ports", []) for name, svc in services.items()}
    assert published["mlflow"] == ["127.0.0.1:5000:5000"]
    assert published["minio"] == ["127.0.0.1:9000:9000", "127.0.0.1:9001:9001"]
    assert published["postgres"] == [] and published["create-bucket"] == []
    mlflow = services["mlflow"]
    command = " ".join(mlflow["command"])
    assert "mlflow server --app-name basic-auth" in command and "default_permission = NO_PERMISSIONS" in command
    env = mlflow["environment"]
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == "ops" and env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "mlflow-secret"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == "k" * 32
    assert env["AWS_SECRET_ACCESS_KEY"] == "minio-secret" and services["minio"]["environment"]["MINIO_ROOT_USER"] == "vitpipe"
    assert env["BACKEND_STORE_URI"] == "postgresql://mlflow:pg-secret@postgres:5432/mlflow"
    assert "mlflow-secret" not in command  # secrets reach the server through its environment only
    # Exposing MLflow is a deliberate setting, and it stays behind the login.
    exposed = render_compose(text, {**CREDENTIALS, "VITPIPE_BIND_ADDRESS": "0.0.0.0"})["services"]
    assert exposed["mlflow"]["ports"] == ["0.0.0.0:5000:5000"] and "--app-name basic-auth" in " ".join(
        exposed["mlflow"]["command"])
    assert exposed["minio"]["ports"] == published["minio"]


def test_compose_runs_mlflow_on_postgres_and_minio():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    for name in ("postgres", "minio", "mlflow"):
        assert "healthcheck" in services[name], name
    mlflow = services["mlflow"]
    command = " ".join(mlflow["command"])
    assert "--artifacts-destination s3://" in command and "--backend-store-uri" in command
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["environment"]["BACKEND_STORE_URI"].startswith("postgresql://")
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert {"postgres-data", "minio-data"} <= set(compose["volumes"])


def test_cuda_image_and_the_onnxruntime_gpu_wheel_link_the_same_cuda_major():
    """The wheel's own libraries say which CUDA and cuDNN it needs: the CUDA provider's DT_NEEDED
    (libcudart.so.N, libcublasLt.so.N) and the wheel's cudnn extra; the image's base tag, torch index
    and CUDNN_MAJOR must agree with them (today's bug: a CUDA 12.8 image for a wheel linking .so.13)."""
    from importlib import metadata

    from pipeline.export.providers import CUDA, elf_needed, onnxruntime_package, provider_library, soname_major

    ins = instructions("Dockerfile.cuda")
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    base = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-devel-ubuntu\d+\.\d+$", ins[0][1])
    assert base, f"base image {ins[0][1]!r}: expected nvidia/cuda:<X.Y.Z>-cudnn-devel-ubuntu<version>"
    image_cuda = int(base.group(1))
    try:
        installed = metadata.version("onnxruntime-gpu")
    except metadata.PackageNotFoundError:
        pytest.skip("onnxruntime-gpu is not installed here (not Linux x86_64): no wheel to read")
    # The wheel read below must be the one the image installs.
    assert args["ONNXRUNTIME_GPU_VERSION"] == installed, (args["ONNXRUNTIME_GPU_VERSION"], installed)
    lib = provider_library(CUDA)
    needed = elf_needed(lib)
    majors = {s.split(".so")[0]: soname_major(s) for s in needed if s.startswith(("libcudart.so", "libcublasLt.so"))}
    assert set(majors) == {"libcudart", "libcublasLt"}, needed
    assert set(majors.values()) == {image_cuda}, f"{lib.name} links {majors}; the image is CUDA {image_cuda}"
    assert onnxruntime_package()["cuda_major"] == image_cuda
    torch_cuda = re.search(r"/whl/cu(\d+)$", args["TORCH_INDEX"])
    assert torch_cuda and int(torch_cuda.group(1)[:-1]) == image_cuda, args["TORCH_INDEX"]
    assert int(args["CUDNN_MAJOR"]) == onnxruntime_package()["cudnn_major"]
    run = " ".join(a for k, a in ins if k == "RUN")
    assert "missing_libraries" in run and 'libcudnn.so.${CUDNN_MAJOR}' in run  # the build checks it as well
