"""The registry of every TileLang kernel in tilev4 and the compile step shared by all of them.

Each kernel module registers its ``build_<op>`` factory with :func:`register`, giving the
compile-time configurations that ship as defaults (the first one is the default; the others
are shapes the model uses, built ahead of time). A factory takes only compile-time keys and
returns a ``T.prim_func``; run-time sizes (batch, tokens) are ``T.dynamic``.

:func:`compile_kernel` lowers a factory's program for a CUDA arch (``sm_90a`` by default, or
the arch of the current GPU) and memoises the result in-process; TileLang's own disk cache
keeps the shared library between processes.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_AOT_ARCH",
    "KernelDef",
    "canonical_config",
    "compile_kernel",
    "current_arch",
    "get_kernel_def",
    "iter_registry",
    "load_all_kernels",
    "register",
    "registry_names",
]

DEFAULT_AOT_ARCH = "sm_90a"

_REGISTRY: dict[str, KernelDef] = {}


@dataclass(frozen=True)
class KernelDef:
    """One registered kernel: its factory and the configurations built by default."""

    name: str
    builder: Callable[..., Any]
    configs: tuple[Mapping[str, Any], ...]
    summary: str = ""
    tags: tuple[str, ...] = field(default=())

    @property
    def default_config(self) -> Mapping[str, Any]:
        return self.configs[0]


def register(name: str, configs: list[dict[str, Any]], tags: tuple[str, ...] = ()) -> Callable:
    """Class the decorated ``build_<op>`` factory as registry entry ``name``."""
    if not configs:
        raise ValueError(f"kernel {name!r}: at least one config is needed")

    def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"kernel {name!r} is registered twice")
        summary = (builder.__doc__ or "").strip().splitlines()[0] if builder.__doc__ else ""
        _REGISTRY[name] = KernelDef(name, builder, tuple(dict(c) for c in configs), summary, tags)
        return builder

    return wrap


def load_all_kernels() -> None:
    """Import every kernel module so that the registry is complete."""
    import tilev4.kernels  # noqa: F401  (the package imports its kernel modules)


def iter_registry() -> Iterator[KernelDef]:
    load_all_kernels()
    yield from (_REGISTRY[k] for k in sorted(_REGISTRY))


def registry_names() -> list[str]:
    load_all_kernels()
    return sorted(_REGISTRY)


def get_kernel_def(name: str) -> KernelDef:
    load_all_kernels()
    if name not in _REGISTRY:
        raise ValueError(f"unknown kernel {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def current_arch() -> str:
    """The CUDA arch to build for: ``$TILEV4_ARCH``, else the current GPU's, else ``sm_90a``.

    Hopper (compute capability 9.0) gets ``sm_90a`` so that wgmma and TMA are available.
    """
    env = os.environ.get("TILEV4_ARCH")
    if env:
        return env
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"sm_{major}{minor}" + ("a" if major in (9, 10) else "")
    except Exception:
        pass
    return DEFAULT_AOT_ARCH


def _target(arch: str) -> dict[str, str]:
    if not arch.startswith("sm_"):
        raise ValueError(f"arch must look like 'sm_90a', got {arch!r}")
    return {"kind": "cuda", "arch": arch}


@functools.cache
def _compile_cached(name: str, config_items: tuple[tuple[str, Any], ...], arch: str) -> Any:
    import tilelang

    kdef = get_kernel_def(name)
    program = kdef.builder(**dict(config_items))
    return tilelang.compile(program, target=_target(arch))


def compile_kernel(name: str, config: Mapping[str, Any] | None = None, arch: str | None = None) -> Any:
    """Compile registry kernel ``name`` with ``config`` (default: its default config) for ``arch``.

    Returns TileLang's ``JITKernel``; calling it launches the kernel on the current stream
    (only possible on a machine with that GPU). Compiled once per process per key.
    """
    kdef = get_kernel_def(name)
    return _compile_cached(name, canonical_config(kdef, config), arch or current_arch())


def canonical_config(kdef: KernelDef, config: Mapping[str, Any] | None = None) -> tuple[tuple[str, Any], ...]:
    """``config`` (default: the kernel's default) completed with the factory's defaults, sorted.

    Two spellings of one configuration (an argument left out or passed at its default value)
    give the same key, so they compile once.
    """
    cfg = dict(kdef.default_config if config is None else config)
    params = inspect.signature(kdef.builder).parameters
    unknown = set(cfg) - set(params)
    if unknown:
        raise ValueError(f"kernel {kdef.name!r}: unknown config keys {sorted(unknown)}; known: {sorted(params)}")
    for pname, p in params.items():
        if pname not in cfg:
            if p.default is inspect.Parameter.empty:
                raise ValueError(f"kernel {kdef.name!r}: config lacks required key {pname!r}")
            cfg[pname] = p.default
    return tuple(sorted(cfg.items()))
