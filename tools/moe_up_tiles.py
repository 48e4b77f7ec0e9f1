"""The bf16 routed up-projection with its own 192-row tile table against the 128-row table: bits and time.

Routings: the benchmark's (``tilev4 bench moe``: random gate and bias; experts of very different sizes) at several
token counts, and balanced ones (exactly R rows an expert: 256 experts, top-8, token t takes experts 8t .. 8t+7 mod
256). Both programs run in one process on the same permutation, outputs NaN-poisoned before each launch; times are
CUDA-event medians of CUDA-graph replays after an L2 flush (:func:`tilev4.bench.time_cuda`). Prints one JSON object.

    python3 tools/moe_up_tiles.py [--json PATH]
"""

import argparse
import importlib
import json

import torch


def main() -> None:
    from tilev4.bench import time_cuda
    from tilev4.bench.moe import DIM, LIMIT, NUM_EXPERTS, ROUTE_SCALE, TOP_K, _layer
    K = importlib.import_module("tilev4.kernels.moe")  # the module (the package exports the op under its name)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    layer = _layer(gen)
    w1, w3 = layer["w1"], layer["w3"]
    cases = []
    for t in (8192, 4096, 16384):
        x = torch.randn(t, DIM, generator=gen, device="cuda").bfloat16()
        weights, experts = K.moe_route(x, layer["gate"], layer["bias"], TOP_K, ROUTE_SCALE)
        cases.append((f"benchmark routing, {t} tokens", x, weights, experts))
    for rows in (192, 160, 256):
        t = NUM_EXPERTS * rows // 8
        x = torch.randn(t, DIM, generator=gen, device="cuda").bfloat16()
        experts = ((torch.arange(t, device="cuda")[:, None] * 8 + torch.arange(8, device="cuda")) % NUM_EXPERTS)
        weights = torch.rand(t, 8, generator=gen, device="cuda") + 0.1
        cases.append((f"balanced, {rows} rows an expert", x, weights, experts.int()))
    out = {}
    for name, x, weights, experts in cases:
        res = {}
        hs = {}
        for bm in (128, 192):
            perm = K.moe_permute(x, weights, experts, NUM_EXPERTS, up_block_m=bm)
            h = torch.full((perm.x_sorted.shape[0], w1.shape[1]), float("nan"), device="cuda", dtype=torch.bfloat16)
            K.moe_up(perm, w1, w3, LIMIT, out=h)
            torch.cuda.synchronize()
            hs[bm] = h.clone()
            res[f"up_ms_{bm}"] = time_cuda(lambda perm=perm, h=h: K.moe_up(perm, w1, w3, LIMIT, out=h), graph=True)
            counts = perm.counts
        res["ratio_192_over_128"] = res["up_ms_192"] / res["up_ms_128"]
        res["bits_equal"] = bool(torch.equal(hs[128].view(torch.int16), hs[192].view(torch.int16)))
        res["nan"] = bool(torch.isnan(hs[192]).any())
        res["experts_129_192_rows"] = int(((counts > 128) & (counts <= 192)).sum())
        out[name] = res
        print(name, res, flush=True)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
