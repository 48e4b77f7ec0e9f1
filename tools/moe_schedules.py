"""Compare the schedules of the MoE expert GEMMs on the GPU (bf16, FP8 and FP4 weights), kernel by kernel.

    python3 tools/moe_schedules.py --schedules ws,pipelined --tokens 8192,64 --json $OUT/moe_schedules.json
    python3 tools/moe_schedules.py --kernels moe_up_fp4,moe_down_fp4 --schedules ws,swap --tokens 64,256

Compiles ``moe_up`` / ``moe_down`` (bf16 weights), ``moe_up_fp8`` / ``moe_down_fp8`` and ``moe_up_fp4`` /
``moe_down_fp4`` through the registry
with an explicit ``schedule`` (other tunables as resolved for this GPU; ``--config K=V,...`` pins more, e.g.
``num_stages=3``), in parallel, then times each on the routing of ``tilev4 bench moe`` (V4-Flash dims: dim
4096, inter 2048, 256 experts, top-6; a random gate with bias) as CUDA-event medians. Outputs are poisoned
with NaN before the checked launch and compared bit for bit with the first schedule's (``equal``, and
``max_abs_diff``): every schedule sums the same products in the same order, so ``equal`` must be true (the FP4
``ws`` kernel's one wgmma a weight gives the bits of the pipelined kernel's one over W1 stacked on W3, and the swap
kernel's with the operands swapped, as ``tests/test_moe_gpu.py`` checks). TFLOPS count the routed rows only
(``2·N·dim·inter`` a GEMM, twice for the up-projection's two weights), as the benchmark does; ``weight_gbps`` the
bytes of the weights (data and scales) of the experts that have rows, counted as ``tilev4 bench moe`` counts them
(the decode measure: ``fraction_of_copy_bw``).
"""

import argparse
import concurrent.futures as cf
import importlib
import json

import torch

from tilev4.bench import measure_peaks, time_cuda

DIM, INTER, NUM_EXPERTS, TOP_K, ROUTE_SCALE, LIMIT = 4096, 2048, 256, 6, 1.5, 10.0
KERNELS = ("moe_up", "moe_down", "moe_up_fp8", "moe_down_fp8", "moe_up_fp4", "moe_down_fp4")


def _problem(kernel: str) -> dict:
    return {"dim": DIM} if kernel.startswith("moe_up") else {"inter": INTER}


def _build(job: tuple[str, dict]) -> str:
    from tilev4.kernels import compile_kernel

    compile_kernel(*job)
    return job[0]


def _parse_config(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def _launch_args(kernel: str, out: torch.Tensor, t: dict, w1, w2, w3, fp8, fp4) -> tuple:
    """The kernel's arguments on the inputs ``t`` of one token count (see the loop in :func:`main`)."""
    q1, q2, q3 = fp4 if kernel.endswith("_fp4") else fp8
    if kernel == "moe_up":
        return (t["perm"].x_sorted, t["perm"].w_sorted, w1, w3, *t["tables"], out, LIMIT)
    if kernel == "moe_down":
        return (t["h"], w2, *t["tables"], out)
    if kernel in ("moe_up_fp8", "moe_up_fp4"):
        return (t["x8"], t["xs"], t["perm"].w_sorted, q1.data, q1.scale, q3.data, q3.scale, *t["tables"], out, LIMIT)
    return (t["h8"], t["hs"], q2.data, q2.scale, *t["tables"], out)


def _schedule_config(spec: str) -> dict:
    """``ws+num_stages=3`` -> ``{"schedule": "ws", "num_stages": 3}``."""
    name, *items = spec.split("+")
    return {"schedule": name, **_parse_config(",".join(items))}


def _swap_base(kernel: str, spec: str) -> dict:
    """The ops' swap config of an FP4 kernel (its block_n and packed ring) under a ``swap`` schedule, else nothing."""
    if not (kernel.endswith("_fp4") and spec.split("+")[0] == "swap"):
        return {}
    from tilev4.kernels.moe_fp4 import SWAP_CONFIG

    return dict(SWAP_CONFIG["up" if kernel.startswith("moe_up") else "down"])


def _expert_bytes(kernel: str, bf16: tuple, fp8: tuple, fp4: tuple | None) -> int:
    """Bytes one expert's weights of ``kernel`` take: W1 and W3 (up) or W2 (down) in the kernel's format, with the
    scales of a quantised format."""
    quant = fp4 if kernel.endswith("_fp4") else fp8 if kernel.endswith("_fp8") else None
    weights = (quant or bf16)[0::2] if kernel.startswith("moe_up") else (quant or bf16)[1:2]  # (w1, w3) or (w2,)
    if quant is None:
        return sum(w[0].nbytes for w in weights)
    return sum(q.data[0].nbytes + q.scale[0].nbytes for q in weights)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedules", default="ws,pipelined",
                    help="comma-separated (the first is the baseline); a schedule may pin tunables of its own: "
                         "ws+packed_stages=8+num_stages=3")
    ap.add_argument("--tokens", default="8192,64", help="comma-separated token counts")
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {KERNELS}")
    ap.add_argument("--config", default="", help="more tunables for every kernel, K=V,...")
    ap.add_argument("--jobs", type=int, default=8, help="compile processes")
    ap.add_argument("--json", default=None, help="write the timings here")
    args = ap.parse_args()
    schedules = args.schedules.split(",")
    kernels = args.kernels.split(",")
    if unknown := set(kernels) - set(KERNELS):
        raise SystemExit(f"unknown kernels {sorted(unknown)}; choose from {KERNELS}")
    extra = _parse_config(args.config)
    if not torch.cuda.is_available():
        raise SystemExit("moe_schedules needs a CUDA GPU")

    configs = {(k, s): {**_problem(k), "block_m": 128, **_swap_base(k, s), **extra, **_schedule_config(s)}
               for k in kernels for s in schedules}
    with cf.ProcessPoolExecutor(args.jobs) as pool:  # compile in parallel; the cache serves the timing below
        list(pool.map(_build, [(k, c) for (k, _), c in configs.items()]))

    from tilev4.bench.moe import _layer
    from tilev4.kernels import compile_kernel, fp8_quantize
    from tilev4.kernels.moe_fp4 import quantize_fp4_weight
    from tilev4.kernels.moe_fp8 import quantize_fp8_weight

    M = importlib.import_module("tilev4.kernels.moe")  # tilev4.kernels also exports the function `moe`
    peaks = measure_peaks()
    gen = torch.Generator(device="cuda").manual_seed(0)
    layer = _layer(gen)
    w1, w2, w3 = layer["w1"], layer["w2"], layer["w3"]
    q1, q2, q3 = (quantize_fp8_weight(w) for w in (w1, w2, w3))
    fp4 = tuple(quantize_fp4_weight(w) for w in (w1, w2, w3)) if any(k.endswith("_fp4") for k in kernels) else None
    rows = []
    for num_tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(num_tokens, DIM, generator=gen, device="cuda").bfloat16()
        weights, experts = M.moe_route(x, layer["gate"], layer["bias"], TOP_K, ROUTE_SCALE)
        perm = M.moe_permute(x, weights, experts, NUM_EXPERTS)
        n = perm.x_sorted.shape[0]
        tables = (perm.offsets, perm.tile_offsets, perm.tile_info)  # every expert GEMM reads the tiles' records
        h = M.moe_up(perm, w1, w3, LIMIT)
        x8, xs = fp8_quantize(perm.x_sorted)
        h8, hs = fp8_quantize(h)
        inputs = {"perm": perm, "tables": tables, "h": h, "x8": x8, "xs": xs, "h8": h8, "hs": hs}
        for kernel in kernels:
            width = INTER if kernel.startswith("moe_up") else DIM
            flops = 2.0 * n * DIM * INTER * (2 if kernel.startswith("moe_up") else 1)
            touched = int((perm.offsets[1:] > perm.offsets[:-1]).sum())
            weight_bytes = touched * _expert_bytes(kernel, (w1, w2, w3), (q1, q2, q3), fp4)
            first = None
            for schedule in schedules:
                fn = compile_kernel(kernel, configs[kernel, schedule])
                out = torch.full((n, width), float("nan"), device="cuda", dtype=torch.bfloat16)
                launch_args = _launch_args(kernel, out, inputs, w1, w2, w3, (q1, q2, q3), fp4)
                fn(*launch_args)
                torch.cuda.synchronize()
                first = out.clone() if first is None else first
                ms = time_cuda(lambda fn=fn, a=launch_args: fn(*a), warmup=5, reps=30, graph=num_tokens <= 256)
                tflops = flops / ms / 1e9
                gbps = weight_bytes / ms / 1e6
                row = {"tokens": num_tokens, "kernel": kernel, "schedule": schedule, "ms": ms, "tflops": tflops,
                       "fraction_of_bf16_peak": tflops / peaks["bf16_matmul_tflops"], "weight_gbps": gbps,
                       "fraction_of_copy_bw": gbps / peaks["copy_gbps"], "experts_touched": touched,
                       "equal": bool(torch.equal(out, first)),
                       "max_abs_diff": float((out.float() - first.float()).abs().nan_to_num(float("inf")).max()),
                       "nan": int(torch.isnan(out).sum())}
                rows.append(row)
                print(f"T={num_tokens:6d} {kernel:13s} {schedule:10s} {ms:8.4f} ms {row['tflops']:7.1f} TFLOPS "
                      f"({row['fraction_of_bf16_peak']:.3f} of bf16 peak, {row['fraction_of_copy_bw']:.3f} of copy BW "
                      f"over the weights) equal={row['equal']} max_abs_diff={row['max_abs_diff']:.3g} "
                      f"nan={row['nan']}", flush=True)
    print(f"peaks: bf16 matmul {peaks['bf16_matmul_tflops']:.0f} TFLOPS, copy {peaks['copy_gbps']:.0f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peaks": peaks, "config": extra, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
