"""How the bf16 routed path's speed follows the skew of its routing: the router's bias scaled from 0 up.

``tilev4 bench moe`` times the V4-Flash prefill (8192 tokens) on a random gate with a random bias (standard deviation
0.1), which loads the experts from a few rows to ~1100, and on a balanced routing (192 rows each). This sweep keeps
the benchmark's layer and tokens and scales its bias: ``bias = s · b`` for each ``s`` of ``--bias-scales`` (1 is the
benchmark's routing, 0 the router's own load on random tokens). For each routing it reports the rows an expert gets
(:func:`tilev4.bench.moe.routing_stats`) and the routed path's time (up with SwiGLU + down, the default tile table,
:func:`tilev4.bench.moe.routed_path`) as a fraction of the bf16 matmul peak measured in the same run. The routings
are timed in turn, the order reversed every other round (:func:`tilev4.bench.time_in_turn`).

    python3 tools/moe_skew.py [--bias-scales 0,0.25,0.5,1] [--tokens 8192] [--rounds 4] [--json PATH]
    python3 tools/moe_skew.py --balanced-rows 129,150,171,192,213,234,255   # balanced routings of R rows an expert

``--balanced-rows`` times balanced routings instead (:func:`tilev4.bench.moe.balanced_routing`: every expert gets
exactly R rows, ``R·E/k`` tokens, R a multiple of 3 at V4-Flash's E = 256 and k = 6): where the routing's skew
is gone, what is left is how R fills the 64-row slabs and the tile table.
"""

import argparse
import importlib
import json
import sys


def parse_scales(text: str) -> list[float]:
    """``"0,0.5,1"`` → ``[0.0, 0.5, 1.0]``: at least one scale, each finite and >= 0."""
    try:
        scales = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--bias-scales must be comma-separated numbers, got {text!r}") from None
    if not scales or any(not (s >= 0 and s < float("inf")) for s in scales):
        raise ValueError(f"--bias-scales must list finite scales >= 0, got {text!r}")
    return scales


def parse_rows(text: str, num_experts: int = 256, top_k: int = 6) -> list[int]:
    """``"129,192"`` → ``[129, 192]``: rows an expert, each >= 1 with ``R·num_experts/top_k`` a whole token count."""
    try:
        rows = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--balanced-rows must be comma-separated integers, got {text!r}") from None
    bad = [r for r in rows if r < 1 or (r * num_experts) % top_k]
    if not rows or bad:
        raise ValueError(f"--balanced-rows must list rows >= 1 with rows*{num_experts}/{top_k} a whole number of "
                         f"tokens, got {text!r}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bias-scales", default="0,0.25,0.5,1", help="comma-separated factors of the benchmark's bias")
    ap.add_argument("--balanced-rows", help="comma-separated rows an expert: balanced routings instead")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", help="write the report here too")
    args = ap.parse_args(argv)
    try:
        scales = parse_scales(args.bias_scales)
        balanced = parse_rows(args.balanced_rows) if args.balanced_rows else None
    except ValueError as exc:
        ap.error(str(exc))
    if args.tokens < 1 or args.rounds < 1:
        ap.error(f"--tokens and --rounds must be >= 1, got {args.tokens} and {args.rounds}")

    import torch

    from tilev4.bench import measure_peaks, time_in_turn
    from tilev4.bench import moe as bm

    if not torch.cuda.is_available():
        print("moe_skew: needs a CUDA GPU", file=sys.stderr)
        return 2
    K = importlib.import_module("tilev4.kernels.moe")
    gen = torch.Generator(device="cuda").manual_seed(0)
    layer = bm._layer(gen)  # the benchmark's layer and first tokens: scale 1 is its routing
    x = torch.randn(args.tokens, bm.DIM, generator=gen, device="cuda").bfloat16()
    peaks = measure_peaks()
    paths, rows = [], []
    cases = [("rows_per_expert", r) for r in balanced] if balanced else [("bias_scale", s) for s in scales]
    for key, value in cases:
        if key == "bias_scale":
            xt = x
            weights, experts = K.moe_route(x, layer["gate"], layer["bias"] * value, bm.TOP_K, bm.ROUTE_SCALE)
        else:
            xt = torch.randn(value * bm.NUM_EXPERTS // bm.TOP_K, bm.DIM, generator=gen, device="cuda").bfloat16()
            weights, experts = bm.balanced_routing(xt.shape[0], bm.NUM_EXPERTS, bm.TOP_K, gen)
        p = bm.routed_path(K, xt, weights, experts, layer["w1"], layer["w2"], layer["w3"])
        p.routed()
        paths.append(p)
        rows.append({key: value, "tokens": xt.shape[0],
                     "up_block_m": p.perm.up_tiles[0] if p.perm.up_tiles else K.BLOCK_M,
                     **bm.routing_stats(p.perm.counts)})
    ms = time_in_turn([p.routed for p in paths], rounds=args.rounds)
    for row, t, p in zip(rows, ms, paths):
        flops = 6.0 * row["tokens"] * bm.TOP_K * bm.DIM * bm.INTER
        row.update(ms=t, fraction_of_bf16_peak=flops / t / 1e9 / peaks["bf16_matmul_tflops"],
                   has_nan=bool(torch.isnan(p.y).any()))
    report = {"rounds": args.rounds, "peaks": peaks, "rows": rows}
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
