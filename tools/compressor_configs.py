"""Time compressor prefill configs against each other on the GPU, at the shapes of ``tilev4 bench compressor``.

    python3 tools/compressor_configs.py --json $OUT/compressor_configs.json
    python3 tools/compressor_configs.py --variant 128 --configs '[{"schedule": "stream", "block_entries": 1,
        "entry_steps": 2, "num_stages": 2}]'

For each variant (m = 4 / D = 512 attention, m = 128 / D = 512 attention, m = 4 / D = 128 indexer; one sequence
of s = 65536 tokens from position 0, bf16 kv' and gate, bf16 cache) it times the public op as the benchmark does
(the config the tuned records pick), then the kernel alone for every config given (``--configs``: a JSON list of
the tunable keys; default: a few of each schedule), built through the registry with those keys, as CUDA-graph
replays with the L2 flushed (CUDA-event medians). The cache is poisoned with NaN before each config's first
launch and compared bit for bit with the first config's (every config must give the same bits). Bytes are those
of the benchmark (kv' and gate read, the entries and the new state written), as a fraction of the copy bandwidth
measured in the same run.
"""

import argparse
import json

import torch

import tilev4.kernels.compressor as C
from tilev4.bench import measure_peaks, time_cuda
from tilev4.bench.compressor import PREFILL_TOKENS, VARIANTS, _params
from tilev4.kernels.registry import compile_kernel
from tilev4.reference.compressor import CompressorState

DEFAULT_CONFIGS = {
    4: [{"schedule": "stream", "block_entries": e, "entry_steps": s, "num_stages": 2}
        for e, s in ((2, 1), (8, 1), (8, 4))]
    + [{"schedule": "direct", "block_entries": 4, "entry_steps": 1, "num_stages": 2}],
    128: [{"schedule": "stream", "block_entries": 1, "entry_steps": s, "num_stages": 2} for s in (1, 2)]
    + [{"schedule": "direct", "block_entries": e, "entry_steps": 1, "num_stages": 2} for e in (1, 2)],
}


def _inputs(ratio: int, d: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(ratio + d)
    c = (2 if ratio == 4 else 1) * d
    kv = torch.randn(1, PREFILL_TOKENS, c, generator=g, device="cuda").bfloat16()
    gate = (2 * torch.randn(1, PREFILL_TOKENS, c, generator=g, device="cuda")).bfloat16()
    ape, weight = _params(ratio, d, g)
    return kv, gate, ape, weight


def run_variant(ratio: int, d: int, quant: str, configs: list[dict], copy_gbps: float) -> list[dict]:
    kv, gate, ape, weight = _inputs(ratio, d)
    s, c = PREFILL_TOKENS, kv.shape[-1]
    nbytes = 2 * kv.numel() * 2 + (s // ratio) * d * 2 + (4 if ratio == 4 else 2) * ratio * c * 4
    rows = []

    def row(what: str, ms: float, **extra) -> None:
        rows.append({"m": ratio, "D": d, "quant": quant, "config": what, "ms": ms,
                     "fraction_of_copy_bw": nbytes / ms / 1e6 / copy_gbps, **extra})
        print(json.dumps(rows[-1]), flush=True)

    cache = torch.empty(1, s // ratio, d, dtype=torch.bfloat16, device="cuda")
    state = CompressorState.empty(1, ratio, d, "cuda")
    row("op (tuned)", time_cuda(lambda: C.compress_prefill(kv, gate, ape, weight, cache, ratio, quant=quant,
                                                           state=state, validate=False), graph=True))
    freqs = C._frequencies(C._COMPRESSED_ROPE, "cuda")
    first = None
    for cfg in configs:
        kernel = compile_kernel("compressor_prefill", {"ratio": ratio, "D": d, "quant": quant, **cfg})
        cache = torch.full((1, s // ratio, d), float("nan"), dtype=torch.bfloat16, device="cuda")
        st = CompressorState.empty(1, ratio, d, "cuda")
        prev = C._prev_or_dummy(st.prev_kv, 1, c, kv.device), C._prev_or_dummy(st.prev_score, 1, c, kv.device)
        kargs = (kv, gate, ape, weight, freqs, st.num_tokens, st.kv, st.score, *prev, cache,
                torch.empty_like(st.kv), torch.empty_like(st.score), *(torch.empty_like(p) for p in prev),
                torch.empty_like(st.num_tokens))
        kernel(*kargs)
        torch.cuda.synchronize()
        bits = cache.view(torch.int16).clone()
        same = None if first is None else bool(torch.equal(bits, first))
        first = bits if first is None else first
        row(json.dumps(cfg, sort_keys=True), time_cuda(lambda k=kernel, a=kargs: k(*a), graph=True), same_bits=same,
            nan=bool(torch.isnan(cache).any()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=("4", "128", "indexer", "all"), default="all")
    ap.add_argument("--configs", help="JSON list of tunable-key dicts (default: a few of each schedule)")
    ap.add_argument("--json", help="write the rows and the same-run peaks here")
    args = ap.parse_args()
    pick = {"4": (4, 512, "attention"), "128": (128, 512, "attention"), "indexer": (4, 128, "indexer")}
    variants = VARIANTS if args.variant == "all" else [pick[args.variant]]
    configs = None
    if args.configs:
        try:
            configs = json.loads(args.configs)
        except ValueError as e:
            raise SystemExit(f"--configs is not JSON ({e}): {args.configs!r}") from None
        if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
            raise SystemExit(f"--configs must be a JSON list of objects, got {args.configs!r}")
    if not torch.cuda.is_available():
        raise SystemExit("compressor_configs needs a CUDA GPU")
    peaks = measure_peaks()
    rows = []
    for ratio, d, quant in variants:
        rows += run_variant(ratio, d, quant, configs or DEFAULT_CONFIGS[ratio], peaks["copy_gbps"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peaks": peaks, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
