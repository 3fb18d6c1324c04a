"""Start N local processes of a program with torchrun (one per GPU, or gloo ranks on CPU).

Knows how to start and stop processes, not what they run: the caller names the module and its
arguments (the stage layer passes the training worker and its job file)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.launch.lifetime import die_with_parent


class LaunchError(RuntimeError):
    """A training job whose processes did not all finish cleanly."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _torch_build() -> dict[str, str | None]:
    """torch.version's `cuda` and `hip` (None: not built for it), read from its file without
    importing torch (1-2 s, in launchers that train nothing); {} when that file cannot be read."""
    import importlib.util
    import re

    try:
        version = (Path(importlib.util.find_spec("torch").origin).parent / "version.py").read_text()
    except (AttributeError, TypeError, OSError):
        return {}
    found = {}
    for name in ("cuda", "hip"):
        m = re.search(rf"^{name}\b[^=]*=\s*(?:'([^']*)'|None)\s*$", version, re.M)
        if m is None:
            return {}
        found[name] = m.group(1)
    return found


def _has_cuda() -> bool:
    """Whether this machine's ranks can have a GPU, answered without importing torch: torch built
    for CUDA or ROCm, such a device present, and CUDA_VISIBLE_DEVICES not hiding them all. It errs
    toward "yes": a rank that then finds no usable GPU picks DeepSpeed's CPU accelerator itself
    (pipeline.train.worker)."""
    build = _torch_build()
    if not build:  # an unusual torch install: ask torch itself
        import torch

        return torch.cuda.is_available()
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1") and not os.environ.get("HIP_VISIBLE_DEVICES"):
        return False
    nvidia = any(Path("/dev").glob("nvidia[0-9]*")) or any(Path("/proc/driver/nvidia/gpus").glob("*"))
    return bool((build["cuda"] and nvidia) or (build["hip"] and Path("/dev/kfd").exists()))


def worker_env(nprocs: int) -> dict[str, str]:
    """Environment for the ranks: DeepSpeed's CPU accelerator without GPUs, a fair thread share."""
    env = dict(os.environ)
    if not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    cores = os.cpu_count() or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // max(nprocs, 1))))
    # Make the package importable in the children even when it is used from a source tree.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


# DeepSpeed JIT-compiles this op on CPU at every rank's first start (torch's cpp_extension), guarded
# by a lock file that a killed build leaves behind; every later rank then waits on it forever.
CPU_JIT_OPS = ("deepspeed_shm_comm",)
# A build takes about a minute (several on a loaded machine); a lock this old belongs to no build.
STALE_LOCK_S = 15 * 60


def use_this_environments_ninja(environ=os.environ) -> None:
    """Put this interpreter's bin folder first on PATH, so torch's JIT builds of CPU_JIT_OPS run the
    ninja installed with DeepSpeed here, whatever PATH the rank was started with.

    The build folder (~/.cache/torch_extensions) is shared by every process on the machine, and a
    ninja of another version (a system ninja-build 1.11 next to the pip ninja 1.13) cannot read the
    other's build log: it discards it and rebuilds the op, about 40 s of two cores, at the next rank
    start whose PATH finds the other ninja (an activated venv, a SLURM job, a shell without it)."""
    bin_dir = str(Path(sys.executable).parent)
    if not (Path(bin_dir) / "ninja").is_file():
        return
    rest = [p for p in environ.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    environ["PATH"] = os.pathsep.join([bin_dir, *rest])


def jit_build_dir(name: str) -> Path:
    """The folder torch JIT-builds op `name` in (under ~/.cache/torch_extensions, shared machine-wide):
    torch.utils.cpp_extension._get_build_directory's naming, without importing torch (and without
    creating the folder); tests/test_launch.py holds it equal to torch's own."""
    build = _torch_build()
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None and build and sys.platform.startswith("linux"):  # torch._appdirs' Linux cache folder
        cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
        accel = (f"rocm{build['hip'].replace('.', '')}" if build["hip"] else
                 f"cu{build['cuda'].replace('.', '')}" if build["cuda"] else "cpu")
        folder = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{accel}"
        root = os.path.join(os.path.realpath(os.path.join(cache, "torch_extensions")), folder)
    if root is None:  # an unusual torch install: ask torch itself
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, False))
    return Path(root) / name


def stale_extension_locks(now: float | None = None) -> list[tuple[Path, float]]:
    """(lock file, age in s) for each CPU JIT op whose build lock is older than any real build."""
    now = time.time() if now is None else now
    stale = []
    for name in CPU_JIT_OPS:
        lock = jit_build_dir(name) / "lock"
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > STALE_LOCK_S:
            stale.append((lock, age))
    return stale


def check_extension_locks(env: dict[str, str]) -> None:
    """Refuse to start CPU ranks that would hang on a stale JIT build lock; name the file and the fix."""
    if env.get("DS_ACCELERATOR") != "cpu":
        return
    stale = stale_extension_locks()
    if stale:
        lock, age = stale[0]
        raise LaunchError(
            f"{lock} is {age / 60:.0f} min old: a killed DeepSpeed op build left it, and every rank would wait "
            f"on it forever. If no compiler (c++/ninja) is running, delete it and rerun "
            f"(the op is rebuilt in about a minute)", 1)


def standalone_torchrun_command(nprocs: int, module_args: list[str], max_restarts: int = 0,
                                shutdown_timeout: int = 120) -> list[str]:
    """torchrun for this machine alone (``--standalone``: rendezvous on a free local port), running
    ``python -m <module_args...>`` as `nprocs` ranks; `shutdown_timeout`: seconds from a forwarded
    signal to SIGKILL (the ranks' time to checkpoint). (`targets.node_torchrun_command` is one node
    of a multi-node job.)"""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc_per_node={nprocs}", f"--max-restarts={max_restarts}",
        f"--shutdown_timeout={shutdown_timeout}", "-m", *module_args,
    ]


def launch_local(module_args: list[str], nprocs: int, log_path: Path, max_restarts: int = 0,
                 shutdown_timeout: int = 120) -> None:
    """Run ``python -m <module_args...>`` as `nprocs` local ranks; output goes to the console and to `log_path`.

    With `max_restarts`, torchrun restarts every rank after one fails; they resume from the newest
    committed checkpoint (a restarted rank cannot rejoin a running ZeRO group on its own).
    """
    cmd = standalone_torchrun_command(nprocs, module_args, max_restarts, shutdown_timeout)
    env = worker_env(nprocs)
    check_extension_locks(env)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        # torchrun dies with this process (and each rank with torchrun: pipeline.train.worker), so a
        # killed vitpipe never leaves ranks training on (pipeline/launch/lifetime.py)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, preexec_fn=die_with_parent)
        # Preemption reaches this process first (Kubernetes signals PID 1, a user presses Ctrl-C):
        # pass it on as SIGTERM, which torchrun forwards to the ranks; they checkpoint and exit.
        forward = lambda signum, frame: proc.send_signal(signal.SIGTERM)  # noqa: E731
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if line.startswith(("[pretrain]", "[finetune]")):  # our progress lines, not library chatter
                    sys.stdout.write(line)
                    sys.stdout.flush()
            code = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if code != 0:
        raise LaunchError(f"training processes failed (exit {code}); full log: {log_path}", code)
