"""The bf16 routed path with its 192-row table (both GEMMs) against the 128-row table: bits and time, alternating.

Routings: the benchmark's (``tilev4 bench moe``: random gate and bias; experts of very different sizes) at several
token counts, and balanced ones (exactly R rows an expert, :func:`tilev4.bench.moe.balanced_routing`). Both tables run
in one process on the same routing, outputs NaN-poisoned before the first launch. Each round times both, the first of
the pair alternating between rounds (so that neither always runs after the other); times are CUDA-event medians after
an L2 flush (:func:`tilev4.bench.time_cuda`) of the up-projection alone (CUDA-graph replays) and of up + down. Prints
one line a case and one JSON object (per-round times, and medians of the per-round ratios 192 / 128).

    python3 tools/moe_up_tiles.py [--rounds N] [--tokens 8192 ...] [--balanced-rows 192 ...] [--json PATH]
"""

import argparse
import importlib
import json
import statistics

import torch


def main() -> None:
    from tilev4.bench import time_cuda
    from tilev4.bench.moe import DIM, NUM_EXPERTS, ROUTE_SCALE, TOP_K, _layer, balanced_routing, routed_path
    K = importlib.import_module("tilev4.kernels.moe")  # the module (the package exports the op under its name)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="rounds of both tables, alternating which runs first")
    ap.add_argument("--tokens", type=int, nargs="*", default=[8192, 4096, 16384], help="the benchmark's routing")
    ap.add_argument("--balanced-rows", type=int, nargs="*", default=[192, 168, 240],
                    help="rows an expert (multiples of 3, T = 256·R/6 tokens)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    layer = _layer(gen)
    w1, w2, w3 = layer["w1"], layer["w2"], layer["w3"]
    cases = []
    for t in args.tokens:
        x = torch.randn(t, DIM, generator=gen, device="cuda").bfloat16()
        weights, experts = K.moe_route(x, layer["gate"], layer["bias"], TOP_K, ROUTE_SCALE)
        cases.append((f"benchmark routing, {t} tokens", x, weights, experts))
    for rows in args.balanced_rows:
        t = NUM_EXPERTS * rows // TOP_K
        x = torch.randn(t, DIM, generator=gen, device="cuda").bfloat16()
        cases.append((f"balanced, {rows} rows an expert", x, *balanced_routing(t, NUM_EXPERTS, TOP_K, gen)))
    out = {}
    for name, x, weights, experts in cases:
        runs, outs = {}, {}
        for bm in (128, 192):
            path = routed_path(K, x, weights, experts, w1, w2, w3, bm)
            path.routed()
            torch.cuda.synchronize()
            outs[bm] = (path.h.clone(), path.y.clone())
            runs[bm] = (path.up, path.routed)
            counts = path.perm.counts
        res = {"up_ms": {128: [], 192: []}, "routed_ms": {128: [], 192: []}}
        for r in range(args.rounds):
            for bm in ((128, 192) if r % 2 == 0 else (192, 128)):
                up, routed = runs[bm]
                res["up_ms"][bm].append(time_cuda(up, graph=True))
                res["routed_ms"][bm].append(time_cuda(routed))
        for what in ("up", "routed"):
            ms = res[f"{what}_ms"]
            res[f"{what}_ratio_192_over_128"] = statistics.median(a / b for a, b in zip(ms[192], ms[128]))
        res["bits_equal"] = all(torch.equal(a.view(torch.int16), b.view(torch.int16))
                                for a, b in zip(outs[128], outs[192]))
        res["nan"] = any(bool(torch.isnan(t).any()) for t in outs[192])
        res["experts_129_192_rows"] = int(((counts > 128) & (counts <= 192)).sum())
        out[name] = res
        print(name, {k: v for k, v in res.items() if not k.endswith("_ms")}, flush=True)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
