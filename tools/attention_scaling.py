"""Prefill attention time against the number of keys a query sees: the fixed cost of a query and the key-loop rate.

    python3 tools/attention_scaling.py --json $OUT/attention_scaling.json        # on a GPU

For V4-Flash CSA prefill (the benchmark's inputs: b = 1, s = 4096, H = 64, a 128-key window plus top-k compressed
entries), V4-Pro (H = 128) and plain sparse attention (H = 128, an index list only, the shape FlashMLA's sparse
prefill reports), the public op is timed (CUDA-graph replays, L2 flushed, medians) at several top-k. A least-squares
line ``ms = a + b · keys`` over the top-k of a series splits a launch's time into a part that does not grow with the
keys (``a``: a query's Q load, output, epilogue, the launch and its tail) and the key loop's rate: ``4·s·H·D / b``
is the TFLOPS of the marginal key, which the fraction of the same-run bf16 matmul peak compares with the whole
call's. FLOPs count valid keys only (4·H·D a query and key, as ``tilev4 bench attention`` does). Each point is
timed ``--rounds`` times, each round walking all points in turn, and the median is kept: timed one after another,
the last point of a run (sparse, top-k 2048) came out 15 % slower than when a probe timed it first.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

D = 512


SERIES = [  # (name, heads, top-k values, with the 128-key window)
    ("V4-Flash CSA (H=64, window 128 + top-k)", 64, [128, 256, 512, 1024, 2048], True),
    ("V4-Pro CSA (H=128, window 128 + top-k)", 128, [256, 512, 1024, 2048], True),
    ("sparse (H=128, top-k only)", 128, [512, 1024, 2048], False),
]


def _point(heads: int, topk: int, window: bool, s: int) -> tuple[Any, int]:
    """The public op on the benchmark's inputs at ``topk`` (run once, its output checked), and its key count."""
    import torch

    import tilev4
    from tilev4.bench.attention import _csa_prefill_inputs

    q, kv_w, kv_c, idx, sink, pos, start = _csa_prefill_inputs(s, heads, topk)
    o = torch.full_like(q, float("nan"))
    if window:
        def fn():
            tilev4.csa_attention(q, kv_w, kv_c, idx, sink, pos, window_start=start, validate=False, out=o)
    else:
        def fn():
            tilev4.sparse_attention(q, kv_c, sink, idx, validate=False, out=o)
    fn()
    torch.cuda.synchronize()
    if not torch.isfinite(o).all():
        raise RuntimeError(f"H={heads} top-k {topk}: non-finite output")
    return fn, topk + (128 if window else 0)


def _fit(rows: list[dict[str, Any]], heads: int, s: int, peaks: dict[str, float]) -> dict[str, Any]:
    xs, ys = [r["keys"] for r in rows], [r["ms"] for r in rows]
    b, a = statistics.linear_regression(xs, ys)
    marginal = 4.0 * s * heads * D / b / 1e9
    return {"fixed_ms": a, "ms_per_key": b, "marginal_tflops": marginal,
            "marginal_fraction_of_bf16_peak": marginal / peaks["bf16_matmul_tflops"],
            "max_residual_ms": max(abs(y - (a + b * x)) for x, y in zip(xs, ys))}


def measure(s: int, rounds: int, peaks: dict[str, float]) -> list[dict[str, Any]]:
    """Every point of :data:`SERIES`, timed once a round, the rounds walking all points in turn: a clock that drops
    under sustained load then weighs on every point alike instead of on the last ones timed. Medians over rounds."""
    from tilev4.bench import time_cuda

    points = [(i, topk, *_point(heads, topk, window, s))
              for i, (_, heads, topks, window) in enumerate(SERIES) for topk in topks]
    times: list[list[float]] = [[] for _ in points]
    for _ in range(rounds):
        for k, (_, _, fn, _) in enumerate(points):
            times[k].append(time_cuda(fn, reps=20, graph=True))
    out = []
    for i, (name, heads, _, window) in enumerate(SERIES):
        rows = []
        for k, (si, topk, _, keys) in enumerate(points):
            if si != i:
                continue
            ms = statistics.median(times[k])
            tflops = 4.0 * s * heads * D * keys / ms / 1e9
            rows.append({"topk": topk, "keys": keys, "ms": ms, "ms_rounds": times[k], "tflops": tflops,
                         "fraction_of_bf16_peak": tflops / peaks["bf16_matmul_tflops"]})
            print(json.dumps({"series": name, **rows[-1]}), flush=True)
        fit = _fit(rows, heads, s, peaks)
        print(json.dumps({"series": name, **fit}), flush=True)
        out.append({"series": name, "heads": heads, "s": s, "window": window, "rows": rows, "fit": fit})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the series here")
    ap.add_argument("--s", type=int, default=4096, help="queries (default 4096, the benchmark's)")
    ap.add_argument("--rounds", type=int, default=3, help="timings of each point, all points in turn (default 3)")
    args = ap.parse_args()

    import torch

    from tilev4.bench import measure_peaks

    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    peaks = measure_peaks()
    print(json.dumps(peaks), flush=True)
    out = {"gpu": torch.cuda.get_device_name(), "peaks": peaks, "rounds": args.rounds,
           "series": measure(args.s, args.rounds, peaks)}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
