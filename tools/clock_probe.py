"""The SM clock and board power under load: the matmul peak's product beside the kernels measured against it.

The issue rows are fractions of a bf16 matmul peak measured in the same run (``tilev4.bench.measure_peaks``: 25
launches of an 8192³ ``torch.matmul``, each after ~1 ms of the stream spinning: a burst). Run for seconds, every
heavy kernel runs at the H200's power cap, where a kernel that spends more energy a cycle than another runs at a
lower clock. This probe runs each workload back to back for ``--seconds`` (no L2 flush, as the peak is measured)
while ``nvidia-smi`` samples the SM clock, the power draw, the temperature and the active clock-event reasons every
``--interval-ms`` (:mod:`tilev4.bench.sustained`, which ``tilev4 bench`` uses for its rows' back-to-back
measurement); for each it reports the medians of the samples of its run's second half, its time a call (CUDA events
around batches of calls, median) and, where it has a FLOP count, its TFLOPS and its fraction of the matmul's TFLOPS
in this loop, also at the matmul's clock (the fraction × matmul clock / its clock: what the kernel would reach with
the same cycles at the peak's clock).

Workloads: ``matmul`` (the peak's product), ``copy`` (1 GiB, the copy peak), ``moe`` (the bf16 routed path of
``tilev4 bench moe``: up with SwiGLU + down, 8192 tokens, random gate and bias), ``moe-balanced`` (192 rows an
expert), ``moe-fp8`` (the FP8 up-projection quantising h + FP8 down, on the benchmark's routing), ``csa`` (V4-Flash
CSA prefill of ``tilev4 bench attention``: 4096 queries, 64 heads, 128 + 512 keys).

    python3 tools/clock_probe.py [--workloads matmul,moe,moe-balanced,csa,matmul] [--seconds 3] [--json PATH]
"""

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

WORKLOADS = ("matmul", "copy", "moe", "moe-balanced", "moe-fp8", "csa")


def parse_workloads(text: str) -> list[str]:
    """``"matmul,moe"`` → ``["matmul", "moe"]``; each one of :data:`WORKLOADS` (repeats allowed: a second matmul
    at the end shows whether the GPU warmed up between)."""
    names = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if not names or bad:
        raise ValueError(f"--workloads must list names of {', '.join(WORKLOADS)}, got {text!r}")
    return names


def build(name: str) -> tuple[Callable[[], Any], float | None]:
    """The workload's call and its FLOPs a call (None for the copy)."""
    import importlib

    import torch

    if name == "matmul":
        from tilev4.bench import peak_matmul

        return peak_matmul()
    if name == "copy":
        src = torch.randn(2**28, device="cuda")
        dst = torch.empty_like(src)
        return (lambda: dst.copy_(src)), None
    if name == "csa":
        import tilev4
        from tilev4.bench.attention import D, _csa_prefill_inputs

        q, kv_w, kv_c, idx, sink, pos, start = _csa_prefill_inputs(4096, 64, 512)
        o = torch.empty_like(q)
        return (lambda: tilev4.csa_attention(q, kv_w, kv_c, idx, sink, pos, window_start=start, validate=False,
                                             out=o)), 4.0 * 4096 * 64 * D * (128 + 512)
    from tilev4.bench import moe as bm

    K = importlib.import_module("tilev4.kernels.moe")
    gen = torch.Generator(device="cuda").manual_seed(0)
    layer = bm._layer(gen)
    x = torch.randn(8192, bm.DIM, generator=gen, device="cuda").bfloat16()
    if name == "moe-balanced":
        weights, experts = bm.balanced_routing(8192, bm.NUM_EXPERTS, bm.TOP_K, gen)
    else:
        weights, experts = K.moe_route(x, layer["gate"], layer["bias"], bm.TOP_K, bm.ROUTE_SCALE)
    flops = 6.0 * 8192 * bm.TOP_K * bm.DIM * bm.INTER
    if name == "moe-fp8":
        from tilev4.kernels import fp8_quantize
        from tilev4.kernels.moe_fp8 import quantize_fp8_weight

        fp8 = tuple(quantize_fp8_weight(layer[k]) for k in ("w1", "w2", "w3"))
        perm8 = K.moe_permute(x, weights, experts, bm.NUM_EXPERTS, payload=fp8_quantize(x)[0])
        return bm.fp8_routed_path(perm8, bm._quantize_tokens(x, perm8), fp8)[0], flops
    path = bm.routed_path(K, x, weights, experts, layer["w1"], layer["w2"], layer["w3"])
    return path.routed, flops


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="matmul,moe,moe-balanced,moe-fp8,csa,copy,matmul")
    ap.add_argument("--seconds", type=float, default=3.0, help="how long each workload runs back to back")
    ap.add_argument("--interval-ms", type=int, default=20, help="nvidia-smi's sampling interval")
    ap.add_argument("--json", help="write the report here too")
    args = ap.parse_args(argv)
    try:
        names = parse_workloads(args.workloads)
    except ValueError as exc:
        ap.error(str(exc))
    if not args.seconds > 0 or args.interval_ms < 1:
        ap.error(f"--seconds must be > 0 and --interval-ms >= 1, got {args.seconds} and {args.interval_ms}")

    import torch

    if not torch.cuda.is_available():
        print("clock_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    from tilev4.bench.sustained import ClockSampler, time_back_to_back

    sampler = ClockSampler(args.interval_ms)
    if not sampler.available:
        print("clock_probe: nvidia-smi gave no clock sample", file=sys.stderr)
        return 2
    rows = []
    try:
        for name in names:
            fn, flops = build(name)
            row = {"workload": name, **time_back_to_back(fn, args.seconds, sampler)}
            if flops is not None:
                row["tflops"] = flops / row["ms"] / 1e9
            rows.append(row)
            print(json.dumps(row), flush=True)
            del fn
            torch.cuda.empty_cache()
    finally:
        sampler.close()
    ref = next((r for r in rows if r["workload"] == "matmul"), None)
    for r in rows:
        if ref is not None and "tflops" in r and r.get("sm_mhz") and ref.get("sm_mhz"):
            r["fraction_of_matmul"] = r["tflops"] / ref["tflops"]
            r["fraction_at_matmul_clock"] = r["fraction_of_matmul"] * ref["sm_mhz"] / r["sm_mhz"]
    report = {"gpu": torch.cuda.get_device_name(), "seconds": args.seconds, "interval_ms": args.interval_ms,
              "rows": rows}
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
