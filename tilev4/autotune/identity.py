"""Who built a kernel and who timed it: GPU identity, driver, toolchain, kernel source hash.

Two keys are made from these facts:

* the **toolchain** of a compiled kernel (:func:`toolchain`): what must match for a shared
  library built elsewhere to be loaded here — the cache format, TileLang's version, the TVM-FFI
  version (the library calls its C ABI), the nvcc release that built the cubin, the execution
  backend and the host platform. Python and torch are not in it: TileLang's ``tvm_ffi`` library
  links only against libc and the TVM-FFI C functions (checked with ``readelf``/``nm``), so a
  library built under Python 3.11 loads under 3.12.
* the **tuning** key (:class:`tilev4.autotune.store.ResultKey`): the GPU model (name, compute
  capability, SM count, memory), driver, CUDA runtime, nvcc, TileLang, the kernel's source hash
  and the shape bucket — any change means the timings no longer describe this machine.

Nothing here needs a GPU; the GPU facts are ``None`` without one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "CACHE_FORMAT",
    "GpuIdentity",
    "arch_for_capability",
    "current_gpu",
    "driver_version",
    "kernel_source_hash",
    "nvcc_version",
    "stable_hash",
    "toolchain",
    "toolchain_hash",
]

CACHE_FORMAT = 1
"""Bumped whenever the layout or the meaning of a cache entry changes: old entries then miss."""

# modules whose edits do not change what a kernel factory builds (the cache layers version themselves)
_SOURCE_HASH_EXCLUDE = ("tilev4.kernels.registry", "tilev4.autotune", "tilev4.bench", "tilev4.cli")


def stable_hash(obj: Any, n: int = 16) -> str:
    """First ``n`` hex digits of the sha256 of ``obj`` as sorted, compact JSON (``repr`` for the rest)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def arch_for_capability(major: int, minor: int) -> str:
    """The arch tilev4 builds for a compute capability: ``sm_90a`` for 9.0 (wgmma, TMA), else ``sm_XY``."""
    return f"sm_{major}{minor}" + ("a" if major in (9, 10) else "")


@dataclass(frozen=True)
class GpuIdentity:
    """The GPU model as far as tuning is concerned (a MIG slice differs in SMs and memory)."""

    name: str
    compute_capability: str
    sm_count: int
    memory_mib: int

    @property
    def arch(self) -> str:
        major, minor = (int(p) for p in self.compute_capability.split("."))
        return arch_for_capability(major, minor)

    @property
    def slug(self) -> str:
        """A file-name-safe label holding every field, e.g. ``nvidia-h200-cc9.0-132sm-143771mib``."""
        name = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "gpu"
        return f"{name}-cc{self.compute_capability}-{self.sm_count}sm-{self.memory_mib}mib"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def current_gpu() -> GpuIdentity | None:
    """The identity of the current CUDA device, or ``None`` when no GPU is visible."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return _gpu_identity(torch.cuda.current_device())
    except Exception:
        return None


@functools.cache
def _gpu_identity(index: int) -> GpuIdentity:
    import torch

    p = torch.cuda.get_device_properties(index)
    return GpuIdentity(p.name, f"{p.major}.{p.minor}", int(p.multi_processor_count), int(p.total_memory // 2**20))


@functools.cache
def driver_version() -> str:
    """The NVIDIA driver version (``580.159.03``), read without a subprocess where possible."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", f.read())
            if m:
                return m.group(1)
    except OSError:
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown"


def _nvcc_path() -> str | None:
    cuda_home = None
    try:
        import tilelang.env

        cuda_home = tilelang.env.CUDA_HOME or None  # the toolkit TileLang compiles with
    except Exception:
        pass
    for cand in ([os.path.join(cuda_home, "bin", "nvcc")] if cuda_home else []) + [shutil.which("nvcc") or ""]:
        if cand and os.path.exists(cand):
            return cand
    return None


@functools.cache
def nvcc_version() -> tuple[str, str] | None:
    """``(release, full version)`` of the nvcc TileLang uses, e.g. ``("13.0", "13.0.88")``; None if absent."""
    path = _nvcc_path()
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return (m.group(1), m.group(2)) if m else None


def _nvcc_release() -> str:
    env = os.environ.get("TILEV4_NVCC_RELEASE")
    if env:
        return env
    v = nvcc_version()
    return v[0] if v else "none"


@functools.cache
def _versions() -> tuple[str, str]:
    import tilelang
    import tvm_ffi

    return str(tilelang.__version__), str(tvm_ffi.__version__)


def toolchain(nvcc_release: str | None = None) -> dict[str, Any]:
    """What must match for a compiled kernel to be reused (see the module docstring).

    ``nvcc`` is the release (``13.0``): patch releases fix bugs without changing the PTX ISA or
    the driver a cubin needs. Without a local nvcc, ``$TILEV4_NVCC_RELEASE`` names the release
    the imported cache was built with; else the field is ``none`` and the cache layer looks for
    entries of a single matching toolchain (see :mod:`tilev4.autotune.kernel_cache`).
    """
    tl, ffi = _versions()
    return {
        "format": CACHE_FORMAT,
        "tilelang": tl,
        "tvm_ffi": ffi,
        "nvcc": nvcc_release or _nvcc_release(),
        "backend": "tvm_ffi",
        "platform": f"{sys.platform}-{platform.machine()}",
    }


def toolchain_hash(fields: Mapping[str, Any] | None = None) -> str:
    """16 hex digits naming a toolchain directory in the kernel cache."""
    return stable_hash(dict(fields if fields is not None else toolchain()))


def _module_deps(mod: types.ModuleType) -> list[str]:
    """Names of the tilev4 modules whose objects ``mod`` holds at module level."""
    deps = []
    for value in list(vars(mod).values()):
        if isinstance(value, types.ModuleType):
            name = value.__name__
        else:
            name = getattr(value, "__module__", None)
            if not isinstance(name, str):
                continue
        if name.startswith("tilev4") and not name.startswith(_SOURCE_HASH_EXCLUDE) and name != mod.__name__:
            deps.append(name)
    return sorted(set(deps))


@functools.cache
def _source_hash_of_module(module_name: str) -> str:
    h = hashlib.sha256()
    seen: set[str] = set()
    todo = [module_name]
    while todo:
        name = todo.pop()
        if name in seen or name not in sys.modules:
            continue
        seen.add(name)
        mod = sys.modules[name]
        todo += _module_deps(mod)
    for name in sorted(seen):
        path = getattr(sys.modules[name], "__file__", None)
        h.update(name.encode() + b"\0")
        if path and os.path.exists(path):
            with open(path, "rb") as f:
                h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()[:16]


def kernel_source_hash(builder: Callable[..., Any]) -> str:
    """Hash of the source files a factory's program comes from.

    The factory's module and, transitively, every tilev4 module whose functions, classes or
    module objects it holds (``tilev4.dsl`` helpers, say) — by module name and file content, so
    the hash is the same on every machine with the same checkout. The registry and the cache
    layers are excluded: they do not change what a factory builds.
    """
    return _source_hash_of_module(builder.__module__)
