"""Which onnxruntime execution providers can really run here, and why not when they cannot.

onnxruntime-gpu lists CUDA and TensorRT as "available" whether or not their libraries load; a
session asked for them prints a red "Failed to load libonnxruntime_providers_cuda" block and
silently runs on CPU. So before a session is created, the provider library's own dependencies
(the DT_NEEDED sonames of the wheel's ``libonnxruntime_providers_<name>.so``, read by the small
ELF reader below) are dlopened with ctypes, the way the dynamic loader will look for them; a
missing one is the reason, named (``libcublasLt.so.13 missing``), with the major that *is*
installed when that is the problem (a version mismatch). A CUDA library stack with no device
behind it is caught by asking the driver for its device count.

`default_providers()` is what a session gets when nobody asked for a provider: the usable GPU
provider first, then CPU, after printing one plain line if the build has a GPU provider this
machine cannot use. `resolve_requested()` is the strict form for the benchmark: a requested
provider that cannot run is a `ProviderError` naming the reason, unless fallback is allowed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)
# The shared library onnxruntime dlopens for each provider, inside onnxruntime/capi/.
PROVIDER_LIBRARY = {CUDA: "libonnxruntime_providers_cuda.so", TENSORRT: "libonnxruntime_providers_tensorrt.so"}
# Part of every Linux system; never the reason a provider cannot load.
_SYSTEM_SONAME = re.compile(r"^(libc|libm|libdl|libpthread|librt|libstdc\+\+|libgcc_s|ld-linux[-\w]*)\.so")
_DT_NEEDED, _SHT_DYNAMIC = 1, 6


class ProviderError(RuntimeError):
    """A requested execution provider that cannot run here; the message says which and why."""


def short_name(provider: str) -> str:
    """CUDAExecutionProvider -> CUDA (for tables and notices)."""
    return {TENSORRT: "TensorRT"}.get(provider, provider.removesuffix("ExecutionProvider"))


def provider_name(entry) -> str:
    """The name of a provider list entry: "CUDAExecutionProvider" or ("CUDAExecutionProvider", {options})."""
    return entry[0] if isinstance(entry, (tuple, list)) else entry


# --------------------------------------------------------------------------- ELF


def elf_needed(path: str | Path) -> list[str]:
    """The DT_NEEDED sonames of an ELF shared library (64- or 32-bit, either byte order), in file order."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF":
        raise ValueError(f"{path}: not an ELF file")
    is64, order = data[4] == 2, "<" if data[5] == 1 else ">"
    if is64:
        shoff, = struct.unpack_from(order + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(order + "HH", data, 0x3A)
        sec_fmt, dyn_fmt = order + "IIQQQQIIQQ", order + "qQ"
    else:
        shoff, = struct.unpack_from(order + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(order + "HH", data, 0x2E)
        sec_fmt, dyn_fmt = order + "IIIIIIIIII", order + "iI"
    sections = [struct.unpack_from(sec_fmt, data, shoff + i * shentsize) for i in range(shnum)]
    needed: list[str] = []
    for sec in sections:
        if sec[1] != _SHT_DYNAMIC:
            continue
        offset, size, link = sec[4], sec[5], sec[6]
        strtab_offset = sections[link][4]
        step = struct.calcsize(dyn_fmt)
        for pos in range(offset, offset + size, step):
            tag, value = struct.unpack_from(dyn_fmt, data, pos)
            if tag == 0:  # DT_NULL ends the table
                break
            if tag == _DT_NEEDED:
                end = data.index(b"\0", strtab_offset + value)
                needed.append(data[strtab_offset + value : end].decode())
    return needed


def soname_major(soname: str) -> int | None:
    """libcublasLt.so.13 -> 13; None when the name carries no version."""
    m = re.search(r"\.so\.(\d+)", soname)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- the wheel


def _ort_capi_dir() -> Path:
    import onnxruntime

    return Path(onnxruntime.__file__).parent / "capi"


def provider_library(provider: str) -> Path | None:
    """The installed onnxruntime's shared library for `provider`, or None (CPU is built in)."""
    name = PROVIDER_LIBRARY.get(provider)
    return _ort_capi_dir() / name if name else None


def onnxruntime_package() -> dict:
    """Which onnxruntime distribution is installed, its version, and the CUDA/cuDNN it was built for.

    The CUDA major comes from the CUDA provider's own DT_NEEDED (``libcudart.so.13``); cuDNN's from
    the wheel's metadata (its ``cudnn`` extra requires ``nvidia-cudnn-cu13~=9.0``), because the
    provider loads cuDNN lazily and does not list it. `pip` lists the wheel's CUDA/cuDNN pip
    packages (its ``cuda`` and ``cudnn`` extras), for a model's pinned requirements.
    """
    from importlib import metadata

    import onnxruntime

    info: dict = {"package": "onnxruntime", "version": onnxruntime.__version__, "cuda_major": None,
                  "cudnn_major": None, "pip": []}
    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        info.update(package=dist, version=version)
        for req in metadata.requires(dist) or []:
            spec, _, marker = req.partition(";")
            if not re.search(r"extra\s*==\s*['\"](cuda|cudnn)['\"]", marker):
                continue
            spec = spec.strip()
            info["pip"].append(spec)
            if m := re.match(r"nvidia-cudnn-cu(\d+)\s*~=\s*(\d+)", spec):
                info["cudnn_major"] = int(m.group(2))
        break
    lib = provider_library(CUDA)
    if lib is not None and lib.is_file():
        majors = [soname_major(s) for s in elf_needed(lib) if s.startswith("libcudart.so")]
        info["cuda_major"] = majors[0] if majors else None
    return info


# --------------------------------------------------------------------------- can it load?


def _loadable(soname: str) -> bool:
    try:
        ctypes.CDLL(soname)
        return True
    except OSError:
        return False


def _installed_instead(soname: str) -> str | None:
    """For a missing libfoo.so.13: the libfoo.so.N the loader would find instead (another major)."""
    stem = re.sub(r"^lib|\.so.*$", "", soname)
    found = ctypes.util.find_library(stem)
    return found if found and found != soname else None


def _cuda_device_problem() -> str | None:
    """Ask the driver (libcuda.so.1) for a device: None when there is one, else why not."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "libcuda.so.1 (the NVIDIA driver) missing"
    status = libcuda.cuInit(0)
    if status != 0:
        return f"the NVIDIA driver failed to initialize (cuInit error {status}: no usable GPU?)"
    count = ctypes.c_int(0)
    status = libcuda.cuDeviceGetCount(ctypes.byref(count))
    if status != 0 or count.value < 1:
        return "no CUDA device visible (cuDeviceGetCount = 0)"
    return None


def needed_libraries(provider: str) -> list[str]:
    """The non-system libraries `provider`'s shared library needs: its DT_NEEDED, plus cuDNN for CUDA
    (dlopened at session creation, so not listed there; its major from the wheel's metadata)."""
    lib = provider_library(provider)
    if lib is None or not lib.is_file():
        return []
    needed = [s for s in elf_needed(lib) if not _SYSTEM_SONAME.match(s)]
    if provider == CUDA and (cudnn := onnxruntime_package()["cudnn_major"]):
        needed.append(f"libcudnn.so.{cudnn}")
    return needed


def missing_libraries(provider: str) -> list[str]:
    """The libraries of `needed_libraries` the dynamic loader cannot find in this process, except the
    driver (libcuda.so.1), which a container gets from the host at run time, not at build time."""
    return [s for s in needed_libraries(provider) if s != "libcuda.so.1" and not _loadable(s)]


@functools.lru_cache(maxsize=None)
def provider_problem(provider: str) -> str | None:
    """Why `provider` cannot run in this process (None: it can); the first missing library is named."""
    import onnxruntime

    if provider == CPU:
        return None
    if provider not in onnxruntime.get_available_providers():
        pkg = onnxruntime_package()
        return f"not in this onnxruntime build ({pkg['package']} {pkg['version']})"
    lib = provider_library(provider)
    if lib is None:  # a provider we have no library table for: let onnxruntime decide
        return None
    if not lib.is_file():
        return f"{lib.name} missing from {lib.parent}"
    for soname in missing_libraries(provider):  # the first one is the reason
        other = _installed_instead(soname)
        if other:
            pkg = onnxruntime_package()
            return (f"{soname} missing, {other} installed instead: version mismatch ({pkg['package']} "
                    f"{pkg['version']} is built for CUDA {pkg['cuda_major']})")
        return f"{soname} missing"
    return _cuda_device_problem()  # the libraries load: is there a driver and a device?


@dataclass(frozen=True)
class ResolvedProvider:
    """What a benchmark asked for, what will run, and why they differ (reason None when they match)."""

    requested: str
    runs: str
    reason: str | None = None

    @property
    def fallback(self) -> bool:
        """True when another provider runs than the one requested."""
        return self.requested != self.runs

    def notice(self) -> str:
        """The bold table line for a fallback, e.g. **FALLBACK: CUDA requested, CPU ran (libcublasLt.so.13 missing)**."""
        return f"**FALLBACK: {short_name(self.requested)} requested, {short_name(self.runs)} ran ({self.reason})**"


def resolve_requested(provider: str, allow_fallback: bool) -> ResolvedProvider:
    """The provider that will run for a request: `provider` itself, or CPU when it cannot load and
    fallback is allowed; otherwise a ProviderError with the reason."""
    problem = provider_problem(provider)
    if problem is None:
        return ResolvedProvider(provider, provider)
    if not allow_fallback:
        raise ProviderError(
            f"{provider} was requested but cannot run here: {problem}. Install what is missing, remove it "
            f"from benchmark.providers, or set benchmark.allow_fallback=true to measure on CPU instead")
    return ResolvedProvider(provider, CPU, problem)


def check_session_providers(resolved: ResolvedProvider, used: list[str], allow_fallback: bool, what: str) -> ResolvedProvider:
    """Compare the provider a session really got with the one resolved before creating it.

    The library check cannot see everything (a driver too old for the runtime, say); onnxruntime
    then drops the provider at session creation and says so only in its log.
    """
    if used and used[0] == resolved.runs:
        return resolved
    ran = used[0] if used else "nothing"
    reason = f"onnxruntime dropped {resolved.runs} at session creation (its log says why); the session has {used}"
    if not allow_fallback:
        raise ProviderError(f"{what}: {resolved.requested} was requested but {ran} ran: {reason}. Set "
                            "benchmark.allow_fallback=true to accept this")
    return ResolvedProvider(resolved.requested, ran, resolved.reason or reason)


_announced: set[str] = set()


def default_providers() -> list[str]:
    """GPU first when it can really run here, then CPU; one plain line (once per process) for a GPU
    provider this onnxruntime build has but this machine cannot use, instead of onnxruntime's red
    error block on every session."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if CUDA in available:
        problem = provider_problem(CUDA)
        if problem is None:
            return [CUDA, CPU]
        if CUDA not in _announced:
            _announced.add(CUDA)
            print(f"onnxruntime: CUDA provider not usable here ({problem}); using {CPU}", file=sys.stderr)
    return [CPU]
