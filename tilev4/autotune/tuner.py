"""The tuner: candidates compiled in parallel on the CPU, timed on the GPU, checked, a stable winner.

For each kernel with a ``space`` and a ``harness``, and each shape bucket:

1. **plan** (:func:`plan_kernel`, CPU): the bucket's problems and run-time sizes, the candidates
   in canonical order (heuristic first), those pruned statically and why;
2. **compile** (:func:`compile_jobs`, CPU): every (candidate × problem) and each problem's
   heuristic config, in ``jobs`` spawned processes, each publishing into the kernel cache; the
   parent then loads them from the cache;
3. **measure** (:func:`measure_bucket`, GPU): for every (problem, size) ``num_inputs`` random
   input sets (rotated between launches so no launch reads the previous one's inputs from L2);
   each candidate is checked first — outputs poisoned, compared with the reference, and for a
   batch-invariant kernel sub-batches compared bit-exactly with the full batch — and rejected if
   wrong; then timed with CUDA events in ``rounds`` rounds, the candidates in a seeded shuffled
   order each round so clock drift does not favour one; a sample is one launch's time (ms),
   averaged over ``inner`` back-to-back launches when a launch is short;
4. **select** (:func:`finalize_bucket`): a candidate's samples are summed over the bucket's
   (problem, size) pairs and :func:`tilev4.autotune.select.select_winner` picks the winner; every
   timing is kept in the :class:`~tilev4.autotune.store.TuningRecord`, stored per GPU.

Only step 3 needs a GPU; :func:`measure_bucket` takes the timer and the device, so its logic is
exercised on the CPU with a wall-clock timer and torch stand-ins.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tilev4.autotune.select import REL_NOISE_FLOOR, select_winner
from tilev4.autotune.space import Space, config_label, smem_limit_bytes
from tilev4.autotune.store import ResultKey, TuningRecord, now_iso

__all__ = [
    "DEFAULT_LABEL",
    "BucketPlan",
    "CompileOutcome",
    "CudaTimer",
    "Measurement",
    "NotTunable",
    "WallTimer",
    "compile_jobs",
    "finalize_bucket",
    "measure_bucket",
    "parse_shapes",
    "plan_kernel",
    "tune",
]

DEFAULT_LABEL = "__default__"
"""The pseudo-candidate 'each problem with its own heuristic config', timed when it is not candidate 0."""


class NotTunable(ValueError):
    """The kernel has no tuning space or no harness."""


# ---------------------------------------------------------------------------------------------
# planning (CPU)


@dataclass
class BucketPlan:
    """What the tuner does for one bucket of one kernel."""

    kernel: str
    bucket: str
    arch: str
    problems: list[dict[str, Any]]
    sizes: list[list[int]]
    candidates: list[dict[str, Any]]
    pruned: list[tuple[dict[str, Any], str]]
    defaults: list[dict[str, Any]]

    @property
    def labels(self) -> list[str]:
        return [config_label(c) for c in self.candidates]

    @property
    def default_is_candidate0(self) -> bool:
        return bool(self.candidates) and all(d == self.candidates[0] for d in self.defaults)

    def jobs(self) -> list[tuple[str, dict[str, Any]]]:
        """(kernel, complete config) to compile: candidates × problems, then each problem's default."""
        out, seen = [], set()
        for problem, default in zip(self.problems, self.defaults):
            for tun in [*self.candidates, default]:
                cfg = {**problem, **tun}
                label = config_label(cfg)
                if label not in seen:
                    seen.add(label)
                    out.append((self.kernel, cfg))
        return out


def parse_shapes(specs: Sequence[str]) -> list[dict[str, Any]]:
    """``["D=4096,N=16384", "D=7168"]`` → ``[{"D": 4096, "N": 16384}, {"D": 7168}]`` (ints, floats, or strings)."""
    out = []
    for spec in specs:
        shape: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if "=" not in part:
                raise ValueError(f"shape {spec!r}: expected KEY=VALUE pairs separated by commas, got {part!r}")
            k, v = (s.strip() for s in part.split("=", 1))
            for conv in (int, float):
                try:
                    shape[k] = conv(v)
                    break
                except ValueError:
                    continue
            else:
                shape[k] = {"true": True, "false": False}.get(v.lower(), v)
        out.append(shape)
    return out


def plan_kernel(
    name: str,
    shapes: Sequence[Mapping[str, Any]] | None = None,
    *,
    arch: str | None = None,
    space: Space | None = None,
    smem_limit: int | None = None,
) -> list[BucketPlan]:
    """The buckets to tune for kernel ``name``.

    Args:
        shapes: problems to tune (non-tunable config keys, optionally the harness's run-time
            size, e.g. ``{"D": 4096, "N": 64}``); default: the registry's configs at the
            harness's sizes.
        arch: the arch to compile for (default: the current GPU's, else ``sm_90a``).
        space: a replacement space (a smaller one for a quick run).
        smem_limit: shared-memory limit per block (default: the arch's).
    """
    from tilev4.kernels.registry import current_arch, get_kernel_def

    kdef = get_kernel_def(name)
    space = space or kdef.space
    if space is None:
        raise NotTunable(f"kernel {name!r} has no tuning space")
    if kdef.harness is None:
        raise NotTunable(f"kernel {name!r} has no tuning harness")
    if kdef.batch_invariant and kdef.harness.batch_slice is None:
        raise NotTunable(f"kernel {name!r} is batch-invariant: its harness needs batch_slice to check candidates")
    arch = arch or current_arch()
    smem_limit = smem_limit if smem_limit is not None else smem_limit_bytes(arch)
    size_name = kdef.harness.size_name
    default_sizes = list(kdef.harness.sizes)
    wanted: list[tuple[dict[str, Any], list[int]]] = []
    for shape in shapes if shapes is not None else [dict(c) for c in kdef.configs]:
        shape = dict(shape)
        n = shape.pop(size_name, None)
        problem = kdef.problem({k: v for k, v in shape.items() if k not in space.keys})
        wanted.append((problem, [int(n)] if n is not None else default_sizes))
    buckets: dict[str, BucketPlan] = {}
    for problem, sizes in wanted:
        b = kdef.bucket(problem)
        plan = buckets.get(b)
        if plan is None:
            plan = buckets[b] = BucketPlan(name, b, arch, [], [], [], [], [])
        if problem in plan.problems:
            i = plan.problems.index(problem)
            plan.sizes[i] = sorted(set(plan.sizes[i]) | set(sizes))
        else:
            plan.problems.append(problem)
            plan.sizes.append(sorted(set(sizes)))
    heuristic_of = kdef.heuristic if space is kdef.space else _space_heuristic(kdef, space)
    for plan in buckets.values():
        plan.defaults = [heuristic_of(p) for p in plan.problems]
        plan.candidates, plan.pruned = space.candidates(plan.problems, plan.defaults[0], smem_limit)
    return list(buckets.values())


def _space_heuristic(kdef: Any, space: Space) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    def heuristic(problem: Mapping[str, Any]) -> dict[str, Any]:
        base = kdef.heuristic(problem)
        if space.heuristic is not None:
            base.update(space.heuristic(problem))
        return {k: base[k] for k in space.keys if k in base}

    return heuristic


# ---------------------------------------------------------------------------------------------
# compiling (CPU, parallel)


@dataclass
class CompileOutcome:
    """How one (kernel, config) compile went: ``status`` is ``compiled``, ``cached`` or ``error``."""

    kernel: str
    config: dict[str, Any]
    arch: str
    status: str
    seconds: float
    error: str = ""


#: seconds one (kernel, config) may take to build before its compiler processes are killed; some candidates
#: make nvcc's front end run for tens of minutes (e.g. a fragment layout that TileLang replicates per thread)
COMPILE_TIMEOUT_S = float(os.environ.get("TILEV4_COMPILE_TIMEOUT", "240"))
#: the same for a tuning candidate (``tilev4 tune``): a candidate that takes minutes to build is dropped rather
#: than holding up the whole tune — on the H200's 16 cores a cold tune of the registry compiled at full load for
#: ~350 s and then waited on one build alone for minutes (benchmarks/logs/h200-2026-11-29-session3.md)
TUNE_COMPILE_TIMEOUT_S = float(os.environ.get("TILEV4_COMPILE_TIMEOUT", "120"))
SLOW_COMPILE_S = 60.0  # a build slower than this is named in the tuning log
FAILED_SUFFIX = ".failed.json"  # beside a cache entry: its tuning build failed (see compile_jobs)
_COMPILER_PROCESSES = frozenset({"nvcc", "cicc", "ptxas", "cudafe++", "fatbinary", "nvlink", "cc1plus", "gcc", "g++",
                                 "cc", "c++", "ld", "sh"})


def _compiler_descendants(pid: int) -> list[int]:
    """PIDs of the compiler processes below ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for e in entries:
        try:
            with open(f"/proc/{e}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(e))
        names[int(e)] = name
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        if names.get(p) in _COMPILER_PROCESSES:
            out.append(p)
    return out


class _CompileWatchdog:
    """Kills this process's compiler children once a build has run ``timeout`` seconds, so that a
    pathological candidate fails with an error instead of stalling a tuning run."""

    def __init__(self, timeout: float) -> None:
        import threading

        self.fired = False
        self._timer = threading.Timer(timeout, self._fire) if timeout > 0 else None
        if self._timer is not None:
            self._timer.daemon = True

    def _fire(self) -> None:
        import signal

        self.fired = True
        for p in _compiler_descendants(os.getpid()):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass

    def __enter__(self) -> _CompileWatchdog:
        if self._timer is not None:
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _compile_worker(name: str, config: dict[str, Any], arch: str,
                    timeout: float = COMPILE_TIMEOUT_S) -> tuple[str, float, str]:
    from tilev4.autotune.kernel_cache import cache_stats
    from tilev4.kernels.registry import compile_kernel

    t0 = time.perf_counter()
    before = cache_stats()["compiles"]
    with _CompileWatchdog(timeout) as dog:
        try:
            compile_kernel(name, config, arch)
        except Exception as e:
            if dog.fired:
                return "error", time.perf_counter() - t0, f"compile timeout: killed after {timeout:.0f} s"
            return "error", time.perf_counter() - t0, f"{type(e).__name__}: {e}".splitlines()[0][:300]
    status = "compiled" if cache_stats()["compiles"] > before else "cached"
    return status, time.perf_counter() - t0, ""


def _entry_key(name: str, config: Mapping[str, Any], arch: str) -> Any:
    """The cache key of (kernel, config) for ``arch`` under this toolchain, or None for a bad config."""
    from tilev4.autotune import kernel_cache
    from tilev4.kernels.registry import get_kernel_def, resolve_config

    try:
        kdef = get_kernel_def(name)
        return kernel_cache.entry_key(name, resolve_config(kdef, config, arch).items, arch, kdef.source_hash)
    except Exception:  # a bad config: the worker reports it
        return None


def _is_built(name: str, config: Mapping[str, Any], arch: str) -> bool:
    """Whether the cache holds a verified build of (kernel, config) for ``arch`` under this toolchain."""
    return _built(_entry_key(name, config, arch))


def _built(key: Any) -> bool:
    from tilev4.autotune import kernel_cache

    return key is not None and kernel_cache.verify_entry(key.path(), key) is None


def failure_marker(key: Any) -> Path:
    """Where a failed tuning build of an entry is remembered: ``<entry>.failed.json`` beside the entry."""
    path = key.path()
    return path.with_name(path.name + FAILED_SUFFIX)


def _known_failure(key: Any, timeout: float) -> str | None:
    """The error of an earlier failed build of this entry (same toolchain and source), unless it was a timeout
    shorter than ``timeout`` (then the build gets the longer chance)."""
    if key is None:
        return None
    try:
        rec = json.loads(failure_marker(key).read_text())
    except (OSError, ValueError):
        return None
    if rec.get("timeout") and (timeout <= 0 or timeout > float(rec.get("timeout_s", 0))):
        return None
    return str(rec.get("error", "failed"))


def _remember_failure(key: Any, oc: CompileOutcome, timeout: float) -> None:
    if key is None:
        return
    marker = failure_marker(key)
    with contextlib.suppress(OSError):
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(marker.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"kernel": oc.kernel, "config": oc.config, "arch": oc.arch, "error": oc.error,
                                   "timeout": oc.error.startswith("compile timeout"), "timeout_s": timeout,
                                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, default=str))
        os.replace(tmp, marker)


def compile_jobs(
    jobs: Sequence[tuple[str, Mapping[str, Any]]],
    arch: str,
    workers: int = 2,
    on_done: Callable[[CompileOutcome], None] | None = None,
    timeout: float = COMPILE_TIMEOUT_S,
    remember_failures: bool = False,
) -> list[CompileOutcome]:
    """Compile (kernel, complete config) pairs into the kernel cache with ``workers`` spawned processes.

    Spawned, not forked: the parent may hold a CUDA context. ``workers <= 1`` compiles in this
    process. Errors are returned, not raised; a build still running after ``timeout`` seconds
    (``TILEV4_COMPILE_TIMEOUT``, 0 = none) has its compiler processes killed and is an error.
    ``remember_failures`` (tuning): a failed build leaves a marker beside its cache entry and is not tried
    again by a later call under the same toolchain and source (a timeout is, if the new limit is longer);
    ``tilev4 cache clear`` removes the markers.
    """
    outcomes: list[CompileOutcome] = []

    def done(name: str, cfg: Mapping[str, Any], res: tuple[str, float, str], key: Any = None) -> None:
        """Record an outcome; ``key`` (a build that ran) updates the entry's failure marker."""
        oc = CompileOutcome(name, dict(cfg), arch, *res)
        outcomes.append(oc)
        if key is not None:
            if oc.status == "error":
                if remember_failures:
                    _remember_failure(key, oc, timeout)
            else:
                with contextlib.suppress(OSError):  # built now (a retry, say): an old failure no longer holds
                    failure_marker(key).unlink(missing_ok=True)
        if on_done is not None:
            on_done(oc)

    missing = []
    for name, cfg in jobs:  # verified cache entries need no worker (nor a process start, nor a compiler)
        key = _entry_key(name, cfg, arch)
        if _built(key):
            done(name, cfg, ("cached", 0.0, ""))
        elif remember_failures and (err := _known_failure(key, timeout)) is not None:
            done(name, cfg, ("error", 0.0, f"failed before: {err}"))
        else:
            missing.append((name, cfg, key))

    if not missing:
        return outcomes
    if workers <= 1 or len(missing) <= 1:
        for name, cfg, key in missing:
            done(name, cfg, _compile_worker(name, dict(cfg), arch, timeout), key)
        return outcomes
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=min(workers, len(missing)), mp_context=mp.get_context("spawn")) as pool:
        futs = {pool.submit(_compile_worker, name, dict(cfg), arch, timeout): (name, cfg, key)
                for name, cfg, key in missing}
        for fut in as_completed(futs):
            name, cfg, key = futs[fut]
            try:
                res = fut.result()
            except Exception as e:  # a worker that died (out of memory, a crash in the compiler)
                res = ("error", 0.0, f"{type(e).__name__}: {e}".splitlines()[0][:300])
            done(name, cfg, res, key)
    return outcomes


# ---------------------------------------------------------------------------------------------
# measuring (GPU; the logic runs on the CPU with WallTimer)


class CudaTimer:
    """Times ``inner`` back-to-back launches with a pair of CUDA events; ms per launch."""

    def __init__(self) -> None:
        import torch

        self._torch = torch

    def sync(self) -> None:
        self._torch.cuda.synchronize()

    def time(self, launch: Callable[[int], None], inner: int) -> float:
        torch = self._torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for j in range(inner):
            launch(j)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner


class WallTimer:
    """``time.perf_counter`` stand-in for :class:`CudaTimer` (CPU tests of the tuner's logic)."""

    def sync(self) -> None:
        pass

    def time(self, launch: Callable[[int], None], inner: int) -> float:
        t0 = time.perf_counter()
        for j in range(inner):
            launch(j)
        return (time.perf_counter() - t0) * 1e3 / inner


@dataclass
class Measurement:
    """Per label: summed samples (ms), status (``ok`` / ``wrong_output`` / ``not_batch_invariant`` /
    ``error`` / ``not_compiled``) and why."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    detail: dict[str, str] = field(default_factory=dict)
    per_shape_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


def _poison(t: Any) -> None:
    t.view(-1).view(_uint8()).fill_(255)


def _uint8() -> Any:
    import torch

    return torch.uint8


def _bits_equal(a: Any, b: Any) -> bool:
    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        return False
    return bool((a.contiguous().view(-1).view(_uint8()) == b.contiguous().view(-1).view(_uint8())).all())


def _slices(n: int) -> list[tuple[int, int]]:
    out = []
    for a, b in ((0, 1), (n - 1, n), (0, min(n, 17)), (n // 2, min(n, n // 2 + 5))):
        if 0 <= a < b <= n and (a, b) != (0, n) and (a, b) not in out:
            out.append((a, b))
    return out


def _check_candidate(kernel: Callable[..., Any], case: Any, harness: Any, batch_invariant: bool,
                     sync: Callable[[], None]) -> tuple[str, str]:
    for t in case.output_tensors():
        _poison(t)
    case.restore()  # a streaming state back to where the expected outputs start from
    kernel(*case.args)
    sync()
    why = harness.check(case.output_tensors(), case.expected)
    if why:
        return "wrong_output", why
    if batch_invariant and harness.batch_slice is not None:
        full = [t.clone() for t in case.output_tensors()]
        for a, b in _slices(case.rows):
            sub = harness.batch_slice(case, a, b)
            for t in sub.output_tensors():
                _poison(t)
            sub.restore()
            kernel(*sub.args)
            sync()
            for got, ref in zip(sub.output_tensors(), full):
                if not _bits_equal(got, ref[a:b]):
                    return "not_batch_invariant", f"rows [{a}, {b}) differ from the same rows of a batch of {case.rows}"
    return "ok", ""


def measure_bucket(
    plan: BucketPlan,
    kernels: Mapping[tuple[int, str], Callable[..., Any]],
    harness: Any,
    *,
    batch_invariant: bool = False,
    device: str = "cuda",
    timer: Any = None,
    rounds: int = 5,
    reps: int = 10,
    warmup: int = 3,
    num_inputs: int = 3,
    target_sample_ms: float = 0.2,
    max_inner: int = 64,
    seed: int = 0,
) -> Measurement:
    """Check and time every candidate of ``plan`` (see the module docstring).

    Args:
        kernels: ``(problem index, label) -> callable``; labels are :attr:`BucketPlan.labels`
            and :data:`DEFAULT_LABEL` (each problem's heuristic). A missing callable means
            the config did not compile (status ``not_compiled``).
        harness: the kernel's :class:`~tilev4.autotune.harness.TuningHarness`.
        timer: :class:`CudaTimer` (default) or :class:`WallTimer`.
        rounds, reps: samples per (candidate, problem, size) = ``rounds × reps``.
    """
    import torch

    timer = timer or CudaTimer()
    t_start = time.perf_counter()
    labels = plan.labels + ([] if plan.default_is_candidate0 else [DEFAULT_LABEL])
    m = Measurement()
    for label in labels:
        m.status[label] = "ok"
    n_samples = rounds * reps
    sums = {label: [0.0] * n_samples for label in labels}
    rng = random.Random(seed)
    for pi, (problem, sizes) in enumerate(zip(plan.problems, plan.sizes)):
        for n in sizes:
            base_seed = seed * 1_000_003 + pi * 10_007 + n * 31
            gens = [torch.Generator().manual_seed(base_seed + j) for j in range(num_inputs)]
            cases = [harness.make_case(problem, n, gens[j], device, j == 0) for j in range(num_inputs)]
            live = []
            for label in labels:
                if m.status[label] != "ok":
                    continue
                k = kernels.get((pi, label))
                if k is None:
                    m.status[label], m.detail[label] = "not_compiled", f"no kernel for problem {problem}"
                    continue
                try:
                    status, why = _check_candidate(k, cases[0], harness, batch_invariant, timer.sync)
                except Exception as e:
                    status, why = "error", f"{type(e).__name__}: {e}".splitlines()[0][:300]
                if status != "ok":
                    m.status[label], m.detail[label] = status, f"{problem} N={n}: {why}"
                    continue
                live.append(label)
            per_launch: dict[str, float] = {}
            for label in live:  # warm up and size the inner loop
                k = kernels[(pi, label)]

                def launch(j: int, k: Callable[..., Any] = k, cases: list[Any] = cases) -> None:
                    k(*cases[j % len(cases)].args)

                for _ in range(warmup):
                    timer.time(launch, 1)
                est = sorted(timer.time(launch, 1) for _ in range(3))[1]
                per_launch[label] = max(1, min(max_inner, math.ceil(target_sample_ms / max(est, 1e-6))))
            samples: dict[str, list[float]] = {label: [] for label in live}
            for _ in range(rounds):
                order = list(live)
                rng.shuffle(order)
                for label in order:
                    k = kernels[(pi, label)]
                    offset = len(samples[label])

                    def launch(j: int, k: Callable[..., Any] = k, offset: int = offset,
                               cases: list[Any] = cases) -> None:
                        k(*cases[(offset + j) % len(cases)].args)

                    for _ in range(reps):
                        samples[label].append(timer.time(launch, per_launch[label]))
            shape_name = ",".join([*(f"{k}={v}" for k, v in problem.items()), f"{harness.size_name}={n}"])
            for label in live:
                s = sorted(samples[label])
                m.per_shape_ms.setdefault(label, {})[shape_name] = s[len(s) // 2]
                sums[label] = [a + b for a, b in zip(sums[label], samples[label])]
    for label in labels:
        if m.status[label] == "ok":
            m.samples[label] = sums[label]
    m.seconds = time.perf_counter() - t_start
    return m


# ---------------------------------------------------------------------------------------------
# selecting and recording


def finalize_bucket(
    plan: BucketPlan, m: Measurement, key: ResultKey, meta: Mapping[str, Any] | None = None,
    rel_floor: float = REL_NOISE_FLOOR,
) -> TuningRecord:
    """The record of a measured bucket: the winner (see :mod:`tilev4.autotune.select`) and every timing.

    Raises:
        ValueError: no candidate passed its checks.
    """
    timings = {label: m.samples[label] for label in plan.labels if label in m.samples}
    if not timings:
        raise ValueError(f"{plan.kernel} bucket {plan.bucket}: no candidate passed its checks "
                         f"({ {k: v for k, v in m.status.items() if v != 'ok'} })")
    sel = select_winner(timings, plan.labels, rel_floor)
    by_label = dict(zip(plan.labels, plan.candidates))
    summaries = sel.summaries
    default_label = plan.labels[0] if plan.default_is_candidate0 else DEFAULT_LABEL
    default_ms = None
    if default_label in summaries:
        default_ms = summaries[default_label].median
    elif default_label in m.samples:
        from tilev4.autotune.select import summarize

        default_ms = summarize(m.samples[default_label]).median
    winner_ms = summaries[sel.winner].median
    candidates = []
    for label, cand in [*by_label.items(), *([(DEFAULT_LABEL, None)] if DEFAULT_LABEL in m.status else [])]:
        row: dict[str, Any] = {"config": cand if cand is not None else "heuristic per problem",
                               "status": m.status.get(label, "not_measured")}
        if label in m.detail:
            row["detail"] = m.detail[label]
        if label in m.samples:
            from tilev4.autotune.select import summarize

            s = summarize(m.samples[label])
            row.update(median_ms=s.median, iqr_ms=s.iqr, samples_ms=[round(x, 6) for x in m.samples[label]],
                       per_shape_median_ms=m.per_shape_ms.get(label, {}))
        candidates.append(row)
    return TuningRecord(
        key=key,
        config=dict(by_label[sel.winner]),
        default=dict(plan.defaults[0]),
        problems=[dict(p) for p in plan.problems],
        sizes=sorted({n for s in plan.sizes for n in s}),
        candidates=candidates,
        pruned=[{"config": c, "reason": r} for c, r in plan.pruned],
        tied=[by_label[t] for t in sel.tied],
        winner_median_ms=winner_ms,
        default_median_ms=default_ms,
        speedup_vs_default=(default_ms / winner_ms) if default_ms and winner_ms else None,
        created=now_iso(),
        meta={"rel_noise_floor": rel_floor, "arch": plan.arch, "shape_sizes": plan.sizes, **(meta or {})},
    )


# ---------------------------------------------------------------------------------------------
# the whole run (GPU)


def tune(
    names: Sequence[str] | None = None,
    shapes: Sequence[Mapping[str, Any]] | None = None,
    *,
    workers: int = 2,
    rounds: int = 5,
    reps: int = 10,
    num_inputs: int = 3,
    space: Space | None = None,
    store: bool = True,
    progress: Any = None,
    log: Callable[[str], None] = print,
    compile_only: bool = False,
    arch: str | None = None,
    remember_failures: bool = True,
) -> dict[str, Any]:
    """Tune kernels on the current GPU and store the results; returns the JSON-ready report.

    ``compile_only`` stops after building every candidate into the kernel cache and needs no GPU (``arch``:
    the target, default the visible GPU's, else ``sm_90a``): build on a CPU machine, move the cache with
    ``tilev4 cache export`` / ``import``, and the tune on the GPU then only measures.

    Args:
        names: registry kernels (default: every kernel with a space and a harness).
        shapes: problems for every named kernel (see :func:`plan_kernel`).
        workers: compile processes.
        space: a replacement space (only with exactly one kernel).
        store: write the records to this machine's results (``cache_dir()/tuning``).
        progress: a ``rich.progress.Progress`` to report on, or None.
        remember_failures: skip candidates whose build failed in an earlier run under this toolchain (a
            ``--compile-only`` run, say); False builds them again (``tilev4 tune --retry-failed``).

    Raises:
        RuntimeError: no CUDA GPU is visible.
    """
    import torch

    from tilev4.autotune import store as results
    from tilev4.autotune.identity import current_gpu, driver_version, toolchain
    from tilev4.kernels.registry import (
        DEFAULT_AOT_ARCH,
        check_arch,
        clear_kernel_memo,
        compile_kernel,
        get_kernel_def,
        iter_registry,
    )

    if arch is not None:
        check_arch(arch)
    if not torch.cuda.is_available() and not compile_only:
        raise RuntimeError("tuning needs a CUDA GPU; none is visible (build the candidates ahead of time with "
                           "`tilev4 tune --compile-only`)")
    gpu = current_gpu() if torch.cuda.is_available() else None
    if not compile_only:
        assert gpu is not None
        if arch is not None and arch != gpu.arch:
            raise ValueError(f"arch={arch!r}: measuring runs on this GPU, which is {gpu.arch}")
    arch = arch or (gpu.arch if gpu is not None else DEFAULT_AOT_ARCH)
    t0 = time.perf_counter()
    if names is None:
        names = [k.name for k in iter_registry() if k.space is not None and k.harness is not None]
    if space is not None and len(names) != 1:
        raise ValueError("a replacement space needs exactly one kernel")
    report: dict[str, Any] = {
        "gpu": gpu.as_dict() if gpu is not None else None, "arch": arch, "driver": driver_version(),
        "cuda": torch.version.cuda,
        "toolchain": toolchain(), "torch": torch.__version__, "date": now_iso(),
        "kernels": {}, "skipped": {}, "records": [],
    }
    plans: list[BucketPlan] = []
    for name in names:
        try:
            plans += plan_kernel(name, shapes, arch=arch, space=space)
        except NotTunable as e:
            report["skipped"][name] = str(e)
            log(f"skip {name}: {e}")
    jobs = [j for p in plans for j in p.jobs()]
    jobs = list({config_label({"__k": n, **c}): (n, c) for n, c in jobs}.values())
    task = progress.add_task("compile", total=len(jobs)) if progress is not None else None
    log(f"compiling {len(jobs)} configs of {len(plans)} buckets with {workers} processes")
    t_compile = time.perf_counter()

    def compiled(oc: CompileOutcome) -> None:
        if progress is not None:
            progress.advance(task)
        if oc.status == "error" or oc.seconds > SLOW_COMPILE_S:  # named in the log: a stall is attributable
            log(f"  {oc.status} in {oc.seconds:.0f} s: {oc.kernel} {oc.config} {oc.error}".rstrip())

    outcomes = compile_jobs(jobs, arch, workers, on_done=compiled, timeout=TUNE_COMPILE_TIMEOUT_S,
                            remember_failures=remember_failures)
    compile_s = time.perf_counter() - t_compile
    failed = {config_label({"__k": o.kernel, **o.config}): o.error for o in outcomes if o.status == "error"}
    if compile_only:
        report["seconds"] = {"compile": round(compile_s, 1), "measure": 0.0,
                             "total": round(time.perf_counter() - t0, 1)}
        report["compile"] = _compile_summary(jobs, outcomes, failed)
        return report
    task = progress.add_task("measure", total=len(plans)) if progress is not None else None
    t_measure = time.perf_counter()
    for plan in plans:
        kdef = get_kernel_def(plan.kernel)
        kernels: dict[tuple[int, str], Any] = {}
        for pi, problem in enumerate(plan.problems):
            for label, tun in [*zip(plan.labels, plan.candidates), (DEFAULT_LABEL, plan.defaults[pi])]:
                cfg = {**problem, **tun}
                if config_label({"__k": plan.kernel, **cfg}) in failed:
                    continue
                try:
                    kernels[(pi, label)] = compile_kernel(plan.kernel, cfg, arch)
                except Exception as e:  # pragma: no cover - compiled above, so a load error
                    log(f"{plan.kernel} {cfg}: {type(e).__name__}: {e}")
        m = measure_bucket(plan, kernels, kdef.harness, batch_invariant=kdef.batch_invariant,
                           rounds=rounds, reps=reps, num_inputs=num_inputs)
        for label, why in m.detail.items():
            log(f"  {plan.kernel} [{plan.bucket}] rejected {label}: {m.status[label]}: {why}")
        key = results.current_key(plan.kernel, kdef.source_hash, plan.bucket, gpu)
        assert key is not None
        try:
            record = finalize_bucket(plan, m, key, meta={"rounds": rounds, "reps": reps, "num_inputs": num_inputs,
                                                         "measure_seconds": round(m.seconds, 2)})
        except ValueError as e:
            report["skipped"][f"{plan.kernel}[{plan.bucket}]"] = str(e)
            log(str(e))
            continue
        if store:
            results.save_record(record)
        report["records"].append(record.to_dict())
        report["kernels"].setdefault(plan.kernel, []).append({
            "bucket": plan.bucket,
            "problems": plan.problems,
            "winner": record.config,
            "default": record.default,
            "winner_ms": record.winner_median_ms,
            "default_ms": record.default_median_ms,
            "speedup_vs_default": record.speedup_vs_default,
            "candidates": len(plan.candidates),
            "pruned": len(plan.pruned),
            "rejected": sum(1 for s in m.status.values() if s != "ok"),
            "tied": record.tied,
        })
        log(f"{plan.kernel} [{plan.bucket}]: {record.config} {record.winner_median_ms:.4f} ms vs default "
            f"{record.default_median_ms or float('nan'):.4f} ms (x{record.speedup_vs_default or float('nan'):.3f})")
        if progress is not None:
            progress.advance(task)
        torch.cuda.empty_cache()
    clear_kernel_memo()
    report["seconds"] = {"compile": round(compile_s, 1), "measure": round(time.perf_counter() - t_measure, 1),
                         "total": round(time.perf_counter() - t0, 1)}
    report["compile"] = _compile_summary(jobs, outcomes, failed)
    return report


def _compile_summary(jobs: Sequence[Any], outcomes: Sequence[CompileOutcome], failed: Mapping[str, str]
                     ) -> dict[str, Any]:
    return {"configs": len(jobs), "compiled": sum(o.status == "compiled" for o in outcomes),
            "cached": sum(o.status == "cached" for o in outcomes), "errors": len(failed),
            "slowest": [{"kernel": o.kernel, "config": o.config, "status": o.status, "seconds": round(o.seconds, 1)}
                        for o in sorted(outcomes, key=lambda o: -o.seconds)[:10]]}
