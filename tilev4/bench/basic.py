"""Benchmarks of the memory-bound basics: rmsnorm and the FP8 activation quantiser."""

from typing import Any

import torch

from tilev4.bench import benchmark, record, time_cuda

__all__ = ["bench_fp8_linear", "bench_fp8_quantize", "bench_linear", "bench_rmsnorm"]


@benchmark("rmsnorm")
def bench_rmsnorm(peaks: dict[str, float]) -> list[dict[str, Any]]:
    import tilev4

    out = []
    for n, d in [(16384, 4096), (16384, 7168), (64, 4096)]:
        x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(d, device="cuda")
        y = torch.empty_like(x)
        ms = time_cuda(lambda x=x, w=w, y=y: tilev4.rmsnorm(x, w, out=y), graph=True)
        nbytes = 2 * x.numel() * 2 + w.numel() * 4
        out.append(record("rmsnorm", f"N={n} D={d}", ms, nbytes=nbytes, peaks=peaks))
    return out


@benchmark("fp8_quantize")
def bench_fp8_quantize(peaks: dict[str, float]) -> list[dict[str, Any]]:
    import tilev4

    out = []
    for n, k in [(16384, 4096), (16384, 7168), (64, 7168)]:
        x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        q = torch.empty(n, k, device="cuda", dtype=torch.float8_e4m3fn)
        s = torch.empty(n, k // 128, device="cuda")
        ms = time_cuda(lambda x=x, q=q, s=s: tilev4.fp8_quantize(x, out=(q, s)), graph=True)
        nbytes = x.numel() * 2 + q.numel() + s.numel() * 4
        out.append(record("fp8_quantize", f"N={n} K={k}", ms, nbytes=nbytes, peaks=peaks))
    return out


@benchmark("fp8_linear")
def bench_fp8_linear(peaks: dict[str, float]) -> list[dict[str, Any]]:
    """The dense FP8 linear (activation quantisation included): prefill-sized rows against the FP8 matmul peak
    measured in the same run, decode-sized rows against copy bandwidth over the FP8 weight bytes."""
    import tilev4
    from tilev4.bench.indexer import measure_fp8_peak
    from tilev4.kernels.moe_fp8 import quantize_fp8_weight

    fp8_peak = measure_fp8_peak()
    out = []
    for m, n, k in [(8192, 4096, 4096), (8192, 7168, 4096), (64, 4096, 4096)]:
        w = quantize_fp8_weight(torch.randn(n, k, device="cuda") * k**-0.5)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ms = time_cuda(lambda x=x, w=w: tilev4.fp8_linear(x, w.data, w.scale), graph=m <= 256)
        shape = f"M={m} N={n} K={k}"
        if m > 256:
            rec = record("fp8_linear (quantise x + FP8 GEMM)", shape, ms, flops=2.0 * m * n * k, peaks=peaks)
            rec["fp8_peak_tflops"] = fp8_peak
            rec["fraction_of_fp8_peak"] = rec["tflops"] / fp8_peak
        else:
            rec = record("fp8_linear (quantise x + FP8 GEMM)", shape, ms, peaks=peaks,
                         nbytes=n * k + w.scale.numel() * 4 + m * k * 2 + m * n * 4)
        out.append(rec)
    return out


@benchmark("linear")
def bench_linear(peaks: dict[str, float]) -> list[dict[str, Any]]:
    """The model's fp32 linear (x split into three bf16 parts): decode rows (the small model's shapes and a
    V4-Flash projection) against copy bandwidth over the bf16 weight and the same product in cuBLAS (bf16 with
    x rounded, and fp32), prefill rows against the bf16 matmul peak (three GEMMs per product: the ceiling is 1/3)."""
    import tilev4

    out = []
    for m, n, k in [(4, 4096, 1024), (4, 3328, 1024), (4, 8192, 256), (64, 4096, 4096), (8192, 4096, 4096)]:
        x = torch.randn(m, k, device="cuda")
        w = (torch.randn(n, k, device="cuda") * k**-0.5).bfloat16()
        graph = m <= 256
        ms = time_cuda(lambda x=x, w=w: tilev4.linear(x, w), graph=graph)
        shape = f"M={m} N={n} K={k}"
        if m > 256:
            rec = record("linear (fp32 x, 3×bf16 split)", shape, ms, flops=2.0 * m * n * k, peaks=peaks)
        else:
            rec = record("linear (fp32 x, 3×bf16 split)", shape, ms, nbytes=n * k * 2 + m * k * 4 + m * n * 4,
                         peaks=peaks)
        out.append(rec)
        wf = w.float()
        for name, fn in (("cuBLAS bf16 (x rounded to bf16)", lambda x=x, w=w: x.bfloat16() @ w.T),
                         ("cuBLAS fp32 (TF32 off)", lambda x=x, wf=wf: x @ wf.T)):
            tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
            try:
                ms_ref = time_cuda(fn, graph=graph)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = tf32
            ref = record(name, shape, ms_ref, **({"flops": 2.0 * m * n * k} if m > 256 else
                                                 {"nbytes": n * k * 2 + m * k * 4 + m * n * 4}), peaks=peaks)
            rec.setdefault("vs", {})[name] = ms_ref / ms
            out.append(ref)
    return out
