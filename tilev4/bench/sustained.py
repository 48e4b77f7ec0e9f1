"""Back-to-back timing at the power cap, with the SM clock and the board power sampled while a kernel runs.

:func:`tilev4.bench.time_cuda` times launches one at a time, each after an L2 flush (and, without a CUDA graph, after
~1 ms of the stream spinning), and the same-run matmul peak is 25 such launches: the GPU is busy part of the time and
its clock stays near boost. A workload that runs for seconds (a prefill, a training step) runs at the H200's power cap
(~690 W) instead, where the SM clock settles at what each kernel's energy a cycle allows: 1430-1460 MHz for the
peak's 8192³ matmul (656-666 TFLOPS back to back, against ~790-800 in the burst), lower for a kernel that moves more
bytes a FLOP, higher for one whose tensor pipe idles more (``benchmarks/logs/h200-2026-12-02-session47.md``).

:func:`add_sustained` measures a benchmark row that way too: its call back to back for :data:`SUSTAINED_SECONDS`,
between two runs of the peak's matmul made the same way, and records its throughput as a fraction of that sustained
matmul, with the clocks behind both, beside the row's burst fraction. Nothing is flushed between back-to-back calls
(the matmul of the peak is not flushed either; the rows measured this way stream far more than the 50 MB L2 a call).
Clocks come from ``nvidia-smi`` (sampled every 20 ms in a background process); without it the rows get times only.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ClockSampler", "add_sustained", "decode_reasons", "parse_sample", "summarise", "time_back_to_back"]

SUSTAINED_SECONDS = 2.0  # each back-to-back run (the first half settles the clock; 0 turns the measurement off)
INTERVAL_MS = 20
# nvidia-smi's clock-event (formerly "throttle") reason bits
REASONS = {0x1: "idle", 0x2: "applications clocks setting", 0x4: "sw power cap", 0x8: "hw slowdown",
           0x10: "sync boost", 0x20: "sw thermal slowdown", 0x40: "hw thermal slowdown", 0x80: "hw power brake",
           0x100: "display clock setting"}
FIELDS = "timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,{reasons}"


def decode_reasons(mask: int) -> list[str]:
    """Names of the bits set in an ``nvidia-smi`` clock-event reason mask (unknown bits as hex)."""
    names = [name for bit, name in REASONS.items() if mask & bit]
    rest = mask & ~sum(REASONS)
    return names + ([hex(rest)] if rest else [])


def parse_sample(line: str) -> dict[str, Any] | None:
    """One ``nvidia-smi --format=csv,noheader,nounits`` line of :data:`FIELDS` → a sample (its time in seconds since
    the epoch, read as local time), or None for a line that is not one (a header, ``[N/A]`` values, a message)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 6:
        return None
    try:
        stamp, _, frac = parts[0].partition(".")
        t = time.mktime(time.strptime(stamp, "%Y/%m/%d %H:%M:%S")) + (float("0." + frac) if frac else 0.0)
        return {"t": t, "sm_mhz": float(parts[1]), "mem_mhz": float(parts[2]), "power_w": float(parts[3]),
                "temp_c": float(parts[4]), "reasons": int(parts[5], 16)}
    except ValueError:
        return None


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians (and the SM clock's range) of the samples taken while a workload ran, with every reason seen."""
    if not samples:
        return {"samples": 0}
    mask = 0
    for s in samples:
        mask |= s["reasons"]
    sm = [s["sm_mhz"] for s in samples]
    return {"samples": len(samples), "sm_mhz": statistics.median(sm), "sm_mhz_min": min(sm), "sm_mhz_max": max(sm),
            "mem_mhz": statistics.median(s["mem_mhz"] for s in samples),
            "power_w": statistics.median(s["power_w"] for s in samples),
            "temp_c": statistics.median(s["temp_c"] for s in samples), "reasons": decode_reasons(mask)}


def _smi_ids() -> list[str]:
    """``nvidia-smi``'s names for the current CUDA device to try: its UUID first (CUDA's device order and
    ``CUDA_VISIBLE_DEVICES`` need not match ``nvidia-smi``'s indices), then its index."""
    index = torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return ([f"GPU-{uuid}"] if uuid else []) + [str(index)]


class ClockSampler:
    """``nvidia-smi`` sampling every ``interval_ms`` in a background process, its lines parsed as they come. Use as a
    context manager; :meth:`between` gives the samples of a time window. ``available`` is false (and nothing is
    sampled) where ``nvidia-smi`` is missing or gives no sample."""

    def __init__(self, interval_ms: int = INTERVAL_MS) -> None:
        self.samples: list[dict[str, Any]] = []
        self.proc: subprocess.Popen | None = None
        exe = shutil.which("nvidia-smi")
        reasons_fields = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")  # new name, old name
        for smi_id, reasons in [(i, r) for i in _smi_ids() for r in reasons_fields] if exe else []:
            cmd = [exe, f"--query-gpu={FIELDS.format(reasons=reasons)}", "--format=csv,noheader,nounits",
                   f"--id={smi_id}"]
            probe = subprocess.run(cmd, capture_output=True, text=True)
            if probe.returncode == 0 and probe.stdout and parse_sample(probe.stdout.splitlines()[0]) is not None:
                self.proc = subprocess.Popen([*cmd, f"-lms={interval_ms}"], stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, text=True)
                threading.Thread(target=self._read, daemon=True).start()
                break

    @property
    def available(self) -> bool:
        return self.proc is not None

    def _read(self) -> None:
        for line in self.proc.stdout:
            s = parse_sample(line)
            if s is not None:
                self.samples.append(s)

    def between(self, t0: float, t1: float) -> list[dict[str, Any]]:
        return [s for s in self.samples if t0 <= s["t"] <= t1]

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.proc = None

    def __enter__(self) -> ClockSampler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def time_back_to_back(fn: Callable[[], Any], seconds: float, sampler: ClockSampler | None = None) -> dict[str, Any]:
    """``fn`` called back to back for ``seconds`` after a warm-up: ms a call (the median over batches of ~50 ms of
    calls, CUDA events around each batch) and the clock samples, both of the run's second half (the first settles
    the clock at the power cap)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    batch = max(1, round(0.05 / max(time.perf_counter() - t, 1e-6)))
    per_call: list[tuple[float, float]] = []  # (host time at the batch's end, ms a call)
    t0 = time.time()
    while time.time() - t0 < seconds:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        per_call.append((time.time(), start.elapsed_time(end) / batch))
    t1 = time.time()
    mid = t0 + (t1 - t0) / 2
    settled = [ms for at, ms in per_call if at >= mid] or [per_call[-1][1]]
    out = {"ms": statistics.median(settled), "calls_a_batch": batch}
    if sampler is not None and sampler.available:
        out.update(summarise(sampler.between(mid, t1)))
    return out


def add_sustained(rec: dict[str, Any], fn: Callable[[], Any], flops: float,
                  seconds: float | None = None) -> dict[str, Any]:
    """Measure ``rec``'s call ``fn`` (``flops`` a call) back to back between two back-to-back runs of the peak's
    matmul, and add to ``rec``: ``ms_sustained``, ``tflops_sustained``, ``sustained_peak_tflops`` (the mean of the
    two matmul runs), ``fraction_of_sustained_peak`` and, where ``nvidia-smi`` gave samples, ``sm_mhz_sustained``,
    ``sm_mhz_sustained_matmul`` and ``power_w_sustained``. Nothing is added when ``seconds`` (default
    :data:`SUSTAINED_SECONDS`) is 0."""
    from tilev4.bench import peak_matmul

    seconds = SUSTAINED_SECONDS if seconds is None else seconds
    if seconds <= 0:
        return rec
    matmul, matmul_flops = peak_matmul()
    with ClockSampler() as sampler:
        before = time_back_to_back(matmul, seconds, sampler)
        run = time_back_to_back(fn, seconds, sampler)
        after = time_back_to_back(matmul, seconds, sampler)
    peak = statistics.mean(matmul_flops / m["ms"] / 1e9 for m in (before, after))
    rec["ms_sustained"] = run["ms"]
    rec["tflops_sustained"] = flops / run["ms"] / 1e9
    rec["sustained_peak_tflops"] = peak
    rec["fraction_of_sustained_peak"] = rec["tflops_sustained"] / peak
    if "sm_mhz" in run and "sm_mhz" in before and "sm_mhz" in after:
        rec["sm_mhz_sustained"] = run["sm_mhz"]
        rec["sm_mhz_sustained_matmul"] = statistics.mean((before["sm_mhz"], after["sm_mhz"]))
        rec["power_w_sustained"] = run["power_w"]
        rec["clock_reasons_sustained"] = run["reasons"]
    return rec
