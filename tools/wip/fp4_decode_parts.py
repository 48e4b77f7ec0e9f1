"""FP4 decode (64 tokens, V4-Flash dims) by parts, prepared weights: up-projection, quantise h, down-projection,
each timed alone (CUDA graphs, L2 flushed), against the copy bandwidth of the same run (a probe, session 50).

    python3 tools/wip/fp4_decode_parts.py $OUT/fp4_decode_parts.json
"""
import importlib
import json
import sys

import torch

from tilev4.bench import measure_peaks, time_cuda
from tilev4.bench import moe as B
from tilev4.kernels import fp8_quantize
from tilev4.kernels.moe_fp4 import moe_down_fp4, moe_up_fp4, prepare_fp4_weight, quantize_fp4_weight

K = importlib.import_module("tilev4.kernels.moe")
peaks = measure_peaks()
gen = torch.Generator(device="cuda").manual_seed(0)
layer = B._layer(gen)
q1, q2, q3 = (prepare_fp4_weight(quantize_fp4_weight(layer[k])) for k in ("w1", "w2", "w3"))
x = torch.randn(64, B.DIM, generator=gen, device="cuda").bfloat16()
weights, experts = K.moe_route(x, layer["gate"], layer["bias"], B.TOP_K, B.ROUTE_SCALE)
perm = K.moe_permute(x, weights, experts, B.NUM_EXPERTS, payload=fp8_quantize(x)[0])
xs = B._quantize_tokens(x, perm)()
touched = int((perm.counts > 0).sum().item())
h = moe_up_fp4(perm, perm.x_sorted, xs, q1, q3, B.LIMIT)
h8, hs = fp8_quantize(h)
y = moe_down_fp4(perm, h8, hs, q2)
per = {n: w.data[0].numel() + w.scale[0].numel() for n, w in (("up", q1), ("down", q2))}
rows = {
    "up": (time_cuda(lambda: moe_up_fp4(perm, perm.x_sorted, xs, q1, q3, B.LIMIT, out=h), graph=True), 2 * per["up"]),
    "quantise h": (time_cuda(lambda: fp8_quantize(h), graph=True), 0),
    "down": (time_cuda(lambda: moe_down_fp4(perm, h8, hs, q2, out=y), graph=True), per["down"]),
}
out = {"peaks": peaks, "touched": touched, "rows": {}}
for k, (ms, b) in rows.items():
    out["rows"][k] = {"ms": ms, "fraction_of_copy_bw": (touched * b / ms / 1e6) / peaks["copy_gbps"] if b else None}
print(json.dumps(out))
json.dump(out, open(sys.argv[1], "w"), indent=1)
