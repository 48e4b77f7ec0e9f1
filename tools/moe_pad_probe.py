"""What the bf16 routed path's padding rows cost when they hold zeros instead of the next expert's rows.

The bf16 expert GEMMs run every 64-row slab of a tile as m64 wgmma, so an expert's last, partly filled slab computes
its padding rows too: in the packed layout of :func:`tilev4.kernels.moe.moe_permute` those are the first rows of the
next expert (real data, masked at the store). The GEMMs run power-limited on the H200, and a product of zeros draws
less power than one of random data, so zero padding rows might buy clock. This probe times, on the benchmark's routing
(``tilev4 bench moe``: random gate and bias, 8192 tokens by default), alternating rounds of:

* ``packed``: the shipped path (:func:`tilev4.bench.moe.routed_path`, 192-row table);
* ``aligned_zero``: every expert's segment padded to a multiple of 64 rows with zero rows of routing weight 0 (built
  by permuting the (token, slot) pairs as one-slot tokens plus the padding rows, each assigned to its expert), so the
  GEMMs run the same slabs and the padding rows are zeros in x and, through the weight 0, in h;
* ``aligned_random``: the same layout with random padding rows and weights (the layout without the zeros);
* ``zero_x``: the packed path on all-zero x (a ceiling of what data-dependent power can give).

The real rows of ``aligned_zero`` must equal ``packed``'s bit for bit (a row's reduction does not depend on its
neighbours). Prints one JSON object (medians of per-round ratios to ``packed``).

    python3 tools/moe_pad_probe.py [--tokens 8192] [--rounds 6] [--json PATH]
"""

import argparse
import importlib
import json
import statistics

import torch


def aligned_inputs(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, num_experts: int, zero: bool,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-slot routing whose permutation pads each expert to whole 64-row slabs: ``(x', weights', experts',
    pair_rows)`` where ``pair_rows[t·k + s]`` is the one-slot token of pair (t, s)."""
    num_tokens, top_k = experts.shape
    x_pairs = x.repeat_interleave(top_k, dim=0)
    counts = torch.bincount(experts.view(-1).long(), minlength=num_experts)
    pad = (-counts) % 64
    pad_experts = torch.repeat_interleave(torch.arange(num_experts, device=x.device), pad)
    p = pad_experts.numel()
    if zero:
        x_pad = torch.zeros(p, x.shape[1], device=x.device, dtype=x.dtype)
        w_pad = torch.zeros(p, device=x.device)
    else:
        x_pad = torch.randn(p, x.shape[1], generator=gen, device=x.device).to(x.dtype)
        w_pad = torch.rand(p, generator=gen, device=x.device) * 0.5
    xs = torch.cat([x_pairs, x_pad]).contiguous()
    ws = torch.cat([weights.reshape(-1), w_pad]).view(-1, 1).contiguous()
    es = torch.cat([experts.reshape(-1).long(), pad_experts]).to(torch.int32).view(-1, 1).contiguous()
    return xs, ws, es, torch.arange(num_tokens * top_k, device=x.device)


def main() -> None:
    from tilev4.bench import time_cuda
    from tilev4.bench.moe import DIM, NUM_EXPERTS, ROUTE_SCALE, TOP_K, _layer, routed_path
    K = importlib.import_module("tilev4.kernels.moe")

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    layer = _layer(gen)
    w1, w2, w3 = layer["w1"], layer["w2"], layer["w3"]
    x = torch.randn(args.tokens, DIM, generator=gen, device="cuda").bfloat16()
    weights, experts = K.moe_route(x, layer["gate"], layer["bias"], TOP_K, ROUTE_SCALE)
    bm = 192
    paths = {"packed": routed_path(K, x, weights, experts, w1, w2, w3, bm)}
    for name, zero in (("aligned_zero", True), ("aligned_random", False)):
        xs, ws, es, _ = aligned_inputs(x, weights, experts, NUM_EXPERTS, zero, gen)
        paths[name] = routed_path(K, xs, ws, es, w1, w2, w3, bm)
    paths["zero_x"] = routed_path(K, torch.zeros_like(x), weights, experts, w1, w2, w3, bm)
    for p in paths.values():
        p.routed()
    torch.cuda.synchronize()
    packed, az = paths["packed"], paths["aligned_zero"]
    rows_packed = packed.perm.pair_pos.view(-1).long()
    # one-slot token t·k + s is pair (t, s); the padding rows' tokens follow the pairs
    rows_aligned = az.perm.pair_pos.view(-1)[: rows_packed.numel()].long()
    out = {
        "tokens": args.tokens,
        "rows": {k: int(p.perm.offsets[-1]) for k, p in paths.items()},
        "slabs": {k: int(((p.perm.counts + 63) // 64).sum()) for k, p in paths.items()},
        "bits_equal_h": torch.equal(packed.h[rows_packed].view(torch.int16), az.h[rows_aligned].view(torch.int16)),
        "bits_equal_y": torch.equal(packed.y[rows_packed].view(torch.int16), az.y[rows_aligned].view(torch.int16)),
        "nan": any(bool(torch.isnan(p.y[: int(p.perm.offsets[-1])]).any()) for p in paths.values()),
    }
    names = list(paths)
    times = {n: {"up": [], "routed": []} for n in names}
    for r in range(args.rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n]["up"].append(time_cuda(paths[n].up, graph=True))
            times[n]["routed"].append(time_cuda(paths[n].routed))
    for what in ("up", "routed"):
        out[f"{what}_ms"] = {n: statistics.median(times[n][what]) for n in names}
        out[f"{what}_ratio"] = {n: statistics.median(a / b for a, b in zip(times[n][what], times["packed"][what]))
                                for n in names}
    out["times"] = times
    print(json.dumps({k: v for k, v in out.items() if k != "times"}, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
