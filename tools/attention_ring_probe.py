"""Time the seesaw schedule with a ring of two block pairs (32-key blocks) against the default (one pair of
64-key blocks) on the benchmark shapes, on the GPU.

    python3 tools/attention_ring_probe.py --json $OUT/ring.json

Builds both main programs directly (registry and tuned records bypassed), compiles them in parallel, times
V4-Flash / V4-Pro CSA prefill, V4-Flash CSA decode (b = 64, CUDA graph) and HCA prefill (s = 65536) as
CUDA-event medians with the L2 flushed, and prints the max |difference| between the two outputs (bf16 P
rounding differs with the block size, so they are close, not equal) and their NaN counts.
"""

import argparse
import concurrent.futures as cf
import json

import torch
from attention_schedules import _decode, _hca, _prefill

from tilev4.bench import measure_peaks, time_cuda
from tilev4.dsl import AttentionKernel
from tilev4.dsl.codegen import AttentionConfig
from tilev4.kernels.attention import csa_spec, hca_spec

CONFIGS = {"default": AttentionConfig(), "ring2_bi32": AttentionConfig(block_kv=32, pair_stages=2),
           "bi32": AttentionConfig(block_kv=32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cases = [("flash_prefill", csa_spec(64), lambda: _prefill(64, 512), 20, False),
             ("pro_prefill", csa_spec(128), lambda: _prefill(128, 1024), 10, False),
             ("flash_decode_b64", csa_spec(64, ring=True), _decode, 50, True),
             ("hca_prefill_65536", hca_spec(64), _hca, 5, False)]
    kernels = {(name, c): AttentionKernel(spec, cfg) for name, spec, *_ in cases for c, cfg in CONFIGS.items()}
    with cf.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda kc: kc[1].compiled("main", CONFIGS[kc[0][1]]), kernels.items()))
    peaks = measure_peaks()
    out = {"peaks": peaks, "cases": {}}
    for name, spec, make, reps, decode in cases:
        t, _amount = make()
        src = [t[n] for s in spec.sources for n in s.tensor_names()]
        head = [t["q"], t["positions"], t["sink"]]
        res, outs = {}, {}
        for c in CONFIGS:
            o = torch.full_like(t["q"], float("nan"))
            fn = kernels[(name, c)].compiled("main", CONFIGS[c])
            args = head + src + [o]
            call = lambda fn=fn, args=args: fn(*args)  # noqa: E731
            call()
            torch.cuda.synchronize()
            outs[c] = o.clone()
            res[f"{c}_ms"] = time_cuda(call, warmup=3, reps=reps, graph=decode)
            res[f"{c}_nan"] = int(torch.isnan(o).sum())
        for c in CONFIGS:
            res[f"{c}_maxdiff"] = float((outs[c].float() - outs["default"].float()).abs().max())
        out["cases"][name] = res
        print(name, json.dumps({k: round(v, 4) for k, v in res.items()}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
