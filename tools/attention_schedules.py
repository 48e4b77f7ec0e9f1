"""Compare the attention DSL's warp-specialised schedules on the GPU, case by case.

    python3 tools/attention_schedules.py --schedules ws,seesaw --cases all --json $OUT/schedules.json

Builds every program directly from :class:`~tilev4.dsl.AttentionKernel` with an explicit
``AttentionConfig(schedule=...)`` (the registry and its tuned records are bypassed), compiles them in
parallel, then times the benchmark shapes of ``tilev4 bench attention`` — V4-Flash and V4-Pro CSA prefill,
V4-Flash CSA decode with 1, 2, 3 and 5 splits, HCA prefill at s = 65536 — as CUDA-event medians with the L2
flushed (decode as CUDA-graph replays). Outputs are poisoned with NaN before the first launch; each output is
compared with the first schedule's (max |difference| and NaN count are printed). ``--cases prefill`` or
``decode`` runs one case alone (for a profiler: ``ncu -k regex:main_ws -c 1 python3 tools/… --cases decode``).
"""

import argparse
import concurrent.futures as cf
import json
import time

import torch

from tilev4.bench import measure_peaks, time_cuda
from tilev4.bench.attention import D, _csa_decode_inputs, _csa_prefill_inputs, _hca_prefill_inputs
from tilev4.dsl import AttentionKernel
from tilev4.dsl.codegen import AttentionConfig
from tilev4.kernels.attention import csa_spec, hca_spec


def _prefill(heads: int, topk: int, s: int = 4096):
    q, kv_w, kv_c, idx, sink, pos, start = _csa_prefill_inputs(s, heads, topk)
    t = {"q": q, "positions": pos, "sink": sink, "window_kv": kv_w, "window_start": start, "sel_kv": kv_c,
         "sel_idx": idx}
    return t, 4.0 * s * heads * D * (128 + topk)


def _decode(b: int = 64, heads: int = 64, topk: int = 512):
    q, kv_w, kv_c, idx, sink, pos = _csa_decode_inputs(b, heads, topk)
    t = {"q": q, "positions": pos, "sink": sink, "window_kv": kv_w, "sel_kv": kv_c, "sel_idx": idx}
    return t, b * (128 + topk) * D * 2


def _hca(s: int = 65536, heads: int = 64):
    q, kv_w, kv_c, sink, pos, start, keys = _hca_prefill_inputs(s, heads)
    t = {"q": q, "positions": pos, "sink": sink, "window_kv": kv_w, "window_start": start, "comp_kv": kv_c}
    return t, 4.0 * heads * D * keys


def _cases(which: str) -> list[tuple]:
    """(name, inputs, spec, split counts, reps, is_decode) of the chosen cases."""
    out = []
    if which in ("all", "prefill"):
        out.append(("flash_prefill", lambda: _prefill(64, 512), lambda: csa_spec(64), [None], 20, False))
    if which == "all":
        out.append(("pro_prefill", lambda: _prefill(128, 1024), lambda: csa_spec(128), [None], 10, False))
    if which in ("all", "decode"):
        splits = [None, 2, 3, 5] if which == "all" else [None]
        out.append(("decode", _decode, lambda: csa_spec(64, ring=True), splits, 50, True))
    if which == "all":
        out.append(("hca_prefill_65536", _hca, lambda: hca_spec(64), [None], 5, False))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedules", default="ws,seesaw", help="comma-separated schedules (the first is the baseline)")
    ap.add_argument("--cases", default="all", choices=("all", "prefill", "decode"))
    ap.add_argument("--json", default=None, help="write the timings here")
    args = ap.parse_args()
    scheds = args.schedules.split(",")
    peaks = measure_peaks() if args.cases == "all" else {}
    print("peaks", peaks, flush=True)
    cases = _cases(args.cases)
    kernels = {(c[0], s): AttentionKernel(c[2](), AttentionConfig(schedule=s)) for c in cases for s in scheds}
    inputs = {c[0]: c[1]() for c in cases}
    jobs = []
    for name, _, _, splits, _, _ in cases:
        t, _ = inputs[name]
        b, s = t["q"].shape[:2]
        for sch in scheds:
            k = kernels[(name, sch)]
            for ns in splits:
                plan = k.plan(b, s, k.source_keys(t), num_splits=ns)
                jobs.append((k, plan.kind, plan.config))
                if plan.combine is not None:
                    jobs.append((k, "combine", plan.combine))
    t0 = time.time()
    with cf.ThreadPoolExecutor(12) as ex:
        list(ex.map(lambda j: j[0].compiled(j[1], j[2]), jobs))
    print(f"compiled {len(jobs)} programs in {time.time() - t0:.0f}s", flush=True)

    results = {}
    for name, _, _, splits, reps, is_decode in cases:
        t, amount = inputs[name]
        src = {k: v for k, v in t.items() if k not in ("q", "positions", "sink")}
        outs = {}
        for sch in scheds:
            k = kernels[(name, sch)]
            for ns in splits:
                o = torch.full_like(t["q"], float("nan"))

                def fn(k=k, ns=ns, o=o, t=t, src=src):
                    return k(t["q"], t["positions"], t["sink"], num_splits=ns, validate=False, out=o, **src)

                fn()
                torch.cuda.synchronize()
                outs[(sch, ns)] = o.clone()
                ms = time_cuda(fn, warmup=3, reps=reps, graph=is_decode)
                frac = None
                if peaks:
                    frac = (amount / ms / 1e6 / peaks["copy_gbps"] if is_decode
                            else amount / ms / 1e9 / peaks["bf16_matmul_tflops"])
                results[f"{name}/{sch}/splits={ns}"] = {"ms": ms, "frac": frac}
                print(f"{name:20s} {sch:7s} splits={ns}  {ms:.4f} ms  frac={frac}", flush=True)
        base = outs[(scheds[0], splits[0])].float()
        for key, o in outs.items():
            diff = (o.float() - base).abs().max().item()
            print(f"   {name} {key} vs {scheds[0]}: nan={torch.isnan(o).sum().item()} maxdiff={diff:.4g}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peaks": peaks, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
