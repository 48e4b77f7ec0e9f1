"""Benchmark harness: CUDA-event timing, same-run peaks, JSON records, the README table.

Every run first measures the two peaks that results are reported against — the bf16 matmul
peak (``torch.matmul`` 8192³) and device-to-device copy bandwidth (read + write) — then times
each kernel after warm-up as the median of per-launch CUDA-event timings, on random (never
zero) inputs. A record gives ms, the bytes or FLOPs counted, GB/s or TFLOPS, and the fraction
of the matching peak. Both the peak and the rows are timed one launch at a time, a burst that
keeps the clock near boost; the compute-bound rows with a target are also measured back to
back at the H200's power cap, against the matmul run the same way (:mod:`tilev4.bench.sustained`).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import pkgutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["BENCHES", "benchmark", "measure_peaks", "peak_matmul", "record", "render_table", "run_benches", "time_cuda",
           "time_in_turn"]

BenchFn = Callable[[dict[str, float]], list[dict[str, Any]]]
BENCHES: dict[str, BenchFn] = {}
BENCH_L2_FLUSH: dict[str, str] = {}  # benchmark → how it treats the L2 (see benchmark())


def benchmark(name: str, l2_flush: str | None = None) -> Callable[[BenchFn], BenchFn]:
    """Register ``fn(peaks) -> list of records`` as benchmark ``name`` (``tilev4 bench NAME``).

    Benchmarks live in the submodules of :mod:`tilev4.bench`, one per area; all are imported
    when a run starts. ``l2_flush`` says how its timings treat the L2 when that is not :func:`time_cuda`'s flush
    (:data:`L2_FLUSH`); a report records it.
    """

    def wrap(fn: BenchFn) -> BenchFn:
        if name in BENCHES:
            raise ValueError(f"benchmark {name!r} is registered twice")
        BENCHES[name] = fn
        BENCH_L2_FLUSH[name] = l2_flush or L2_FLUSH
        return fn

    return wrap


def _load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")

README_BEGIN = "<!-- perf-table:begin -->"
README_END = "<!-- perf-table:end -->"


L2_FLUSH = "read of 256 MiB before each launch"  # how time_cuda clears the L2 (recorded in every report)
_OLD_L2_FLUSH = "write of 256 MiB before each launch"  # what reports without an "l2_flush" field were timed with
_HOST_LEAD_CYCLES = 2_000_000  # ~1 ms of GPU clock: the host's head start on a timed call


def time_cuda(
    fn: Callable[[], Any], warmup: int = 10, reps: int = 50, flush_l2: bool = True, graph: bool = False,
    before: Callable[[], Any] | None = None,
) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` launches, each timed with CUDA events.

    ``flush_l2`` reads a 256 MiB buffer before each launch (:data:`L2_FLUSH`), so that no run reads its inputs
    from the 50 MB L2 left warm by the previous one. A read pass leaves the L2 holding clean lines: whatever the
    previous launch left dirty is written back during the flush, not inside the timed interval. (A flush that
    WRITES the buffer leaves ~50 MB of dirty lines that the timed kernel then has to write back to HBM as it
    allocates: on the H200 that adds ~2 µs to a 21 MiB copy and ~6 µs to a kernel that reads 134 MB, work of
    the flush, not of the kernel.) ``graph=True`` captures ``fn`` in a
    CUDA graph and times its replays, so that only GPU time is measured (small decode kernels
    otherwise measure the host's launch path); it falls back to plain launches when capture fails.
    ``before`` is launched after the flush and before the start event of every timed launch (untimed): what state a
    preceding kernel leaves, e.g. the timed program's own code back in the L2.
    Without a graph, the stream spins ~1 ms (``torch.cuda._sleep``) before the start event, so that the
    host has queued all of ``fn``'s launches by the time it starts: the events time the device's work, not
    the host's Python between two of ``fn``'s kernels.
    """
    flush = torch.ones(256 * 2**20, dtype=torch.uint8, device="cuda") if flush_l2 else None
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            g.replay()
            torch.cuda.synchronize()
            run = g.replay
        except Exception:
            torch.cuda.synchronize()
            run = fn
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.sum(dtype=torch.int64)  # a read of every byte (see above)
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if not graph:
            torch.cuda._sleep(_HOST_LEAD_CYCLES)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_matmul(n: int = 8192) -> tuple[Callable[[], Any], float]:
    """The bf16 matmul peak's product (``torch.matmul`` of random ``n × n`` operands into a preallocated output) and
    its FLOPs a call: what :func:`measure_peaks` times, and :mod:`tilev4.bench.sustained` back to back."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    return (lambda: torch.matmul(a, b, out=c)), 2.0 * n**3


def measure_peaks() -> dict[str, float]:
    """bf16 matmul TFLOPS (8192³) and copy GB/s (1 GiB, read + write counted) in this run."""
    matmul, flops = peak_matmul()
    ms = time_cuda(matmul, warmup=5, reps=20, flush_l2=False)
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms_copy = time_cuda(lambda: dst.copy_(src), warmup=5, reps=20, flush_l2=False)
    return {
        "bf16_matmul_tflops": flops / ms / 1e9,
        "copy_gbps": 2 * src.numel() * 4 / ms_copy / 1e6,
    }


def time_in_turn(fns: list[Callable[[], Any]], rounds: int = 3, alternate: bool = True, **kw: Any) -> list[float]:
    """Median ms of each of ``fns`` (:func:`time_cuda` with ``kw``) over ``rounds`` rounds that time them in turn,
    so that none gets the cooler GPU; with ``alternate`` the order is reversed every other round, as back-to-back
    medians of one program drift by up to ~5 % within a process on the H200 (the first measured fastest)."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        order = reversed(range(len(fns))) if alternate and r % 2 else range(len(fns))
        for i in order:
            times[i].append(time_cuda(fns[i], **kw))
    return [statistics.median(t) for t in times]


def record(
    kernel: str,
    shape: str,
    ms: float,
    *,
    peaks: dict[str, float],
    nbytes: float = 0.0,
    flops: float = 0.0,
    target: float | None = None,
) -> dict[str, Any]:
    """One result: ms, and GB/s (from ``nbytes``) and/or TFLOPS (from ``flops``) with their peak
    fractions; ``target`` is the fraction of that peak the kernel's issue asks for."""
    rec: dict[str, Any] = {"kernel": kernel, "shape": shape, "ms": ms}
    if target is not None:
        rec["target_fraction"] = target
    if nbytes:
        rec["gbps"] = nbytes / ms / 1e6
        rec["fraction_of_copy_bw"] = rec["gbps"] / peaks["copy_gbps"]
    if flops:
        rec["tflops"] = flops / ms / 1e9
        rec["fraction_of_bf16_peak"] = rec["tflops"] / peaks["bf16_matmul_tflops"]
    return rec


def run_benches(names: list[str] | None = None, sustained_seconds: float | None = None) -> dict[str, Any]:
    """Run the named benchmarks (all by default) and return the JSON-ready report. ``sustained_seconds``: how long
    each back-to-back run of :mod:`tilev4.bench.sustained` lasts (None: its default; 0: none)."""
    if sustained_seconds is not None and not sustained_seconds >= 0:
        raise ValueError(f"sustained_seconds must be >= 0, got {sustained_seconds!r}")
    if not torch.cuda.is_available():
        raise RuntimeError("benchmarks need a CUDA GPU; none is visible")
    _load_all()
    from tilev4.bench import sustained

    unknown = set(names or []) - set(BENCHES)
    if unknown:
        raise ValueError(f"unknown benchmark(s) {sorted(unknown)}; known: {sorted(BENCHES)}")
    peaks = measure_peaks()
    results = []
    names = names or list(BENCHES)
    default_seconds = sustained.SUSTAINED_SECONDS
    if sustained_seconds is not None:  # for this run only
        sustained.SUSTAINED_SECONDS = sustained_seconds
    try:
        for name in names:
            results += BENCHES[name](peaks)
    finally:
        sustained.SUSTAINED_SECONDS = default_seconds
    props = torch.cuda.get_device_properties(0)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "gpu": props.name,
        "commit": os.environ.get("TILEV4_COMMIT", "unknown"),
        "torch": torch.__version__,
        "l2_flush": "; ".join(dict.fromkeys(BENCH_L2_FLUSH[n] for n in names)),
        "peaks": peaks,
        "results": results,
    }


def _fmt(v: float | None, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _sustained_text(r: dict[str, Any]) -> str:
    """A row's back-to-back measurement at the power cap (:mod:`tilev4.bench.sustained`), for the table's cell."""
    if "fraction_of_sustained_peak" not in r:
        return ""
    text = f"; sustained {r['fraction_of_sustained_peak']:.2f} of sustained matmul"
    if "sm_mhz_sustained" in r:
        text += f" ({r['sm_mhz_sustained']:.0f} / {r['sm_mhz_sustained_matmul']:.0f} MHz)"
    if "speedup_vs_bf16_sustained" in r:
        text += f", {r['speedup_vs_bf16_sustained']:.2f}× the bf16 path"
    return text


def render_table(reports: list[dict[str, Any]]) -> str:
    """Markdown table of benchmark reports (one row per kernel and shape)."""
    lines = [
        "| kernel | shape | ms | GB/s | TFLOPS | fraction of same-run peak | target | GPU | date | commit |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for rep in reports:
        for r in rep["results"]:
            if "tokens_per_s" in r:  # the model: throughput, and the speed-up over the reference ops
                ratio = r.get("speedup_vs_reference")
                value = f"{r['tokens_per_s']:.1f} tok/s" + (f", {ratio:.2f}× the reference" if ratio else "")
                if "batch_invariant_slowdown" in r:  # target: at most 1.15× the default mode's step time
                    value += f", {r['batch_invariant_slowdown']:.3f}× the default step (≤ 1.15)"
                target = f"{r['target_speedup']:.0f}×" if "target_speedup" in r else "–"
            else:
                frac = r.get("fraction_of_fp8_peak", r.get("fraction_of_bf16_peak", r.get("fraction_of_copy_bw")))
                which = ("fp8 matmul" if "fraction_of_fp8_peak" in r
                         else "bf16 matmul" if "fraction_of_bf16_peak" in r else "copy BW")
                value, target = f"{frac:.2f} of {which}", _fmt(r.get("target_fraction"), 2)
                if "speedup_vs_bf16" in r:  # the quantised MoE paths against the bf16 one of the same run
                    value += f", {r['speedup_vs_bf16']:.2f}× the bf16 path"
                    if "target_speedup_vs_bf16" in r:
                        target = f"{r['target_speedup_vs_bf16']:.1f}× bf16"
                if "launch_floor_ms" in r:  # decode: what an empty launch measures the same way
                    value += f" (an empty launch: {r['launch_floor_ms']:.4f} ms)"
                value += _sustained_text(r)
            lines.append(
                f"| {r['kernel']} | {r['shape']} | {r['ms']:.4f} | {_fmt(r.get('gbps'), 0)} | "
                f"{_fmt(r.get('tflops'), 1)} | {value} | {target} | {rep['gpu']} | {rep['date']} | {rep['commit']} |"
            )
    def fp8_peak(rep: dict[str, Any]) -> str:
        vals = [r["fp8_peak_tflops"] for r in rep["results"] if "fp8_peak_tflops" in r]
        return f", fp8 matmul {vals[0]:.0f} TFLOPS" if vals else ""

    def sustained_peak(rep: dict[str, Any]) -> str:
        vals = [r["sustained_peak_tflops"] for r in rep["results"] if "sustained_peak_tflops" in r]
        return f" (back to back at the power cap: {min(vals):.0f}-{max(vals):.0f})" if vals else ""

    peaks = "; ".join(
        f"{rep['gpu']} {rep['date']} ({rep['commit']}): bf16 matmul {rep['peaks']['bf16_matmul_tflops']:.0f} TFLOPS"
        f"{sustained_peak(rep)}{fp8_peak(rep)}, copy {rep['peaks']['copy_gbps']:.0f} GB/s" for rep in reports
    )
    flushes: dict[str, list[str]] = {}
    for rep in reports:  # reports from before the read flush say nothing: theirs was a write of the same buffer
        flushes.setdefault(rep.get("l2_flush", _OLD_L2_FLUSH), []).append(rep["commit"])
    how = "; ".join(f"{way} ({', '.join(sorted(set(commits)))})" for way, commits in flushes.items())
    return "\n".join(lines) + f"\n\nSame-run peaks — {peaks}.\n\nL2 flush — {how}.\n"


def update_readme(readme: Path, json_files: list[Path]) -> None:
    """Replace the README's table between the perf-table markers with one made from ``json_files``."""
    from tilev4._readme import replace_section

    reports = [json.loads(p.read_text()) for p in sorted(json_files)]
    sources = ", ".join(f"`{p.as_posix()}`" for p in sorted(json_files))
    body = f"\n_Generated by `tilev4 bench-table --update-readme` from {sources}._\n\n" + render_table(reports)
    replace_section(readme, README_BEGIN, README_END, body)
