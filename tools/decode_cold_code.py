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
from decode_splits import add_common_args, check_common_args, decode_inputs, kernel, launcher

CASES = ("flushed", "flushed, tiny kernel first", "flushed, program run first on 1 row", "not flushed")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from tilev4.bench import time_cuda

    k = kernel("csa", args.heads, None)
    tiny = torch.ones(1, device="cuda")
    rows = []
    for b in args.batches:
        head, t = decode_inputs("csa", b, args.heads, args.topk)
        head1, t1 = decode_inputs("csa", 1, args.heads, args.topk, seed=2)  # the warm-up's own row
        out = torch.full_like(head[0], float("nan"))
        out1 = torch.empty_like(head1[0])

        call, call1 = launcher(k, head, t, out), launcher(k, head1, t1, out1)
        warm = torch.cuda.CUDAGraph()
        for _ in range(3):
            call1()
        torch.cuda.synchronize()
        with torch.cuda.graph(warm):
            call1()
        call()
        nan = bool(torch.isnan(out).any())
        how = {CASES[0]: {}, CASES[1]: {"before": lambda: tiny.add_(1)}, CASES[2]: {"before": warm.replay},
               CASES[3]: {"flush_l2": False}}
        times: dict[str, list[float]] = {c: [] for c in CASES}
        for r in range(args.rounds):
            for c in (reversed(CASES) if r % 2 else CASES):
                times[c].append(1000 * time_cuda(call, warmup=3, reps=args.reps, graph=True, **how[c]))
        row = {"variant": "csa", "heads": args.heads, "batch": b, "topk": args.topk, "rounds": args.rounds,
               "reps": args.reps, "us": {c: statistics.median(v) for c, v in times.items()},
               "us_by_round": times, "nan": nan}
        print(f"b={b}: " + ", ".join(f"{c} {u:.1f} us" for c, u in row["us"].items()) + (" NaN" if nan else ""),
              flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap, batches="64,16", rounds=6)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    try:
        check_common_args(args)
        if args.reps < 1:
            raise ValueError(f"--reps must be >= 1, got {args.reps}")
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
