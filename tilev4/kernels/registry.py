"""The registry of every TileLang kernel in tilev4 and the compile step shared by all of them.

Each kernel module registers its ``build_<op>`` factory with :func:`register`, giving the
compile-time configurations that ship as defaults (the first one is the default; the others
are shapes the model uses, built ahead of time). A factory takes only compile-time keys and
returns a ``T.prim_func``; run-time sizes (batch, tokens) are ``T.dynamic``. A kernel may also
register a tuning ``space`` (:class:`tilev4.autotune.space.Space`), a shape ``bucket`` function
and a tuning ``harness`` (:class:`tilev4.autotune.harness.TuningHarness`).

:func:`compile_kernel` resolves a config (keys the caller leaves out that are tunable come from
the tuned results for the current GPU, else from the heuristic — see :func:`resolve_config`),
then goes memory → disk → compile: an in-process memo, then tilev4's compiled-kernel cache
(:mod:`tilev4.autotune.kernel_cache`, shared by processes and machines), then TileLang lowering
and nvcc for the CUDA arch (``sm_90a`` by default, or the arch of the current GPU).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tilev4.autotune.harness import TuningHarness
    from tilev4.autotune.space import Space

__all__ = [
    "DEFAULT_AOT_ARCH",
    "KernelDef",
    "Resolution",
    "aot_configs",
    "canonical_config",
    "check_arch",
    "clear_kernel_memo",
    "compile_kernel",
    "current_arch",
    "get_kernel_def",
    "iter_registry",
    "load_all_kernels",
    "register",
    "registry_names",
    "resolve_config",
    "resolved_config",
]

DEFAULT_AOT_ARCH = "sm_90a"
"""The arch tilev4's kernels are written for and tested on: Hopper, whose TMA, wgmma and mbarrier transactions most
of them use. Other archs are built on request where TileLang can lower a kernel's program for them (the elementwise
and reduction kernels, e.g. for ``sm_80``), untested; the others fail with a ``ValueError`` saying that they need
this arch (:func:`compile_kernel`)."""
_ARCH_RE = re.compile(r"sm_[1-9][0-9]{1,2}[af]?")


def check_arch(arch: object, name: str = "arch") -> str:
    """``arch`` if it names a CUDA SM arch (``sm_90a``, ``sm_80``, ``sm_100a``), else a ``ValueError`` naming
    ``name`` and the value."""
    if not isinstance(arch, str) or not _ARCH_RE.fullmatch(arch):
        raise ValueError(f"{name} must be a CUDA SM arch such as 'sm_90a' or 'sm_80', got {arch!r}")
    return arch

_REGISTRY: dict[str, KernelDef] = {}


@dataclass(frozen=True)
class KernelDef:
    """One registered kernel: its factory, the configurations built by default, and how to tune it
    (``space``, ``bucket_fn``, ``harness``; all None for a kernel that is not tuned)."""

    name: str
    builder: Callable[..., Any]
    configs: tuple[Mapping[str, Any], ...]
    summary: str = ""
    tags: tuple[str, ...] = field(default=())
    space: Space | None = None
    bucket_fn: Callable[[Mapping[str, Any]], str] | None = None
    harness: TuningHarness | None = None

    @property
    def default_config(self) -> Mapping[str, Any]:
        return self.configs[0]

    @property
    def tunable_keys(self) -> tuple[str, ...]:
        return self.space.keys if self.space is not None else ()

    @property
    def batch_invariant(self) -> bool:
        return "batch_invariant" in self.tags

    @property
    def source_hash(self) -> str:
        """Hash of the source this kernel's programs come from (see ``kernel_source_hash``)."""
        from tilev4.autotune.identity import kernel_source_hash

        return kernel_source_hash(self.builder)

    def problem(self, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The non-tunable keys of ``config`` (default: the default config), completed with the factory's defaults."""
        cfg = dict(self.default_config if config is None else config)
        tunable = set(self.tunable_keys)
        items = canonical_config(self, {k: v for k, v in cfg.items() if k not in tunable}, fill=False)
        return {k: v for k, v in items if k not in tunable}

    def bucket(self, problem: Mapping[str, Any]) -> str:
        """The shape bucket of ``problem`` (its non-tunable keys): problems of a bucket share a tuned config."""
        if self.bucket_fn is not None:
            return str(self.bucket_fn(problem))
        from tilev4.autotune.space import exact_bucket

        return exact_bucket(problem)

    def heuristic(self, problem: Mapping[str, Any]) -> dict[str, Any]:
        """The tunables used when nothing is tuned: the space's heuristic, else the factory's defaults."""
        if self.space is None:
            return {}
        if self.space.heuristic is not None:
            return dict(self.space.heuristic(problem))
        params = inspect.signature(self.builder).parameters
        missing = [k for k in self.space.keys if params[k].default is inspect.Parameter.empty]
        if missing:
            raise ValueError(f"kernel {self.name!r}: tunable keys {missing} need a default or a space heuristic")
        return {k: params[k].default for k in self.space.keys}


def register(
    name: str,
    configs: list[dict[str, Any]],
    tags: tuple[str, ...] = (),
    *,
    space: Space | None = None,
    bucket: Callable[[Mapping[str, Any]], str] | None = None,
    harness: TuningHarness | None = None,
) -> Callable:
    """Class the decorated ``build_<op>`` factory as registry entry ``name``.

    Args:
        configs: shipped configs (the first is the default); usually only problem keys, the
            tunable keys being resolved per GPU at compile time.
        tags: e.g. ``"batch_invariant"`` (tuning then checks sub-batches bit-exactly).
        space: the tuning space (tunable keys must be factory parameters).
        bucket: problem → shape-bucket label (default: every problem its own bucket).
        harness: how the tuner makes inputs, runs the kernel and checks it against the reference.
    """
    if not configs:
        raise ValueError(f"kernel {name!r}: at least one config is needed")

    def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"kernel {name!r} is registered twice")
        if space is not None:
            params = inspect.signature(builder).parameters
            unknown = [k for k in space.keys if k not in params]
            if unknown:
                raise ValueError(f"kernel {name!r}: space keys {unknown} are not parameters of {builder.__name__}")
        summary = (builder.__doc__ or "").strip().splitlines()[0] if builder.__doc__ else ""
        _REGISTRY[name] = KernelDef(name, builder, tuple(dict(c) for c in configs), summary, tags,
                                    space, bucket, harness)
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
        return check_arch(env, "$TILEV4_ARCH")
    try:
        import torch

        if torch.cuda.is_available():
            from tilev4.autotune.identity import arch_for_capability

            return arch_for_capability(*torch.cuda.get_device_capability())
    except Exception:
        pass
    return DEFAULT_AOT_ARCH


@dataclass(frozen=True)
class Resolution:
    """A config made complete for one arch: the canonical items, where the tunables came from, the bucket.

    ``source`` is ``given`` (the caller set every tunable, or the kernel has no space),
    ``tuned`` / ``shipped…`` (tuned results, see :func:`tilev4.autotune.store.lookup`) or
    ``heuristic``.
    """

    items: tuple[tuple[str, Any], ...]
    source: str
    bucket: str | None = None


def resolve_config(
    name: str | KernelDef, config: Mapping[str, Any] | None = None, arch: str | None = None, *,
    gpu: Any = "current",
) -> Resolution:
    """Complete ``config`` for ``arch``: tunable keys the caller left out come from tuning.

    Tuned results apply only on a GPU of that arch (``gpu``: a
    :class:`~tilev4.autotune.identity.GpuIdentity`, ``None`` for none, default the current one);
    a tuned config that the space rejects for this problem is ignored. Without a tuned result on
    a GPU, the heuristic is used and a one-line notice is logged once per kernel.
    """
    kdef = name if isinstance(name, KernelDef) else get_kernel_def(name)
    arch = arch or current_arch()
    cfg = dict(kdef.default_config if config is None else config)
    missing = [k for k in kdef.tunable_keys if k not in cfg]
    if not missing:
        return Resolution(canonical_config(kdef, cfg), "given")
    from tilev4.autotune import store
    from tilev4.autotune.identity import current_gpu

    problem = kdef.problem(cfg)
    bucket = kdef.bucket(problem)
    if gpu == "current":
        gpu = current_gpu()
    if gpu is not None and gpu.arch == arch:
        key = store.current_key(kdef.name, kdef.source_hash, bucket, gpu)
        found = store.lookup(key) if key is not None else None
        if found is not None:
            assert kdef.space is not None
            tuned = {**cfg, **{k: v for k, v in found.config.items() if k in missing}}
            reason = kdef.space.why_invalid(dict(canonical_config(kdef, tuned)))
            if reason is None:
                return Resolution(canonical_config(kdef, tuned), found.source, bucket)
            store.notice_once(f"invalid:{kdef.name}:{bucket}", f"tilev4: tuned config {found.config} of "
                              f"{kdef.name} does not fit {problem} ({reason}); using the heuristic")
        else:
            store.notice_once(f"untuned:{kdef.name}", f"tilev4: {kdef.name} is not tuned for {gpu.name} "
                              f"(bucket {bucket}); using heuristic configs — run `tilev4 tune --kernel {kdef.name}`")
    heur = kdef.heuristic(problem)
    full = {**cfg, **{k: v for k, v in heur.items() if k in missing}}
    return Resolution(canonical_config(kdef, full), "heuristic", bucket)


_MEMO: dict[Any, Any] = {}
_BY_ITEMS: dict[Any, Any] = {}
_RESOLVED: dict[Any, Resolution] = {}
_MEMO_LOCK = threading.Lock()


def clear_kernel_memo() -> None:
    """Forget the kernels compiled or loaded, and the configs resolved, in this process (after tuning,
    or a cache-dir change)."""
    with _MEMO_LOCK:
        _MEMO.clear()
        _BY_ITEMS.clear()
        _RESOLVED.clear()


def _memo_key(name: str, config: Mapping[str, Any] | None, arch: str) -> Any:
    try:
        key = (name, None if config is None else tuple(sorted(config.items())), arch)
        hash(key)
        return key
    except TypeError:
        return None


def resolved_config(name: str, config: Mapping[str, Any] | None = None, arch: str | None = None) -> Resolution:
    """:func:`resolve_config` for the current GPU, memoised per process like :func:`compile_kernel`
    (cleared by :func:`clear_kernel_memo`).

    For run-time code that sizes a launch (splits, workspaces) from the config of the kernel it
    compiles: resolve here, then compile with the resolved tunables given explicitly.
    """
    arch = arch or current_arch()
    mkey = _memo_key(name, config, arch)
    res = _RESOLVED.get(mkey) if mkey is not None else None
    if res is None:
        res = resolve_config(name, config, arch)
        if mkey is not None:
            _RESOLVED[mkey] = res
    return res


def compile_kernel(name: str, config: Mapping[str, Any] | None = None, arch: str | None = None) -> Any:
    """Compile registry kernel ``name`` with ``config`` (default: its default config) for ``arch``.

    Tunable keys left out of ``config`` are resolved per GPU (:func:`resolve_config`). Returns
    TileLang's ``JITKernel``; calling it launches the kernel on the current stream (only possible
    on a machine with that GPU). Memory → disk cache → compile; compiled once per key across
    processes that share the cache directory. A malformed ``arch`` is a ``ValueError``, and so is a build that fails
    for an arch other than :data:`DEFAULT_AOT_ARCH` (most kernels need Hopper's TMA and wgmma).
    """
    arch = current_arch() if arch is None else check_arch(arch)
    mkey = _memo_key(name, config, arch)
    if mkey is not None:
        kernel = _MEMO.get(mkey)
        if kernel is not None:
            return kernel
    kdef = get_kernel_def(name)
    items = resolve_config(kdef, config, arch).items
    kernel = _compile_items(kdef, items, arch)
    if mkey is not None:
        _MEMO[mkey] = kernel
    _record_use(name, config)
    return kernel


def _record_use(name: str, config: Mapping[str, Any] | None) -> None:
    """With ``TILEV4_RECORD_KERNELS=FILE``, append the (kernel, config) a process compiles or loads, one JSON
    line each: ``tilev4 compile --configs FILE`` then builds exactly those ahead of time on another machine."""
    path = os.environ.get("TILEV4_RECORD_KERNELS")
    if not path:
        return
    line = json.dumps({"kernel": name, "config": dict(config or {})}, sort_keys=True, default=repr)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def recorded_jobs(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """The distinct (kernel, config) pairs of a ``TILEV4_RECORD_KERNELS`` file, in first-use order."""
    seen: dict[str, tuple[str, dict[str, Any]]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                name, config = rec["kernel"], rec["config"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a kernel record ({e}): {line.strip()[:80]!r}") from None
            get_kernel_def(name)  # unknown names fail here, with the registered list
            seen.setdefault(json.dumps([name, config], sort_keys=True), (name, dict(config)))
    return list(seen.values())


def _compile_items(kdef: KernelDef, items: tuple[tuple[str, Any], ...], arch: str) -> Any:
    from tilev4.autotune import kernel_cache

    ikey = (kdef.name, items, arch)
    try:
        kernel = _BY_ITEMS.get(ikey)
    except TypeError:  # an unhashable config value: no memo
        ikey, kernel = None, None
    if kernel is not None:
        return kernel
    key = kernel_cache.entry_key(kdef.name, items, arch, kdef.source_hash)
    try:
        kernel = kernel_cache.get(key, lambda: kdef.builder(**dict(items)))
    except Exception as e:
        if arch == DEFAULT_AOT_ARCH:
            raise
        # TileLang's own message ("T.tma_copy() requires TMA-capable target …") says what is missing, not that the
        # kernel is written for Hopper
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        raise ValueError(f"kernel {kdef.name!r} could not be built for arch {arch!r}: tilev4's kernels are written "
                         f"for {DEFAULT_AOT_ARCH} (Hopper: TMA, wgmma) and only some of them lower for other archs "
                         f"({type(e).__name__}: {first[:200]})") from e
    if ikey is not None:
        with _MEMO_LOCK:
            kernel = _BY_ITEMS.setdefault(ikey, kernel)
    return kernel


def aot_configs(kdef: KernelDef, arch: str, default_only: bool = False) -> list[tuple[dict[str, Any], str]]:
    """The complete configs ahead-of-time compilation builds for ``kdef`` on ``arch``, with their source.

    For each shipped config: its heuristic completion (what an untuned GPU runs) and, for every
    tuned record of a GPU of ``arch`` (this machine's results and the shipped defaults) with this
    source hash and bucket, its tuned completion (what that GPU runs). Duplicates are dropped.
    """
    return aot_configs_for(kdef, kdef.configs[:1] if default_only else kdef.configs, arch, tuned=not default_only)


def aot_configs_for(kdef: KernelDef, configs: Sequence[Mapping[str, Any]], arch: str,
                    tuned: bool = True) -> list[tuple[dict[str, Any], str]]:
    """As :func:`aot_configs` for the given (possibly partial) ``configs`` of ``kdef``: each one's heuristic
    completion and, with ``tuned``, its completion by every tuned record of a GPU of ``arch`` for its bucket."""
    from tilev4.autotune import store

    out: list[tuple[dict[str, Any], str]] = []
    seen: set[str] = set()

    def add(items: tuple[tuple[str, Any], ...], source: str) -> None:
        label = repr(items)
        if label not in seen:
            seen.add(label)
            out.append((dict(items), source))

    records = store.records_for_arch(kdef.name, arch) if tuned and kdef.space is not None else []
    for cfg in configs:
        add(resolve_config(kdef, cfg, arch, gpu=None).items, "default")
        if not records:
            continue
        problem = kdef.problem(cfg)
        bucket = kdef.bucket(problem)
        missing = [k for k in kdef.tunable_keys if k not in cfg]
        for r in records:
            if r.key.bucket != bucket or r.key.source_hash != kdef.source_hash:
                continue
            tuned = dict(canonical_config(kdef, {**cfg, **{k: v for k, v in r.config.items() if k in missing}}))
            if kdef.space is not None and kdef.space.why_invalid(tuned) is None:
                add(tuple(sorted(tuned.items())), f"tuned for {r.key.gpu_name}")
    return out


def canonical_config(
    kdef: KernelDef, config: Mapping[str, Any] | None = None, *, fill: bool = True
) -> tuple[tuple[str, Any], ...]:
    """``config`` (default: the kernel's default) completed with the factory's defaults, sorted.

    Two spellings of one configuration (an argument left out or passed at its default value)
    give the same key, so they compile once. ``fill=False`` leaves tunable keys out instead of
    completing them (used to split off the problem).
    """
    cfg = dict(kdef.default_config if config is None else config)
    params = inspect.signature(kdef.builder).parameters
    unknown = set(cfg) - set(params)
    if unknown:
        raise ValueError(f"kernel {kdef.name!r}: unknown config keys {sorted(unknown)}; known: {sorted(params)}")
    skip = set() if fill else set(kdef.tunable_keys)
    for pname, p in params.items():
        if pname not in cfg and pname not in skip:
            if p.default is inspect.Parameter.empty:
                raise ValueError(f"kernel {kdef.name!r}: config lacks required key {pname!r}")
            cfg[pname] = p.default
    return tuple(sorted(cfg.items()))
