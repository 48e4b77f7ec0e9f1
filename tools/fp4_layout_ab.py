"""A/B of the FP4 weight layouts on the GPU: the routed FP4 path of ``tilev4 bench moe`` (quantise x, up, quantise h,
down; V4-Flash dims, 256 experts, top-6) with the weights prepared (:func:`tilev4.kernels.moe_fp4.prepare_fp4_weight`)
and in the checkpoint layout, timed in turn (the order reversed every other round, L2 flushed; CUDA graphs at decode
sizes), their outputs compared bit for bit, against the copy bandwidth and matmul peak measured in the same run.

    python3 tools/fp4_layout_ab.py --json $OUT/fp4_layout_ab.json [--tokens 64,8192] [--rounds 5]

The same rows as ``tilev4 bench moe``'s FP4 rows without the rest of that benchmark (its bf16 and FP8 paths).
"""

import argparse
import importlib
import json
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="64,8192", help="token counts (comma-separated)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of timing in turn")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        tokens = []
    if not tokens or min(tokens) < 1:
        ap.error(f"--tokens must be positive integers separated by commas, got {args.tokens!r}")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if not torch.cuda.is_available():
        print("fp4_layout_ab: needs a CUDA GPU", file=sys.stderr)
        return 2

    from tilev4.bench import measure_peaks
    from tilev4.bench import moe as B
    from tilev4.kernels import fp8_quantize
    from tilev4.kernels.moe_fp4 import prepare_fp4_weight, quantize_fp4_weight

    K = importlib.import_module("tilev4.kernels.moe")
    peaks = measure_peaks()
    gen = torch.Generator(device="cuda").manual_seed(0)
    layer = B._layer(gen)
    checkpoint = tuple(quantize_fp4_weight(layer[k]) for k in ("w1", "w2", "w3"))
    t0 = time.perf_counter()
    layouts = (tuple(prepare_fp4_weight(w) for w in checkpoint), checkpoint)
    torch.cuda.synchronize()
    prepare_s = time.perf_counter() - t0
    del layer["w1"], layer["w2"], layer["w3"]
    rows = []
    for num_tokens in tokens:
        x = torch.randn(num_tokens, B.DIM, generator=gen, device="cuda").bfloat16()
        weights, experts = K.moe_route(x, layer["gate"], layer["bias"], B.TOP_K, B.ROUTE_SCALE)
        perm = K.moe_permute(x, weights, experts, B.NUM_EXPERTS, payload=fp8_quantize(x)[0])
        quant_x = B._quantize_tokens(x, perm)
        n = perm.x_sorted.shape[0]
        touched = int((perm.counts > 0).sum().item())
        shape = f"T={num_tokens} dim={B.DIM} inter={B.INTER} E={B.NUM_EXPERTS} k={B.TOP_K}"
        # the benchmark's own FP4 rows: prepared first, then the checkpoint layout, timed in turn, bits compared
        recs = B._bench_fp4(perm, quant_x, layouts, num_tokens <= 256, float("nan"), float("nan"),
                            6.0 * n * B.DIM * B.INTER, touched, shape, peaks, rounds=args.rounds)
        for rec in recs:
            del rec["speedup_vs_bf16"], rec["speedup_vs_fp8"]
        recs[0]["prepared_over_checkpoint"] = recs[0]["ms"] / recs[1]["ms"]
        for rec in recs:
            print(json.dumps(rec), flush=True)
        rows += recs
    report = {"peaks": peaks, "prepare_seconds_all_experts": prepare_s, "rounds": args.rounds, "records": rows,
              "gpu": torch.cuda.get_device_name()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
