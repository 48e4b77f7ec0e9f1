"""Two attention variants authored with the tilev4 DSL, each compiled into one fused TileLang kernel.

    python examples/custom_attention.py      # needs a CUDA GPU (Hopper); checks both against torch

1. ALiBi sliding-window attention: ``Window(W)`` keys, a per-head linear distance bias as ``score_mod``.
2. NSA-style selected-block attention: ``IndexList(block=64)`` picks whole 64-token blocks per query,
   a causal ``mask_mod`` drops the future tokens of the query's own block, and a per-head sink.
"""

import math

import tilelang.language as T
import torch

from tilev4.dsl import AttentionKernel, AttentionSpec, IndexList, Window


# --- 1. ALiBi over a sliding window -------------------------------------------------------------
def alibi_window_attention(heads: int, window: int, head_dim: int = 512) -> AttentionKernel:
    def alibi(score, b, h, q_idx, kv_idx):  # slope 2^(-8(h+1)/H) per head, times the distance
        slope = T.exp2(-8.0 * T.cast(h + 1, "float32") / heads)
        return score - slope * T.cast(q_idx - kv_idx, "float32")

    spec = AttentionSpec(heads=heads, head_dim=head_dim, sources=(Window("window", window),), sink=False,
                         score_mod=alibi, name="alibi_window")
    return AttentionKernel(spec)


def alibi_window_reference(q, kv, positions, start, window):
    """q [b,s,H,D], kv [b,n,D] (row i = token start[b]+i), positions [b,s] -> o fp32 [b,s,H,D]."""
    b, s, h, d = q.shape
    slopes = torch.exp2(-8.0 * torch.arange(1, h + 1, dtype=torch.float32) / h)  # [H]
    out = torch.zeros(b, s, h, d)
    for bi in range(b):
        for si in range(s):
            t = int(positions[bi, si])
            p = torch.arange(max(t - window + 1, int(start[bi]), 0), t + 1)  # visible token positions
            k = kv[bi, p - int(start[bi])].float()  # [n_keys, D]
            score = q[bi, si].float() @ k.T / math.sqrt(d) - slopes[:, None] * (t - p).float()  # [H, n_keys]
            out[bi, si] = torch.softmax(score, -1) @ k
    return out


# --- 2. NSA-style selected blocks -----------------------------------------------------------------
def selected_block_attention(heads: int, block: int = 64, head_dim: int = 512) -> AttentionKernel:
    spec = AttentionSpec(heads=heads, head_dim=head_dim, sources=(IndexList("blocks", block=block),), sink=True,
                         mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, name="selected_blocks")
    return AttentionKernel(spec)


def selected_block_reference(q, kv, block_idx, positions, sink, block=64):
    """Rows idx·block … idx·block+block−1 of every selected block (−1 = none), causal, with a sink."""
    from tilev4.reference.attention import sparse_attention

    rows = block_idx.long().unsqueeze(-1) * block + torch.arange(block)  # [b, s, k, block]
    keep = (block_idx.unsqueeze(-1) >= 0) & (rows <= positions.long()[..., None, None])
    idx = torch.where(keep, rows, -1).flatten(2).to(torch.int32)  # [b, s, k·block]
    return sparse_attention(q.float(), kv.float(), sink, idx)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("this example launches kernels: it needs a CUDA GPU")
    torch.manual_seed(0)
    b, s, h, d, n = 2, 64, 16, 512, 1024
    q = torch.randn(b, s, h, d, device="cuda").bfloat16()
    kv = torch.randn(b, n, d, device="cuda").bfloat16()
    positions = (torch.arange(s, device="cuda", dtype=torch.int32) + 900).expand(b, s).contiguous()
    start = torch.zeros(b, dtype=torch.int32, device="cuda")
    o = alibi_window_attention(h, 256)(q, positions, window_kv=kv, window_start=start)
    ref = alibi_window_reference(q.cpu(), kv.cpu(), positions.cpu(), start.cpu(), 256)
    print("ALiBi window: max |err| =", (o.float().cpu() - ref).abs().max().item())
    sel = torch.randint(0, 15, (b, s, 4), device="cuda", dtype=torch.int32)
    sink = torch.randn(h, device="cuda")
    o = selected_block_attention(h)(q, positions, sink, blocks_kv=kv, blocks_idx=sel)
    ref = selected_block_reference(q.cpu(), kv.cpu(), sel.cpu(), positions.cpu(), sink.cpu())
    print("selected blocks: max |err| =", (o.float().cpu() - ref).abs().max().item())


if __name__ == "__main__":
    main()
