"""Benchmarks of the fused compressor kernels (``tilev4 bench compressor``).

Prefill: one sequence of s = 65536 tokens from position 0 (bf16 kv' and gate, bf16 cache) for the
attention compressors (D = 512, m = 4 and m = 128) and the indexer compressor (D = 128, m = 4). Bytes
counted: kv' and gate read once, the entries written, the new streaming state written; reported against
the same-run copy bandwidth (target 0.7: the pooling is memory-bound).

Decode: one step of b = 64 sequences at ragged positions (CUDA-graph replays, so only GPU time counts;
each replay advances every sequence by one token, emitting for ~1/m of them). Bytes counted per step, on
average: the new rows read and written into the state, plus for the 1/m emitting sequences the pooled
state rows read, the entry written and the state rotation written. A step this small is latency-bound:
the GB/s is informative, the ms is the figure that matters.
"""

from typing import Any

import torch

from tilev4.bench import benchmark, record, time_cuda

__all__ = ["bench_compressor"]

VARIANTS = [(4, 512, "attention"), (128, 512, "attention"), (4, 128, "indexer")]
PREFILL_TOKENS = 65536
DECODE_BATCH = 64
DECODE_MAX_POS = 8192
TARGET = 0.7


def _params(ratio: int, d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    coff = 2 if ratio == 4 else 1
    ape = torch.randn(ratio, coff * d, generator=g, device="cuda")
    weight = 0.5 + torch.rand(d, generator=g, device="cuda")
    return ape, weight


def _bench_prefill(ratio: int, d: int, quant: str, peaks: dict[str, float]) -> dict[str, Any]:
    from tilev4 import compress_prefill
    from tilev4.reference.compressor import CompressorState

    g = torch.Generator(device="cuda").manual_seed(ratio + d)
    c = (2 if ratio == 4 else 1) * d
    s = PREFILL_TOKENS
    kv = torch.randn(1, s, c, generator=g, device="cuda").bfloat16()
    gate = (2 * torch.randn(1, s, c, generator=g, device="cuda")).bfloat16()
    ape, weight = _params(ratio, d, g)
    cache = torch.empty(1, s // ratio, d, dtype=torch.bfloat16, device="cuda")
    state = CompressorState.empty(1, ratio, d, "cuda")

    def run() -> None:
        compress_prefill(kv, gate, ape, weight, cache, ratio, quant=quant, state=state, validate=False)

    ms = time_cuda(run, graph=True)
    state_arrays = 4 if ratio == 4 else 2
    nbytes = 2 * kv.numel() * 2 + cache.numel() * 2 + state_arrays * ratio * c * 4
    return record("compressor_prefill", f"s={s} D={d} m={ratio} {quant}", ms, nbytes=nbytes, peaks=peaks,
                  target=TARGET)


def _bench_decode(ratio: int, d: int, quant: str, peaks: dict[str, float]) -> dict[str, Any]:
    from tilev4 import compress_decode
    from tilev4.reference.compressor import CompressorState

    g = torch.Generator(device="cuda").manual_seed(7 * ratio + d)
    b = DECODE_BATCH
    coff = 2 if ratio == 4 else 1
    c = coff * d
    kv = torch.randn(b, c, generator=g, device="cuda").bfloat16()
    gate = (2 * torch.randn(b, c, generator=g, device="cuda")).bfloat16()
    ape, weight = _params(ratio, d, g)
    # random, never-empty state rows (the pooling reads them) at ragged positions
    rows = lambda: torch.randn(b, ratio, c, generator=g, device="cuda")  # noqa: E731
    pos = torch.randint(0, DECODE_MAX_POS, (b,), generator=g, device="cuda")
    state = CompressorState(rows(), rows(), rows() if ratio == 4 else None, rows() if ratio == 4 else None, pos)
    cache = torch.empty(b, (DECODE_MAX_POS + 256) // ratio + 1, d, dtype=torch.bfloat16, device="cuda")

    def run() -> None:
        compress_decode(kv, gate, ape, weight, cache, state, ratio, quant=quant, validate=False)

    ms = time_cuda(run, graph=True)
    pooled_rows = 2 * ratio if ratio == 4 else ratio
    rotated = (4 if ratio == 4 else 2) * ratio * c * 4
    per_seq = 2 * c * 2 + c * 4 + 2 * c * 4  # new kv'/gate read, ape row, state row written
    per_emit = 2 * pooled_rows * d * 4 + d * 2 + rotated  # pooled rows read, entry written, rotation
    nbytes = b * per_seq + b / ratio * per_emit
    return record("compressor_decode", f"b={b} D={d} m={ratio} {quant} (graph)", ms, nbytes=nbytes, peaks=peaks)


@benchmark("compressor")
def bench_compressor(peaks: dict[str, float]) -> list[dict[str, Any]]:
    out = [_bench_prefill(r, d, q, peaks) for r, d, q in VARIANTS]
    out += [_bench_decode(r, d, q, peaks) for r, d, q in VARIANTS]
    return out
