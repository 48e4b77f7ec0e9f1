"""How the bf16 routed path's speed follows the skew of its routing: the router's bias scaled from 0 up.

``tilev4 bench moe`` times the V4-Flash prefill (8192 tokens) on a random gate with a random bias (standard deviation
0.1), which loads the experts from a few rows to ~1100, and on a balanced routing (192 rows each). This sweep keeps
the benchmark's layer and tokens and scales its bias: ``bias = s · b`` for each ``s`` of ``--bias-scales`` (1 is the
benchmark's routing, 0 the router's own load on random tokens). For each routing it reports the rows an expert gets
(:func:`tilev4.bench.moe.routing_stats`) and the routed path's time (up with SwiGLU + down, the default tile table,
:func:`tilev4.bench.moe.routed_path`) as a fraction of the bf16 matmul peak measured in the same run. The routings
are timed in turn, the order reversed every other round (:func:`tilev4.bench.time_in_turn`).

    python3 tools/moe_skew.py [--bias-scales 0,0.25,0.5,1] [--tokens 8192] [--rounds 4] [--json PATH]
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bias-scales", default="0,0.25,0.5,1", help="comma-separated factors of the benchmark's bias")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", help="write the report here too")
    args = ap.parse_args(argv)
    try:
        scales = parse_scales(args.bias_scales)
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
    for s in scales:
        weights, experts = K.moe_route(x, layer["gate"], layer["bias"] * s, bm.TOP_K, bm.ROUTE_SCALE)
        p = bm.routed_path(K, x, weights, experts, layer["w1"], layer["w2"], layer["w3"])
        p.routed()
        paths.append(p)
        rows.append({"bias_scale": s, "up_block_m": p.perm.up_tiles[0] if p.perm.up_tiles else K.BLOCK_M,
                     **bm.routing_stats(p.perm.counts)})
    ms = time_in_turn([p.routed for p in paths], rounds=args.rounds)
    flops = 6.0 * args.tokens * bm.TOP_K * bm.DIM * bm.INTER
    for row, t, p in zip(rows, ms, paths):
        row.update(ms=t, fraction_of_bf16_peak=flops / t / 1e9 / peaks["bf16_matmul_tflops"],
                   has_nan=bool(torch.isnan(p.y).any()))
    report = {"tokens": args.tokens, "rounds": args.rounds, "peaks": peaks, "rows": rows}
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
