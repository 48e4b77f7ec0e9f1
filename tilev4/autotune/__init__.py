"""Per-GPU autotuning and the compiled-kernel cache.

Layer map (each layer uses only the ones above it; none imports :mod:`tilev4.kernels` at import time)::

    paths.py         cache_dir(): $TILEV4_CACHE_DIR, else the platform's user cache directory
    identity.py      GPU identity, driver, toolchain fields and hash, kernel source hash
    space.py         config spaces: tunable keys, canonical order, static pruning, shape buckets
    harness.py       the kernel-side contract of the tuner: make inputs, run, check vs the reference
    select.py        the winner from recorded timings: noise-aware, deterministic
    store.py         tuning results per GPU and kernel (JSON), shipped defaults, lookup + notice
    kernel_cache.py  compiled kernels as shared libraries: keys, manifests, locks, atomic publish,
                     verification on load, ls / clear / prune / export / import
    tuner.py         plan → compile in parallel (CPU) → check and time (GPU) → select → store
    loadtime.py      ``python -m tilev4.autotune.loadtime``: cold-load timing of cached kernels

The registry (:mod:`tilev4.kernels.registry`) sits on top: ``compile_kernel`` resolves tunable
keys through :mod:`.store` and gets the kernel through :mod:`.kernel_cache` (memory → disk →
compile). The CLI (``tilev4 tune | compile | cache … | info``) drives the rest.

Contract of a tunable kernel: ``@register(name, configs=[…], space=Space(...), bucket=fn,
harness=TuningHarness(...))`` where the space's keys are parameters of the factory with
defaults (or the space has a ``heuristic``), the bucket function maps the non-tunable keys to a
label, and the harness makes inputs, checks outputs against :mod:`tilev4.reference` and, for a
``batch_invariant`` kernel, slices a batch. Kernels without a space are compiled and cached the
same way and skipped by the tuner.
"""

from tilev4.autotune.harness import TuningCase, TuningHarness
from tilev4.autotune.identity import (
    CACHE_FORMAT,
    GpuIdentity,
    current_gpu,
    kernel_source_hash,
    toolchain,
    toolchain_hash,
)
from tilev4.autotune.kernel_cache import cache_stats
from tilev4.autotune.paths import cache_dir
from tilev4.autotune.select import Selection, select_winner
from tilev4.autotune.space import Space, exact_bucket
from tilev4.autotune.store import ResultKey, TuningRecord, lookup, results_dir

__all__ = [
    "CACHE_FORMAT",
    "GpuIdentity",
    "ResultKey",
    "Selection",
    "Space",
    "TuningCase",
    "TuningHarness",
    "TuningRecord",
    "cache_dir",
    "cache_stats",
    "current_gpu",
    "exact_bucket",
    "kernel_source_hash",
    "lookup",
    "results_dir",
    "select_winner",
    "toolchain",
    "toolchain_hash",
]
