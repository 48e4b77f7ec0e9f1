"""Benchmarks of the lightning indexer (H = 64 heads × D = 128, FP8 e4m3 q/k with per-row power-of-two scales).

``indexer``:

* Prefill logits, S = 4096 queries × N ∈ {4096, 16384, 65536} entries: the queries are the last 4096
  tokens of a context of 4·N tokens, so query i sees ``min((4N − 4096 + i + 1) // 4, N)`` entries; FLOPs
  count the visible (query, entry) pairs only, ``2·H·D`` each. Reported against the FP8 tensor-core peak
  measured in the same run (``torch._scaled_mm`` 8192³ e4m3 × e4m3 → bf16, unit scales, CUDA-event median):
  ``fraction_of_fp8_peak`` (target 0.6).
* Decode, B = 64 sequences × N = 262144 entries, top-512: the logits kernel alone and logits + select
  (``indexer_topk``), CUDA-graph timing; bytes are the FP8 keys read (``B·N·128``), reported as a fraction
  of the same-run copy bandwidth (target 0.6).

``topk``: ``topk_select`` on a 4096 × 32768 fp32 matrix, k = 512, against ``torch.topk`` in the same run
(``speedup_vs_torch_topk``, target 5).
"""

from typing import Any

import torch

from tilev4.bench import benchmark, record, time_cuda

__all__ = ["bench_indexer", "bench_topk", "measure_fp8_peak"]

H, D = 64, 128


def measure_fp8_peak() -> float:
    """Dense FP8 e4m3 matmul TFLOPS: ``torch._scaled_mm`` 8192³ (e4m3 × e4m3 → bf16, unit scales)."""
    n = 8192
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)  # row-major [N, K]: b.t() is column-major
    one = torch.ones((), device="cuda")
    ms = time_cuda(lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                   warmup=5, reps=20, flush_l2=False)
    return 2 * n**3 / ms / 1e9


def _fp4_rows(*shape, gen):
    from tilev4.reference.quant import fp4_e2m1_simulate

    return fp4_e2m1_simulate(torch.randn(*shape, generator=gen, device="cuda"), block=32)


def _random_fp8(*shape, gen):
    """Random finite, mostly non-zero e4m3 bytes (NaN codes 0x7F / 0xFF excluded), no fp32 temporary."""
    mag = torch.randint(1, 0x7F, shape, generator=gen, device="cuda", dtype=torch.uint8)
    sign = torch.randint(0, 2, shape, generator=gen, device="cuda", dtype=torch.uint8) << 7
    return (mag | sign).view(torch.float8_e4m3fn)


@benchmark("indexer")
def bench_indexer(peaks: dict[str, float]) -> list[dict[str, Any]]:
    from tilev4.kernels.indexer import indexer_fp8_cast, indexer_logits, indexer_topk

    gen = torch.Generator(device="cuda").manual_seed(0)
    fp8_peak = measure_fp8_peak()
    recs = []
    s = 4096
    for n in (4096, 16384, 65536):
        q8, qs = indexer_fp8_cast(_fp4_rows(1, s, H, D, gen=gen))
        k8, ks = indexer_fp8_cast(_fp4_rows(1, n, D, gen=gen))
        w = torch.randn(1, s, H, generator=gen, device="cuda") * (H**-0.5 * D**-0.5)
        positions = (4 * n - s + torch.arange(s, device="cuda")).view(1, s)
        out = torch.empty(1, s, n, device="cuda")
        ms = time_cuda(lambda q8=q8, qs=qs, w=w, k8=k8, ks=ks, positions=positions, out=out:
                       indexer_logits(q8, qs, w, k8, ks, positions, out=out))
        visible = int(torch.clamp((positions + 1) // 4, max=n).sum())
        rec = record("indexer_logits prefill", f"S={s} N={n} H={H} D={D}", ms, peaks=peaks,
                     flops=2 * H * D * visible, target=0.6)
        rec["fp8_peak_tflops"] = fp8_peak
        rec["fraction_of_fp8_peak"] = rec["tflops"] / fp8_peak
        recs.append(rec)
        del q8, k8, out

    b, n, top_k = 64, 262144, 512
    q8, qs = indexer_fp8_cast(_fp4_rows(b, 1, H, D, gen=gen))
    k8 = _random_fp8(b, n, D, gen=gen)
    ks = torch.exp2(torch.randint(-12, -4, (b, n), generator=gen, device="cuda").float())
    w = torch.randn(b, 1, H, generator=gen, device="cuda") * (H**-0.5 * D**-0.5)
    positions = torch.full((b, 1), 4 * n - 1, device="cuda")
    out = torch.empty(b, 1, n, device="cuda")
    key_bytes = b * n * D
    ms_logits = time_cuda(lambda: indexer_logits(q8, qs, w, k8, ks, positions, out=out), graph=True)
    ms_topk = time_cuda(lambda: indexer_topk(q8, qs, w, k8, ks, positions, top_k), graph=True)
    shape = f"B={b} N={n} H={H} D={D}"
    recs.append(record("indexer_logits decode", shape, ms_logits, peaks=peaks, nbytes=key_bytes, target=0.6))
    recs.append(record("indexer_topk decode (logits + select)", f"{shape} k={top_k}", ms_topk, peaks=peaks,
                       nbytes=key_bytes, target=0.6))
    return recs


@benchmark("topk")
def bench_topk(peaks: dict[str, float]) -> list[dict[str, Any]]:
    from tilev4.kernels.indexer import topk_select

    gen = torch.Generator(device="cuda").manual_seed(1)
    rows, n, k = 4096, 32768, 512
    logits = torch.randn(rows, n, generator=gen, device="cuda")
    out = torch.empty(rows, k, dtype=torch.int32, device="cuda")
    ms = time_cuda(lambda: topk_select(logits, k, out=out))
    ms_torch = time_cuda(lambda: torch.topk(logits, k, dim=-1))
    shape = f"R={rows} N={n} k={k}"
    rec = record("topk_select", shape, ms, peaks=peaks, nbytes=rows * n * 4)
    rec["torch_topk_ms"] = ms_torch
    rec["speedup_vs_torch_topk"] = ms_torch / ms
    rec["target_speedup"] = 5.0
    return [rec, record("torch.topk", shape, ms_torch, peaks=peaks, nbytes=rows * n * 4)]
