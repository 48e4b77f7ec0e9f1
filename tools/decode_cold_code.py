"""Decode attention after the L2 flush: what fetching the program's own code from HBM costs the call.

    python3 tools/decode_cold_code.py --batches 64,16 --json $OUT/decode_cold_code.json
    python3 tools/decode_cold_code.py --build-only        # no GPU: prebuild the one-pass program

The benchmark times a decode call as a CUDA-graph replay right after a read of 256 MiB, which leaves nothing of the
call in the 50 MB L2: neither its inputs nor the kernel's machine code. A model's decode step leaves the code cold
too (the MoE's weights stream through the L2 between two attention layers). This tool bounds what any way of
warming the code (a smaller program, a dry run of its tail, PDL) could take off the decode row. Per batch, in turn
(order reversed every other round), medians of per-call CUDA-event times of the one-pass program (``csa``, the
benchmark's inputs at 128K context):

- ``flushed``: the benchmark's timing;
- ``flushed, tiny kernel first``: a one-element torch kernel between the flush and the start event (the control:
  what any preceding launch changes by itself);
- ``flushed, program run first on 1 row``: the same compiled program on its own one-sequence inputs between the
  flush and the start event, which brings the code (and little else) back into the L2;
- ``not flushed``: everything warm (the call's inputs too).
"""

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tool directory is not a package

from attention_walks import run_on_gpu
from decode_splits import POSITION, D, kernel, parse_ints

CASES = ("flushed", "flushed, tiny kernel first", "flushed, program run first on 1 row", "not flushed")


def inputs(b: int, heads: int, topk: int, seed: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    n_c = 32768
    pos = torch.full((b, 1), POSITION, dtype=torch.int32, device="cuda")
    q = torch.randn(b, 1, heads, D, generator=g, device="cuda").bfloat16()
    sink = torch.randn(heads, generator=g, device="cuda")
    idx = torch.argsort(torch.rand(b, 1, n_c, generator=g, device="cuda"), dim=-1)[..., :topk].int().contiguous()
    t = {"window_kv": torch.randn(b, 128, D, generator=g, device="cuda").bfloat16(),
         "sel_kv": torch.randn(b, n_c, D, generator=g, device="cuda").bfloat16(), "sel_idx": idx}
    return (q, pos, sink), t


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    k = kernel("csa", args.heads, None)
    flush = torch.ones(256 * 2**20, dtype=torch.uint8, device="cuda")
    tiny = torch.ones(1, device="cuda")
    rows = []
    for b in args.batches:
        head, t = inputs(b, args.heads, args.topk, 1)
        head1, t1 = inputs(1, args.heads, args.topk, 2)
        out = torch.full_like(head[0], float("nan"))
        out1 = torch.empty_like(head1[0])
        graphs = []
        for a, tt, o in ((head, t, out), (head1, t1, out1)):
            for _ in range(3):
                k(*a, validate=False, out=o, num_splits=1, **tt)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                k(*a, validate=False, out=o, num_splits=1, **tt)
            g.replay()
            torch.cuda.synchronize()
            graphs.append(g)
        call, warm = graphs
        nan = bool(torch.isnan(out).any())
        pre = {CASES[0]: None, CASES[1]: lambda: tiny.add_(1), CASES[2]: warm.replay, CASES[3]: None}
        times: dict[str, list[float]] = {c: [] for c in CASES}
        for r in range(args.rounds):
            for c in (reversed(CASES) if r % 2 else CASES):
                ts = []
                for _ in range(args.reps):
                    if c != "not flushed":
                        flush.sum(dtype=torch.int64)
                    if pre[c] is not None:
                        pre[c]()
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    call.replay()
                    e.record()
                    e.synchronize()
                    ts.append(s.elapsed_time(e) * 1000)
                times[c].append(statistics.median(ts))
        row = {"variant": "csa", "heads": args.heads, "batch": b, "topk": args.topk, "rounds": args.rounds,
               "reps": args.reps, "us": {c: statistics.median(v) for c, v in times.items()},
               "us_by_round": times, "nan": nan}
        print(f"b={b}: " + ", ".join(f"{c} {u:.1f} us" for c, u in row["us"].items()) + (" NaN" if nan else ""),
              flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, choices=(64, 128), default=64)
    ap.add_argument("--topk", type=int, default=512, help="compressed entries a query selects")
    ap.add_argument("--batches", default="64,16")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--build-only", action="store_true", help="compile the one-pass program (TileLang's cache)")
    ap.add_argument("--arch", default="sm_90a", help="CUDA arch for --build-only")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    try:
        args.batches = parse_ints("--batches", args.batches)
        if args.topk < 1 or args.topk % 64:
            raise ValueError(f"--topk must be a positive multiple of 64, got {args.topk}")
        if args.rounds < 1 or args.reps < 1:
            raise ValueError(f"--rounds and --reps must be >= 1, got {args.rounds}, {args.reps}")
    except ValueError as e:
        ap.error(str(e))
    if args.build_only:
        k = kernel("csa", args.heads, args.arch)
        k.compiled("main", k.launch_config("main"))
        print("built main", flush=True)
        return 0
    import torch

    return run_on_gpu("decode_cold_code.py", torch.cuda.is_available(), lambda: run(args), args.json)


if __name__ == "__main__":
    sys.exit(main())
