"""Attention benchmarks: V4-Flash / V4-Pro CSA prefill, CSA decode, HCA prefill, ``sparse_attention`` prefill,
batch-invariant variants.

FLOPs count only valid keys: 4·H·D per (query, valid key) (QKᵀ and PV). Decode bytes are the bytes of KV
read, as the issue's target defines them: the KV rows actually gathered (every valid key's 512 bf16 values); the
record also gives ``gbps_with_q_o_idx``, the rate over those bytes plus q, o and the index list (what the kernel
moves in all), ``target_ms`` (the time 0.6 of the copy bandwidth asks for) and ``launch_floor_ms`` (an empty launch
timed the same way: :func:`launch_floor_ms`). Every row is timed as a
CUDA-graph replay of the public op (kernel time only: the op's host path — checks, config
resolution, launch — would otherwise show in the millisecond prefill rows too). The prefill rows with a target are
also measured back to back at the power cap against the peak's matmul run the same way
(:func:`tilev4.bench.sustained.add_sustained`).
"""

from typing import Any

import torch

from tilev4.bench import benchmark, record, time_in_turn
from tilev4.bench.sustained import add_sustained

__all__ = ["bench_attention", "launch_floor_ms"]

D = 512


def _csa_prefill_inputs(s: int, heads: int, topk: int, n_c: int = 16384, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t0 = 4 * n_c  # every query sees all n_c entries and a full window
    positions = (t0 + torch.arange(s, device="cuda", dtype=torch.int32)).view(1, s)
    start = torch.tensor([t0 - 127], dtype=torch.int32, device="cuda")
    q = torch.randn(1, s, heads, D, generator=g, device="cuda").bfloat16()
    kv_w = torch.randn(1, s + 127, D, generator=g, device="cuda").bfloat16()
    kv_c = torch.randn(1, n_c, D, generator=g, device="cuda").bfloat16()
    idx = torch.argsort(torch.rand(1, s, n_c, generator=g, device="cuda"), dim=-1)[..., :topk].int().contiguous()
    sink = torch.randn(heads, generator=g, device="cuda")
    return q, kv_w, kv_c, idx, sink, positions, start


def _time_both(fn, rounds: int = 3, **kw) -> dict[bool, float]:
    """Median ms of ``fn(batch_invariant)`` for the default and the batch-invariant variant: the median of
    ``rounds`` rounds that time the two in turn, so that neither gets the cooler GPU."""
    ms = time_in_turn([lambda: fn(False), lambda: fn(True)], rounds, alternate=False, **kw)
    return {False: ms[0], True: ms[1]}


def _csa_prefill(peaks: dict[str, float], name: str, heads: int, topk: int, s: int = 4096) -> list[dict[str, Any]]:
    import tilev4

    q, kv_w, kv_c, idx, sink, pos, start = _csa_prefill_inputs(s, heads, topk)
    o = torch.empty_like(q)
    def call(bi: bool) -> None:
        tilev4.csa_attention(q, kv_w, kv_c, idx, sink, pos, window_start=start, batch_invariant=bi, validate=False,
                             out=o)

    ms = _time_both(call, reps=20, graph=True)
    flops = 4.0 * s * heads * D * (128 + topk)
    recs = [record(f"{name}{' (batch-invariant)' if bi else ''}", f"b=1 s={s} H={heads} keys=128+{topk}", t,
                   flops=flops, peaks=peaks, target=0.70) for bi, t in ms.items()]
    add_sustained(recs[0], lambda: call(False), flops)  # the row, back to back at the power cap as well
    return recs


def _sparse_prefill(peaks: dict[str, float], heads: int = 64, topk: int = 512, s: int = 4096,
                    n: int = 16384) -> list[dict[str, Any]]:
    """``tilev4.sparse_attention`` over an index list only (no issue target: the public op the CSA rows build on)."""
    import tilev4

    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(1, s, heads, D, generator=g, device="cuda").bfloat16()
    kv = torch.randn(1, n, D, generator=g, device="cuda").bfloat16()
    idx = torch.argsort(torch.rand(1, s, n, generator=g, device="cuda"), dim=-1)[..., :topk].int().contiguous()
    sink = torch.randn(heads, generator=g, device="cuda")
    o = torch.empty_like(q)
    ms = _time_both(lambda bi: tilev4.sparse_attention(q, kv, sink, idx, batch_invariant=bi, validate=False, out=o),
                    reps=20, graph=True)
    flops = 4.0 * s * heads * D * topk
    return [record(f"sparse_attention prefill{' (batch-invariant)' if bi else ''}", f"b=1 s={s} H={heads} k={topk}",
                   t, flops=flops, peaks=peaks) for bi, t in ms.items()]


def _csa_decode_inputs(b: int = 64, heads: int = 64, topk: int = 512, n_c: int = 32768):
    """b sequences at 128K context (n_c = 32768 compressed entries), one new token each, a 128-row ring."""
    g = torch.Generator(device="cuda").manual_seed(1)
    pos = torch.full((b, 1), 4 * n_c - 1, dtype=torch.int32, device="cuda")
    q = torch.randn(b, 1, heads, D, generator=g, device="cuda").bfloat16()
    kv_w = torch.randn(b, 128, D, generator=g, device="cuda").bfloat16()
    kv_c = torch.randn(b, n_c, D, generator=g, device="cuda").bfloat16()
    idx = torch.argsort(torch.rand(b, 1, n_c, generator=g, device="cuda"), dim=-1)[..., :topk].int().contiguous()
    sink = torch.randn(heads, generator=g, device="cuda")
    return q, kv_w, kv_c, idx, sink, pos


def _csa_decode(peaks: dict[str, float], b: int = 64, heads: int = 64, topk: int = 512) -> list[dict[str, Any]]:
    import tilev4

    q, kv_w, kv_c, idx, sink, pos = _csa_decode_inputs(b, heads, topk)
    o = torch.empty_like(q)
    ms = _time_both(lambda bi: tilev4.csa_attention(q, kv_w, kv_c, idx, sink, pos, batch_invariant=bi,
                                                    validate=False, out=o), graph=True)
    kv_bytes = b * (128 + topk) * D * 2
    all_bytes = kv_bytes + 2 * q.numel() * 2 + idx.numel() * 4
    floor = launch_floor_ms()
    out = []
    for bi, t in ms.items():
        rec = record(f"V4-Flash CSA decode{' (batch-invariant)' if bi else ''}",
                     f"b={b} s=1 H={heads} ctx=128K keys=128+{topk}", t, nbytes=kv_bytes, peaks=peaks, target=0.6)
        rec["gbps_with_q_o_idx"] = all_bytes / t / 1e6
        rec["launch_floor_ms"] = floor
        rec["target_ms"] = kv_bytes / (0.6 * peaks["copy_gbps"] * 1e6)  # the time the target asks for
        out.append(rec)
    return out


def launch_floor_ms() -> float:
    """What the decode rows' timing gives a kernel that does nothing: one 1-element fill, timed as they are
    (:func:`tilev4.bench.time_cuda`, a CUDA-graph replay after the L2 flush, same reps). Part of every decode time:
    the graph's launch, the kernel's start and end, the events."""
    x = torch.empty(1, device="cuda")
    return time_in_turn([lambda: x.fill_(1.0)], rounds=3, graph=True)[0]


def _hca_prefill_inputs(s: int = 65536, heads: int = 64):
    """From position 0: each query sees min(t+1, 128) window keys and (t+1)//128 entries. Also returns the
    number of (query, key) pairs."""
    g = torch.Generator(device="cuda").manual_seed(2)
    pos = torch.arange(s, device="cuda", dtype=torch.int32).view(1, s)
    start = torch.zeros(1, dtype=torch.int32, device="cuda")
    q = torch.randn(1, s, heads, D, generator=g, device="cuda").bfloat16()
    kv_w = torch.randn(1, s, D, generator=g, device="cuda").bfloat16()
    kv_c = torch.randn(1, s // 128, D, generator=g, device="cuda").bfloat16()
    sink = torch.randn(heads, generator=g, device="cuda")
    t = torch.arange(s, dtype=torch.float64)
    keys = (torch.clamp(t + 1, max=128) + torch.floor((t + 1) / 128)).sum().item()
    return q, kv_w, kv_c, sink, pos, start, keys


def _hca_prefill(peaks: dict[str, float], s: int = 65536, heads: int = 64) -> list[dict[str, Any]]:
    import tilev4

    q, kv_w, kv_c, sink, pos, start, keys = _hca_prefill_inputs(s, heads)
    o = torch.empty_like(q)
    def call(bi: bool) -> None:
        tilev4.hca_attention(q, kv_w, kv_c, sink, pos, window_start=start, batch_invariant=bi, validate=False, out=o)

    ms = _time_both(call, warmup=2, reps=5, graph=True)
    flops = 4.0 * heads * D * keys
    recs = [record(f"HCA prefill{' (batch-invariant)' if bi else ''}", f"b=1 s={s} H={heads} keys=128+<=512",
                   ms_, flops=flops, peaks=peaks, target=0.60) for bi, ms_ in ms.items()]
    add_sustained(recs[0], lambda: call(False), flops)
    return recs


@benchmark("attention")
def bench_attention(peaks: dict[str, float]) -> list[dict[str, Any]]:
    out = _csa_prefill(peaks, "V4-Flash CSA prefill", 64, 512)
    out += _csa_prefill(peaks, "V4-Pro CSA prefill", 128, 1024)
    out += _csa_decode(peaks)
    out += _hca_prefill(peaks)
    out += _sparse_prefill(peaks)
    return out
