"""Where a decode step's time goes: device time per kernel, grouped, for the default and batch-invariant modes.

    python3 tools/profile_decode.py --model small --context 32768 --batch 4 --json $OUT/profile.json

Builds a random-weight model, fills a cache of ``--batch`` sequences to ``--context`` tokens
(:meth:`~tilev4.model.cache.KVCache.fill_random`), runs two warm-up decode steps, then profiles ``--steps`` eager
decode steps (CUDA graphs off, so every launch is attributed to its op) with ``torch.profiler``. Kernels are
grouped by a coarse family (TileLang kernels by their program name, cuBLAS / torch kernels by their kernel name);
the report gives device milliseconds per step per group for each mode, the batch-invariant / default ratio per
group, and the host wall time per step. Without a GPU it profiles the reference path on the CPU (CPU op time).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from typing import Any

import torch

_FAMILIES = [  # (pattern on the kernel / op name, family) — first match wins
    (r"^(csa|hca|sparse)_|attention|flash", "attention"),  # the DSL's programs: <kind>_main / _split / _combine
    (r"^linear_kernel", "linear (split-bf16 kernel)"),
    (r"moe_|grouped", "moe"),
    (r"mhc", "mhc"),
    (r"rmsnorm", "rmsnorm"),
    (r"compressor", "compressor"),
    (r"indexer|topk_select", "indexer kernels"),
    (r"gemm|gemv|sm90_xmma|cutlass|dgemm|ampere|matmul|mm", "cuBLAS GEMM (linears, einsum)"),
    (r"sort|radix|topk", "torch sort/top-k"),
    (r"bucketize|index|gather|scatter|cat|copy|fill", "torch indexing/copies"),
    (r"elementwise|reduce|vectorized|unrolled", "torch elementwise/reductions"),
]


def family(name: str) -> str:
    low = name.lower()
    for pattern, fam in _FAMILIES:
        if re.search(pattern, low):
            return fam
    return "other"


def profile_mode(model: Any, batch: int, context: int, steps: int, device: str) -> dict[str, Any]:
    cache = model.new_cache(batch, context + steps + 4)
    cache.fill_random(context)
    tok = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    for _ in range(2):
        tok = model.decode(tok, cache).argmax(-1)
    if device == "cuda":
        torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            tok = model.decode(tok, cache).argmax(-1)
        if device == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    groups: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        if device == "cuda":
            t_us = getattr(ev, "self_device_time_total", 0.0) or getattr(ev, "self_cuda_time_total", 0.0)
            if not t_us or ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:
            t_us = ev.self_cpu_time_total
            if not ev.key.startswith("aten::"):
                continue
        groups[family(ev.key)] += t_us / 1e3 / steps
        kernels[ev.key[:120]] += t_us / 1e3 / steps
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    return {"wall_ms_per_step": wall * 1e3, "device_ms_per_step": sum(groups.values()),
            "groups_ms": dict(sorted(groups.items(), key=lambda kv: -kv[1])), "top_kernels_ms": dict(top)}


def main(argv: list[str] | None = None) -> int:
    from tilev4.model import Config, Model, random_checkpoint_tensors

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small", choices=["tiny", "small"])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = Config.preset(args.model)
    tensors = random_checkpoint_tensors(cfg, seed=0)
    report: dict[str, Any] = {"model": args.model, "context": args.context, "batch": args.batch, "device": device,
                              "modes": {}}
    for name, bi in (("default", False), ("batch-invariant", True)):
        model = Model(cfg, tensors, device, batch_invariant=bi, cuda_graphs=False)
        report["modes"][name] = profile_mode(model, args.batch, args.context, args.steps, device)
    d, b = report["modes"]["default"], report["modes"]["batch-invariant"]
    print(f"{args.model} ctx={args.context} b={args.batch} on {device}: device ms/step default "
          f"{d['device_ms_per_step']:.3f}, batch-invariant {b['device_ms_per_step']:.3f}; host wall ms/step "
          f"{d['wall_ms_per_step']:.1f} / {b['wall_ms_per_step']:.1f}")
    for g in sorted(set(d["groups_ms"]) | set(b["groups_ms"]), key=lambda g: -b["groups_ms"].get(g, 0.0)):
        x, y = d["groups_ms"].get(g, 0.0), b["groups_ms"].get(g, 0.0)
        print(f"  {g:34s} {x:8.3f} {y:8.3f} ms  ({y / x if x else float('inf'):.2f}x)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
