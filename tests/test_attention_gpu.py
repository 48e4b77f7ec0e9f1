"""Sparse / CSA / HCA attention kernels (DSL-built) against the fp32 reference, on the GPU.

Tolerances: q and kv are bf16 (exact in fp32), QK is accumulated in fp32, but the softmax
weights P are rounded to bf16 (relative 2^-9) before the P·V product and the output is rounded to
bf16 (relative 2^-9); with |v| of N(0,1) rows below ~5 that bounds |o − o_ref| by ~1e-2.
The lse goes through fp32 only (atol 1e-3 covers exp2/log2 and the summation order).
"""

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tilev4
from tilev4.reference import attention as RA

pytestmark = pytest.mark.gpu
O_TOL = {"atol": 1e-2, "rtol": 1e-2}
LSE_TOL = {"atol": 1e-3, "rtol": 1e-4}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def _randn(*shape, g, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=g, device="cuda").to(dtype)


def _poisoned(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, float("nan"))


def _ref_sparse(q, kv, sink, idx, return_lse=False):
    return RA.sparse_attention(q.cpu().float(), kv.cpu().float(), None if sink is None else sink.cpu(), idx.cpu(),
                               return_lse=return_lse)


def _check(o, ref, lse=None, ref_lse=None):
    assert not torch.isnan(o).any(), "NaN in the output"
    torch.testing.assert_close(o.float().cpu(), ref, **O_TOL)
    if lse is not None:
        assert not torch.isnan(lse).any()
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse.cpu()), finite)
        torch.testing.assert_close(lse.cpu()[finite], ref_lse[finite], **LSE_TOL)


@pytest.mark.parametrize("heads", [64, 128, 8, 96, 20])
def test_sparse_matches_reference(heads):
    g = _gen(heads)
    b, s, n, k = 2, 9, 300, 200  # k is not a multiple of the 64-key block
    q, kv = _randn(b, s, heads, 512, g=g), _randn(b, n, 512, g=g)
    sink = torch.randn(heads, generator=g, device="cuda")
    idx = torch.randint(0, n, (b, s, k), generator=g, device="cuda", dtype=torch.int32)
    idx[:, :, ::3] = -1  # scattered unused slots
    idx[0, 1, 64:128] = -1  # one whole 64-key block unused
    idx[1, 2, :] = -1  # a query with no key at all -> 0
    idx[1, 3, 10:20] = idx[1, 3, 0]  # duplicated index counts ten more times
    o, lse = tilev4.sparse_attention(q, kv, sink, idx, return_lse=True, out=_poisoned(q))
    ref, ref_lse = _ref_sparse(q, kv, sink, idx, return_lse=True)
    _check(o, ref, lse, ref_lse)
    assert torch.count_nonzero(o[1, 2]) == 0


def test_sparse_without_keys_and_huge_sink():
    g = _gen(1)
    q, kv = _randn(1, 3, 64, 512, g=g), _randn(1, 64, 512, g=g)
    sink = torch.full((64,), 80.0, device="cuda")  # e^80 dominates: output ~0 but finite
    idx = torch.randint(0, 64, (1, 3, 64), generator=g, device="cuda", dtype=torch.int32)
    idx[0, 0] = -1
    o = tilev4.sparse_attention(q, kv, sink, idx, out=_poisoned(q))
    _check(o, _ref_sparse(q, kv, sink, idx))



@pytest.mark.parametrize("order", ["rising", "falling", "zigzag"])
def test_sparse_running_max_moves(order):
    """Row maxima that climb from block to block (rising: by less than the seesaw's rescale slack of 8 in base 2 in
    about half of the moves, by up to ~20 in others), never move after the first block (falling: every later
    rescale is skipped), or jump back and forth by ~40 (zigzag); scores up to ~110 in base 2. The lazily rescaled
    accumulator gives the fp32 reference's output and log-sum-exp. Tolerance: P is rounded to bf16 (2^-9) before
    P·V, so |o - o_ref| is bounded by ~2^-8 · max|v| (the module's 1e-2 is that bound for |v| < 5; here |v| ~ 10)."""
    g = _gen(11)
    n, k = 512, 512
    q = (torch.randn(1, 4, 64, 512, generator=g, device="cuda") * 8.0).bfloat16()  # large scores, moderate |v|
    ramp = torch.linspace(0.25, 2.5, n, device="cuda")
    if order == "falling":
        ramp = ramp.flip(0)
    elif order == "zigzag":
        ramp = torch.where(torch.arange(n, device="cuda") // 64 % 2 == 0, ramp, ramp.flip(0))
    kv = (torch.randn(1, n, 512, generator=g, device="cuda") * ramp[None, :, None]).bfloat16()
    sink = torch.randn(64, generator=g, device="cuda")
    idx = torch.arange(k, device="cuda", dtype=torch.int32).expand(1, 4, k).contiguous()
    o, lse = tilev4.sparse_attention(q, kv, sink, idx, return_lse=True, out=_poisoned(q))
    ref, ref_lse = _ref_sparse(q, kv, sink, idx, return_lse=True)
    assert not torch.isnan(o).any(), "NaN in the output"
    torch.testing.assert_close(o.float().cpu(), ref, atol=2.0**-7 * kv.abs().max().item(), rtol=1e-2)
    torch.testing.assert_close(lse.cpu(), ref_lse, **LSE_TOL)


@pytest.mark.parametrize("query_tiles", [1, 4])
def test_one_dropped_key_in_a_block_is_masked(query_tiles):
    """Blocks with a single unused slot (−1) at rows of every producer warp, and fully valid ones. The seesaw skips
    the mask of a block only when all four producer warps voted its keys valid. The kept keys score ~−20 (base e) and
    the sink is −100, so an unused slot's zero row (score 0) let through would take nearly all of a row's weight and
    zero the output (the reference: the mean of the kept rows, of norm ~4.8)."""
    g = _gen(12 + query_tiles)
    s, n, k = 8, 4096, 512
    u = torch.nn.functional.normalize(torch.randn(512, generator=g, device="cuda"), dim=0)
    q = (u * 20.0 * 512**0.25).expand(1, s, 64, 512).bfloat16().contiguous()  # q·k · 512^-0.5 = −20 for k = −u·512^.25
    kv = (-u * 512**0.25 + 0.01 * torch.randn(1, n, 512, generator=g, device="cuda")).bfloat16()
    sink = torch.full((64,), -100.0, device="cuda")
    idx = torch.stack([torch.randperm(n, generator=g, device="cuda")[:k] for _ in range(s)]).int().view(1, s, k)
    for i in range(s):
        for j in range(k // 64):
            if (i + j) % 3:  # else the block keeps every key
                idx[0, i, j * 64 + (i * 7 + j * 5) % 64] = -1  # row r·16 + 4·v + l of producer warp v
    idx[0, 0, 64 * 7 + 5] = -1  # the last block of query 0 drops two
    from tilev4.dsl import AttentionKernel
    from tilev4.dsl.codegen import AttentionConfig
    from tilev4.kernels.attention import variant_spec

    kern = AttentionKernel(variant_spec("sparse", 64), AttentionConfig(query_tiles=query_tiles))  # scale 512^-0.5
    o = kern(q, torch.arange(s, device="cuda", dtype=torch.int32).view(1, s), sink, num_splits=1, out=_poisoned(q),
             sel_kv=kv, sel_idx=idx)
    ref = _ref_sparse(q, kv, sink, idx)
    assert ref.norm(dim=-1).min() > 4.0  # the kept rows carry the output (norm 512^0.25 = 4.76)
    _check(o, ref)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_split_kv_matches(num_splits):
    from tilev4.kernels.attention import _kernel

    g = _gen(num_splits)
    q, kv = _randn(2, 2, 64, 512, g=g), _randn(2, 500, 512, g=g)
    sink = torch.randn(64, generator=g, device="cuda")
    idx = torch.randint(-1, 500, (2, 2, 400), generator=g, device="cuda", dtype=torch.int32)
    kern = _kernel("sparse", 64, False, None, True)
    pos = torch.zeros(2, 2, dtype=torch.int32, device="cuda")
    o, lse = kern(q, pos, sink, num_splits=num_splits, out=_poisoned(q), sel_kv=kv, sel_idx=idx)
    ref, ref_lse = _ref_sparse(q, kv, sink, idx, return_lse=True)
    _check(o, ref, lse, ref_lse)


def _window_rows(positions, start=None, ring=None):
    """Reference window key set as rows of the window tensor (stream or ring)."""
    win = RA.window_indices(positions.cpu())  # token positions or -1, [b, s, 128]
    if ring is not None:
        return torch.where(win >= 0, win % ring, -1).to(torch.int32)
    st = start.cpu().view(-1, 1, 1)
    return torch.where(win >= st, win - st, -1).to(torch.int32)


def _csa_case(g, b, s, heads, n_c, k, positions, ring=None, start=None, n_stream=None):
    q = _randn(b, s, heads, 512, g=g)
    rows = ring if ring is not None else n_stream
    kv_w = _randn(b, rows, 512, g=g)
    kv_c = _randn(b, n_c, 512, g=g)
    sink = torch.randn(heads, generator=g, device="cuda")
    vis = ((positions + 1) // 4).clamp(max=n_c)  # visible compressed entries per query
    scores = torch.rand(b, s, n_c, generator=g, device="cuda")
    scores = scores.masked_fill(torch.arange(n_c, device="cuda") >= vis.unsqueeze(-1), -math.inf)
    idx = torch.full((b, s, k), -1, dtype=torch.int32, device="cuda")
    top = scores.topk(min(k, n_c), dim=-1)
    take = torch.where(torch.isfinite(top.values), top.indices, -1).to(torch.int32)
    idx[..., : take.shape[-1]] = take
    return q, kv_w, kv_c, sink, idx


@pytest.mark.parametrize("heads", [64, 128, 16])
def test_csa_prefill_stream(heads):
    g = _gen(100 + heads)
    b, s, k = 2, 160, 96
    start = torch.tensor([0, 37], dtype=torch.int32, device="cuda")  # second sequence continues a prefill
    positions = start.view(-1, 1) + torch.arange(s, device="cuda", dtype=torch.int32)
    n_c = 64
    q, kv_w, kv_c, sink, idx = _csa_case(g, b, s, heads, n_c, k, positions, start=start, n_stream=s)
    o = tilev4.csa_attention(q, kv_w, kv_c, idx, sink, positions, window_start=start, out=_poisoned(q))
    kv_cat, idx_cat = RA.concat_key_sets(kv_w.cpu(), kv_c.cpu(), _window_rows(positions, start=start), idx.cpu())
    _check(o, RA.sparse_attention(q.cpu().float(), kv_cat, sink.cpu(), idx_cat))


@pytest.mark.parametrize("s", [1, 2])
@pytest.mark.parametrize("batch_invariant", [False, True])
def test_csa_decode_ring_ragged(s, batch_invariant):
    g = _gen(200 + s)
    b, heads, k, ring = 3, 64, 512, 256
    last = torch.tensor([5, 300, 4000], dtype=torch.int32, device="cuda")  # ragged positions
    positions = last.view(-1, 1) - (s - 1) + torch.arange(s, device="cuda", dtype=torch.int32)
    n_c = 1024
    q, kv_w, kv_c, sink, idx = _csa_case(g, b, s, heads, n_c, k, positions, ring=ring)
    o = tilev4.csa_attention(q, kv_w, kv_c, idx, sink, positions, batch_invariant=batch_invariant,
                             out=_poisoned(q))
    kv_cat, idx_cat = RA.concat_key_sets(kv_w.cpu(), kv_c.cpu(), _window_rows(positions, ring=ring), idx.cpu())
    _check(o, RA.sparse_attention(q.cpu().float(), kv_cat, sink.cpu(), idx_cat))


@pytest.mark.parametrize(("ring", "s"), [(None, 300), (256, 1)])
def test_hca_matches_reference(ring, s):
    g = _gen(300 + s)
    b, heads = 2, 64
    if ring is None:
        start = torch.tensor([0, 1000], dtype=torch.int32, device="cuda")
        positions = start.view(-1, 1) + torch.arange(s, device="cuda", dtype=torch.int32)
        kv_w = _randn(b, s, 512, g=g)
    else:
        positions = torch.tensor([[130], [9000]], dtype=torch.int32, device="cuda")
        kv_w = _randn(b, ring, 512, g=g)
        start = None
    n_c = int((positions.max() + 1) // 128) + 3  # a few entries beyond the visible ones (never read)
    q, kv_c = _randn(b, s, heads, 512, g=g), _randn(b, n_c, 512, g=g)
    kv_c[:, -2:] = float("nan")  # invisible entries: must not leak into the output
    sink = torch.randn(heads, generator=g, device="cuda")
    o = tilev4.hca_attention(q, kv_w, kv_c, sink, positions, window_start=start, out=_poisoned(q))
    win = _window_rows(positions, start=start) if ring is None else _window_rows(positions, ring=ring)
    comp = RA.compressed_indices(positions.cpu(), 128, max_entries=n_c)
    kv_cat, idx_cat = RA.concat_key_sets(kv_w.cpu(), kv_c.cpu().nan_to_num(), win, comp)
    _check(o, RA.sparse_attention(q.cpu().float(), kv_cat, sink.cpu(), idx_cat))


@pytest.mark.parametrize("walk", [None, {"query_tiles": 4}, {"query_tiles": 4, "overlap_epilogue": True},
                                  {"persistent_ctas": 7}, "splits"], ids=["one", "qt4", "qt4-overlap", "pc7", "splits"])
def test_hca_partly_visible_compressed_blocks(walk):
    """Queries whose visible compressed entry count crosses 32, 64 and 96 (the stream's last block a quarter to
    fully visible; the seesaw leader's block or the follower's; a fully visible block loads by TMA, a partial one is
    gathered), against the reference; the entries past the visible ones are NaN. One query a CTA, 4 a CTA (also with
    each query's output path around the next one's first QKᵀ), persistent CTAs, and 3 splits (the split boundaries
    cut the key blocks elsewhere)."""
    from tilev4.dsl import AttentionKernel
    from tilev4.dsl.codegen import AttentionConfig
    from tilev4.kernels.attention import variant_spec

    g = _gen(1100)
    b, s, heads = 3, 400, 64
    start = torch.tensor([3950, 8050, 12150], dtype=torch.int32, device="cuda")  # 30-33, 62-66, 94-98 entries visible
    positions = start.view(-1, 1) + torch.arange(s, device="cuda", dtype=torch.int32)
    n_c = int((positions.max() + 1) // 128) + 3
    q, kv_w, kv_c = _randn(b, s, heads, 512, g=g), _randn(b, s, 512, g=g), _randn(b, n_c, 512, g=g)
    vis = ((positions[:, -1] + 1) // 128).tolist()
    for i, v in enumerate(vis):
        kv_c[i, v:] = float("nan")  # past every query of the sequence
    sink = torch.randn(heads, generator=g, device="cuda")
    cfg = AttentionConfig(**walk) if isinstance(walk, dict) else AttentionConfig()
    kern = AttentionKernel(variant_spec("hca", heads, False, False), cfg)
    o = kern(q, positions, sink, num_splits=3 if walk == "splits" else 1, out=_poisoned(q), window_kv=kv_w,
             window_start=start, comp_kv=kv_c)
    comp = RA.compressed_indices(positions.cpu(), 128, max_entries=n_c)
    kv_cat, idx_cat = RA.concat_key_sets(kv_w.cpu(), kv_c.cpu().nan_to_num(), _window_rows(positions, start=start),
                                         comp)
    _check(o, RA.sparse_attention(q.cpu().float(), kv_cat, sink.cpu(), idx_cat))


def test_stream_rows_past_every_query_never_reach_the_output():
    """The blocks of a stream window and the fully visible blocks of the compressed stream are loaded whole by TMA
    (``_SourceGen.tma_block``): rows that no query of the sequence may see (here the padding of a shorter second
    sequence, NaN) must stay out of every real query's output."""
    g = _gen(700)
    b, s, heads, valid = 2, 300, 64, 220
    start = torch.tensor([0, 1000], dtype=torch.int32, device="cuda")
    positions = start.view(-1, 1) + torch.arange(s, device="cuda", dtype=torch.int32)
    kv_w = _randn(b, s, 512, g=g)
    kv_w[1, valid:] = float("nan")  # sequence 1 has `valid` tokens; its later queries are padding
    n_c = int((positions.max() + 1) // 128)
    q, kv_c = _randn(b, s, heads, 512, g=g), _randn(b, n_c, 512, g=g)
    sink = torch.randn(heads, generator=g, device="cuda")
    o = tilev4.hca_attention(q, kv_w, kv_c, sink, positions, window_start=start, out=_poisoned(q))
    comp = RA.compressed_indices(positions.cpu(), 128, max_entries=n_c)
    kv_cat, idx_cat = RA.concat_key_sets(kv_w.cpu().nan_to_num(), kv_c.cpu(), _window_rows(positions, start=start),
                                         comp)
    ref = RA.sparse_attention(q.cpu().float(), kv_cat, sink.cpu(), idx_cat)
    _check(o[:, :valid], ref[:, :valid])


def _check_ws_program(config, num_splits, seed, k, unused, duplicates):
    """The warp-specialised program of ``config`` (built directly, whatever the tuned records say) against the
    reference: sparse attention over index lists of ``k`` slots with unused slots, a whole unused block (the slots
    ``unused`` of query (0, 1)), a query without keys and, with ``duplicates``, repeated entries; then HCA with
    ragged positions. One pass or ``num_splits`` splits."""
    from tilev4.dsl import AttentionKernel
    from tilev4.kernels.attention import variant_spec

    g = _gen(seed)
    b, s, n = 2, 5, 700
    q, kv = _randn(b, s, 64, 512, g=g), _randn(b, n, 512, g=g)
    sink = torch.randn(64, generator=g, device="cuda")
    idx = torch.randint(0, n, (b, s, k), generator=g, device="cuda", dtype=torch.int32)
    idx[:, :, 1::5] = -1
    idx[0, 1, unused] = -1
    idx[1, 2, :] = -1
    if duplicates:
        idx[1, 3, 30:60] = idx[1, 3, 0]
    kern = AttentionKernel(variant_spec("sparse", 64, False, True), config)
    pos = torch.zeros(b, s, dtype=torch.int32, device="cuda")
    o, lse = kern(q, pos, sink, num_splits=num_splits, out=_poisoned(q), sel_kv=kv, sel_idx=idx)
    ref, ref_lse = _ref_sparse(q, kv, sink, idx, return_lse=True)
    _check(o, ref, lse, ref_lse)
    assert torch.count_nonzero(o[1, 2]) == 0

    s_h = 200
    start = torch.tensor([0, 20000], dtype=torch.int32, device="cuda")
    positions = start.view(-1, 1) + torch.arange(s_h, device="cuda", dtype=torch.int32)
    n_c = int((positions.max() + 1) // 128) + 2
    qh, kv_w, kv_c = _randn(b, s_h, 64, 512, g=g), _randn(b, s_h, 512, g=g), _randn(b, n_c, 512, g=g)
    kern = AttentionKernel(variant_spec("hca", 64, False, False), config)
    oh = kern(qh, positions, sink, num_splits=num_splits, out=_poisoned(qh), window_kv=kv_w, window_start=start,
              comp_kv=kv_c)
    comp = RA.compressed_indices(positions.cpu(), 128, max_entries=n_c)
    kv_cat, idx_cat = RA.concat_key_sets(kv_w.cpu(), kv_c.cpu(), _window_rows(positions, start=start), comp)
    _check(oh, RA.sparse_attention(qh.cpu().float(), kv_cat, sink.cpu(), idx_cat))


@pytest.mark.parametrize("schedule", ["ws", "seesaw"])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_warp_specialised_schedules(schedule, num_splits):
    """Each warp-specialised schedule against the reference (see ``_check_ws_program``): 5 key blocks of 64, so the
    last pair has one padding block; a whole unused 64-key block; duplicates."""
    from tilev4.dsl.codegen import AttentionConfig

    _check_ws_program(AttentionConfig(schedule=schedule), num_splits, 400 + (num_splits or 0) + (schedule == "seesaw"),
                      k=320, unused=slice(128, 192), duplicates=True)


@pytest.mark.parametrize("num_splits", [None, 3])
def test_seesaw_ring_of_two_pairs(num_splits):
    """The seesaw schedule with a ring of two block pairs (32-key blocks) against the reference (see
    ``_check_ws_program``): 11 key blocks of 32, so the last pair has one padding block; a whole unused 32-key
    block."""
    from tilev4.dsl.codegen import AttentionConfig

    _check_ws_program(AttentionConfig(block_kv=32, pair_stages=2), num_splits, 700 + (num_splits or 0), k=352,
                      unused=slice(128, 160), duplicates=False)


@pytest.mark.parametrize("walk", [{"query_tiles": 2}, {"query_tiles": 4}, {"query_tiles": 2, "overlap_epilogue": True},
                                  {"query_tiles": 4, "overlap_epilogue": True}, {"persistent_ctas": 3},
                                  {"persistent_ctas": 300}], ids=["qt2", "qt4", "qt2-overlap", "qt4-overlap", "pc3",
                                                                   "pc300"])
def test_seesaw_query_tiles(walk):
    """A seesaw CTA walking 2 or 4 consecutive queries (also with each query's output path run around the next
    query's first QKᵀ), or persistent CTAs walking every 3rd query (or 300 CTAs, more than the queries: some walk
    none): against the reference (see ``_check_ws_program``: 5 queries a sequence, so a
    CTA's last turn is past the sequence or has fewer queries; HCA with ragged starts), and bit for bit against one
    query a CTA on CSA prefill with ragged starts (131 queries a sequence, 2 sequences)."""
    from tilev4.dsl import AttentionKernel
    from tilev4.dsl.codegen import AttentionConfig
    from tilev4.kernels.attention import variant_spec

    seed = walk.get("query_tiles", 0) + walk.get("persistent_ctas", 0)
    _check_ws_program(AttentionConfig(**walk), 1, 900 + seed, k=320,  # one pass
                      unused=slice(128, 192), duplicates=True)
    g = _gen(950 + seed)
    b, s, k = 2, 131, 96
    start = torch.tensor([0, 37], dtype=torch.int32, device="cuda")
    positions = start.view(-1, 1) + torch.arange(s, device="cuda", dtype=torch.int32)
    q, kv_w, kv_c, sink, idx = _csa_case(g, b, s, 64, 64, k, positions, start=start, n_stream=s)
    outs = []
    for cfg in (AttentionConfig(), AttentionConfig(**walk)):
        kern = AttentionKernel(variant_spec("csa", 64, False, False), cfg)
        assert kern.plan(b, s, [128, k], num_splits=1).config == cfg
        outs.append(kern(q, positions, sink, num_splits=1, out=_poisoned(q), window_kv=kv_w, window_start=start,
                         sel_kv=kv_c, sel_idx=idx))
    assert not torch.isnan(outs[1]).any()
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))
    kv_cat, idx_cat = RA.concat_key_sets(kv_w.cpu(), kv_c.cpu(), _window_rows(positions, start=start), idx.cpu())
    _check(outs[1], RA.sparse_attention(q.cpu().float(), kv_cat, sink.cpu(), idx_cat))


@pytest.mark.parametrize("size", ["long", "fewest", "between", "batched"])
@pytest.mark.parametrize("variant", ["sparse", "csa", "hca"])
def test_long_launch_matches_one_query_a_cta(variant, size):
    """A long one-pass launch of the op (persistent CTAs on this GPU's SM count, or several queries a CTA in the
    long launches of variants outside LONG_LAUNCH_PERSISTENT) gives the bits of the same tuned config walking one
    query a CTA, and its first and last queries match the reference. ``long``: as many queries as the query_tiles
    rule needs; ``fewest``: the fewest queries that take persistent CTAs; ``between``: an odd count between the two;
    ``batched``: three sequences (CSA, HCA: at different positions) a little longer than ``fewest``, each walked by
    its own persistent CTAs."""
    from tilev4.dsl import AttentionKernel
    from tilev4.dsl.runtime import _num_sms
    from tilev4.kernels import attention as A

    sms = _num_sms(torch.cuda.current_device())
    long = A.LONG_LAUNCH_WAVES * A.LONG_LAUNCH_QUERY_TILES[variant] * sms
    fewest = A.PERSISTENT_QUERIES_PER_SM * sms
    b, s = (3, fewest + 5) if size == "batched" else (1, {"long": long, "fewest": fewest,
                                                          "between": (fewest + long) // 2 | 1}[size])
    k = 512 if variant == "sparse" else 256
    g = _gen(1300 + len(variant) + len(size))
    kern = A._kernel(variant, 64, False, None, False)
    plan = kern.plan(b, s, [k] if variant == "sparse" else [128, k], num_sms=sms, device_sms=sms)
    walk = A._walk(variant, sms, b, s, k // 64 + (variant != "sparse") * 2)
    assert walk is not None and ("persistent_ctas" in walk) == (size != "long" or variant in A.LONG_LAUNCH_PERSISTENT)
    assert plan.kind == "main" and plan.config == dataclasses.replace(kern.launch_config("main"), **walk)
    one = AttentionKernel(kern.spec, kern.launch_config("main"))  # the same config, one query a CTA
    rows = list(range(8)) + list(range(s - 8, s))
    if variant == "sparse":
        n = 3000
        q, kv = _randn(b, s, 64, 512, g=g), _randn(b, n, 512, g=g)
        sink = torch.randn(64, generator=g, device="cuda")
        idx = torch.randint(0, n, (b, s, k), generator=g, device="cuda", dtype=torch.int32)
        idx[:, :, 3::7] = -1
        o = tilev4.sparse_attention(q, kv, sink, idx, out=_poisoned(q))
        base = one(q, torch.zeros(b, s, dtype=torch.int32, device="cuda"), sink, out=_poisoned(q), sel_kv=kv,
                   sel_idx=idx)
        ref = _ref_sparse(q[:, rows], kv, sink, idx[:, rows])
    else:
        start = torch.tensor([5000, 5777, 6555][:b], dtype=torch.int32, device="cuda")
        positions = start.view(b, 1) + torch.arange(s, device="cuda", dtype=torch.int32).view(1, s)
        if variant == "csa":
            n_c = 2048
            q, kv_w, kv_c, sink, idx = _csa_case(g, b, s, 64, n_c, k, positions, start=start, n_stream=s)
            o = tilev4.csa_attention(q, kv_w, kv_c, idx, sink, positions, window_start=start, out=_poisoned(q))
            base = one(q, positions, sink, out=_poisoned(q), window_kv=kv_w, window_start=start, sel_kv=kv_c,
                       sel_idx=idx)
            sel = idx[:, rows].cpu()
        else:
            n_c = int(positions.max() + 1) // 128
            q, kv_w, kv_c = _randn(b, s, 64, 512, g=g), _randn(b, s, 512, g=g), _randn(b, n_c, 512, g=g)
            sink = torch.randn(64, generator=g, device="cuda")
            o = tilev4.hca_attention(q, kv_w, kv_c, sink, positions, window_start=start, out=_poisoned(q))
            base = one(q, positions, sink, out=_poisoned(q), window_kv=kv_w, window_start=start, comp_kv=kv_c)
            sel = RA.compressed_indices(positions[:, rows].cpu(), 128, max_entries=n_c)
        kv_cat, idx_cat = RA.concat_key_sets(kv_w.cpu(), kv_c.cpu(), _window_rows(positions[:, rows], start=start),
                                             sel)
        ref = RA.sparse_attention(q[:, rows].cpu().float(), kv_cat, sink.cpu(), idx_cat)
    assert not torch.isnan(o).any()
    assert torch.equal(o.view(torch.int16), base.view(torch.int16))
    _check(o[:, rows], ref)


def test_sparse_long_launch_of_few_keys_overlaps_its_output():
    """``sparse_attention`` with 128 keys a query in a long launch walks 4 queries a CTA with ``overlap_epilogue`` (each
    query's output path around the next query's first QKᵀ): the bits of the same config walking one query a CTA, no
    NaN, its first and last queries against the reference; the batch-invariant call gives the same bits."""
    from tilev4.dsl import AttentionKernel
    from tilev4.dsl.runtime import _num_sms
    from tilev4.kernels import attention as A

    sms = _num_sms(torch.cuda.current_device())
    b, s, k, n = 1, A.LONG_LAUNCH_WAVES * A.LONG_LAUNCH_QUERY_TILES["sparse"] * sms + 3, 128, 3000
    kern = A._kernel("sparse", 64, False, None, False)
    plan = kern.plan(b, s, [k], num_sms=sms, device_sms=sms)
    assert plan.kind == "main" and plan.config.query_tiles == 4 and plan.config.overlap_epilogue
    g = _gen(1400)
    q, kv = _randn(b, s, 64, 512, g=g), _randn(b, n, 512, g=g)
    sink = torch.randn(64, generator=g, device="cuda")
    idx = torch.randint(0, n, (b, s, k), generator=g, device="cuda", dtype=torch.int32)
    idx[:, :, 5::9] = -1
    idx[:, 7, :] = -1  # a query without keys (output 0)
    o = tilev4.sparse_attention(q, kv, sink, idx, out=_poisoned(q))
    o_bi = tilev4.sparse_attention(q, kv, sink, idx, batch_invariant=True, out=_poisoned(q))
    one = AttentionKernel(kern.spec, kern.launch_config("main"))
    base = one(q, torch.zeros(b, s, dtype=torch.int32, device="cuda"), sink, out=_poisoned(q), sel_kv=kv, sel_idx=idx)
    assert not torch.isnan(o).any()
    assert torch.equal(o.view(torch.int16), base.view(torch.int16))
    assert torch.equal(o.view(torch.int16), o_bi.view(torch.int16))
    assert torch.count_nonzero(o[:, 7]) == 0
    rows = list(range(8)) + list(range(s - 8, s))
    _check(o[:, rows], _ref_sparse(q[:, rows], kv, sink, idx[:, rows]))


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.integers(1, 64), row=st.integers(0, 63), seed=st.integers(0, 2**20))
def test_batch_invariant_decode_bit_exact(batch, row, seed):
    g = _gen(seed)
    row = row % batch
    heads, k, ring, n_c = 64, 512, 256, 4096
    # up to 2^19: HCA rows of more than 32 key blocks (t >= ~245K) span two splits, shorter rows fit in one
    positions = torch.randint(0, 2**19, (batch, 1), generator=g, device="cuda", dtype=torch.int32)
    q, kv_w, kv_c, sink, idx = _csa_case(g, batch, 1, heads, n_c, k, positions, ring=ring)
    full = tilev4.csa_attention(q, kv_w, kv_c, idx, sink, positions, batch_invariant=True)
    sl = slice(row, row + 1)
    alone = tilev4.csa_attention(q[sl].contiguous(), kv_w[sl].contiguous(), kv_c[sl].contiguous(),
                                 idx[sl].contiguous(), sink, positions[sl].contiguous(), batch_invariant=True)
    assert torch.equal(full[sl], alone)
    # HCA: the compressed cache length differs with the batch; the row's bits must not
    hca_full = tilev4.hca_attention(q, kv_w, kv_c, sink, positions, batch_invariant=True)
    short = int((positions[row] + 1) // 128) + 1
    hca_alone = tilev4.hca_attention(q[sl].contiguous(), kv_w[sl].contiguous(), kv_c[sl, :short].contiguous(),
                                     sink, positions[sl].contiguous(), batch_invariant=True)
    assert torch.equal(hca_full[sl], hca_alone)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(b=st.integers(1, 3), s=st.integers(1, 300), pick=st.integers(0, 2), seed=st.integers(0, 2**20))
def test_batch_invariant_prefill_bit_exact(b, s, pick, seed):
    """CSA and HCA prefill (stream windows at ragged starts) with ``batch_invariant=True``: a sequence's outputs are
    those of the sequence launched alone, whatever the other sequences (and, for HCA, the longer compressed cache
    they need)."""
    g = _gen(seed)
    bi = pick % b
    start = torch.randint(0, 5000, (b,), generator=g, device="cuda", dtype=torch.int32)
    positions = start.view(b, 1) + torch.arange(s, device="cuda", dtype=torch.int32)
    n_c = int(positions.max() + 1) // 4 + 1
    q, kv_w, kv_c, sink, idx = _csa_case(g, b, s, 64, n_c, 512, positions, start=start, n_stream=s)
    sl = slice(bi, bi + 1)
    one = [t[sl].contiguous() for t in (q, kv_w, kv_c, idx, positions, start)]
    full = tilev4.csa_attention(q, kv_w, kv_c, idx, sink, positions, window_start=start, batch_invariant=True,
                                out=_poisoned(q))
    alone = tilev4.csa_attention(*one[:4], sink, one[4], window_start=one[5], batch_invariant=True,
                                 out=_poisoned(one[0]))
    assert not torch.isnan(alone).any()
    assert torch.equal(full[sl].view(torch.int16), alone.view(torch.int16))
    kv_h = _randn(b, int(positions.max() + 1) // 128 + 1, 512, g=g)
    short = int(positions[bi].max() + 1) // 128 + 1
    full_h = tilev4.hca_attention(q, kv_w, kv_h, sink, positions, window_start=start, batch_invariant=True,
                                  out=_poisoned(q))
    alone_h = tilev4.hca_attention(one[0], one[1], kv_h[sl, :short].contiguous(), sink, one[4], window_start=one[5],
                                   batch_invariant=True, out=_poisoned(one[0]))
    assert not torch.isnan(alone_h).any()
    assert torch.equal(full_h[sl].view(torch.int16), alone_h.view(torch.int16))


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(b=st.integers(1, 3), s=st.integers(1, 300), k=st.sampled_from([64, 200, 640, 2100]), pick=st.integers(0, 10**6),
       seed=st.integers(0, 2**20))
def test_batch_invariant_sparse_bit_exact(b, s, k, pick, seed):
    """``sparse_attention(batch_invariant=True)``: a query's bits are those of the same query launched alone, whatever
    the batch and sequence length around it (one query a CTA, several, or persistent CTAs; rows past 2048 keys in
    fixed 2048-key splits), with unused (−1) and duplicated indices."""
    g = _gen(seed)
    n = 3000
    q, kv = _randn(b, s, 64, 512, g=g), _randn(b, n, 512, g=g)
    sink = torch.randn(64, generator=g, device="cuda")
    idx = torch.randint(-1, n, (b, s, k), generator=g, device="cuda", dtype=torch.int32)
    bi, si = divmod(pick % (b * s), s)
    full = tilev4.sparse_attention(q, kv, sink, idx, batch_invariant=True, out=_poisoned(q))
    q1 = q[bi : bi + 1, si : si + 1].contiguous()
    alone = tilev4.sparse_attention(q1, kv[bi : bi + 1].contiguous(), sink, idx[bi : bi + 1, si : si + 1].contiguous(),
                                    batch_invariant=True, out=_poisoned(q1))
    assert not torch.isnan(alone).any()
    assert torch.equal(full[bi, si].view(torch.int16), alone[0, 0].view(torch.int16))


def test_bad_input_gpu():
    g = _gen(5)
    q, kv = _randn(1, 2, 64, 512, g=g), _randn(1, 10, 512, g=g)
    sink = torch.zeros(64, device="cuda")
    idx = torch.zeros(1, 2, 8, dtype=torch.int32, device="cuda")
    idx[0, 1, 3] = 10
    with pytest.raises(ValueError, match="index 10 is out of range"):
        tilev4.sparse_attention(q, kv, sink, idx)
    idx[0, 1, 3] = -2
    with pytest.raises(ValueError, match=">= -1"):
        tilev4.sparse_attention(q, kv, sink, idx)
    with pytest.raises(TypeError, match="sel_idx must be int32"):
        tilev4.sparse_attention(q, kv, sink, idx.long())
    idx[0, 1, 3] = 0
    shifted = torch.empty(q.numel() + 1, dtype=torch.bfloat16, device="cuda")[1:].view(q.shape)  # 2 bytes off
    shifted.copy_(q)
    with pytest.raises(ValueError, match="q must start at a 16-byte aligned address"):
        tilev4.sparse_attention(shifted, kv, sink, idx)
    with pytest.raises(ValueError, match="out must start at a 16-byte aligned address"):
        tilev4.sparse_attention(q, kv, sink, idx, out=shifted)
    with pytest.raises(ValueError, match="contiguous"):
        tilev4.sparse_attention(q, _randn(1, 10, 1024, g=g)[..., :512], sink, idx.clamp(min=0))
    with pytest.raises(ValueError, match="sink"):
        tilev4.sparse_attention(q, kv, sink[:8], idx.clamp(min=0))
    with pytest.raises(ValueError, match="ring"):
        tilev4.csa_attention(_randn(1, 2, 64, 512, g=g), _randn(1, 128, 512, g=g), kv, idx.clamp(min=0), sink,
                             torch.zeros(1, 2, dtype=torch.int32, device="cuda"))
