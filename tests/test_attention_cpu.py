"""Attention DSL: spec validation, input checks that need no GPU."""

import pytest
import torch

import tilev4
from tilev4.dsl import AttentionSpec, CompressedDense, IndexList, Window
from tilev4.dsl.codegen import head_block, tensor_layout


def test_spec_validation():
    with pytest.raises(ValueError, match="heads"):
        AttentionSpec(heads=0, sources=(Window(),))
    with pytest.raises(ValueError, match="head_dim"):
        AttentionSpec(heads=4, head_dim=100, sources=(Window(),))
    with pytest.raises(ValueError, match="unique"):
        AttentionSpec(heads=4, sources=(IndexList("a"), IndexList("a")))
    with pytest.raises(ValueError, match="at least one"):
        AttentionSpec(heads=4, sources=())
    with pytest.raises(ValueError, match="Window size"):
        Window(size=0)


def test_layout_and_head_blocks():
    spec = AttentionSpec(heads=64, sources=(Window("window"), CompressedDense("comp")), return_lse=True)
    names = [n for n, _ in tensor_layout(spec, split=False)]
    assert names == ["q", "positions", "sink", "window_kv", "window_start", "comp_kv", "o", "lse"]
    assert [head_block(h) for h in (64, 128, 96, 48, 8, 20)] == [64, 64, 32, 16, 16, 32]
    assert "Window(128) ∪ CompressedDense(128)" in spec.describe()


def test_public_ops_reject_bad_input_on_cpu():
    q = torch.randn(1, 2, 64, 512)
    with pytest.raises(TypeError, match="q must be bfloat16"):
        tilev4.sparse_attention(q, torch.randn(1, 4, 512), torch.zeros(64), torch.zeros(1, 2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="CUDA"):
        tilev4.sparse_attention(q.bfloat16(), torch.randn(1, 4, 512).bfloat16(), torch.zeros(64),
                                torch.zeros(1, 2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="scale"):
        tilev4.sparse_attention(q.bfloat16(), torch.randn(1, 4, 512).bfloat16(), torch.zeros(64),
                                torch.zeros(1, 2, 4, dtype=torch.int32), scale=-1.0)


def test_long_launches_take_two_queries_a_cta():
    """The ops' one-pass program (one head block) runs one persistent CTA an SM a sequence from 2 queries an SM a
    sequence on, up to the long launches of LONG_LAUNCH_QUERY_TILES queries a CTA; in those, persistent CTAs only
    where LONG_LAUNCH_PERSISTENT says so (sparse queries of 4 key blocks or more); default and batch-invariant calls
    alike; one query a CTA otherwise; split programs always one. The query_tiles programs of LONG_LAUNCH_OVERLAP
    (HCA, sparse) run each query's output path around the next query's first QKᵀ; no other walk does."""
    from tilev4.kernels import attention as A

    sms = 132
    assert A.LONG_LAUNCH_PERSISTENT == {"sparse": 4} and A.PERSISTENT_QUERIES_PER_SM == 2
    assert A.LONG_LAUNCH_OVERLAP == {"hca", "sparse"}

    def walk_of(cfg):
        return cfg.query_tiles, cfg.persistent_ctas

    cases = (("csa", [128, 512], False), ("hca", [128, 512], False), ("csa", [128, 128], False),
             ("sparse", [512], True), ("sparse", [2048], True), ("sparse", [256], True), ("sparse", [193], True),
             ("sparse", [192], False), ("sparse", [128], False), ("sparse", [64], False))
    for variant, keys, long_persistent in cases:
        qt = A.LONG_LAUNCH_QUERY_TILES[variant]
        long = A.LONG_LAUNCH_WAVES * qt * sms
        k = A._kernel(variant, 64, False, None, False)

        def plan(b, s, k=k, keys=keys, **kw):
            return walk_of(k.plan(b, s, keys, **({"num_sms": sms, "device_sms": sms} | kw)).config)

        # persistent CTAs from 2 queries an SM, in one sequence
        assert plan(1, 2 * sms) == (1, sms) and plan(1, 2 * sms - 1) == (1, 0)
        assert plan(1, 2 * sms, batch_invariant=True, num_sms=None) == (1, sms)
        assert plan(3, 2 * sms) == (1, sms)  # each sequence fills the GPU twice
        assert plan(2, sms) == (1, 0)  # as many queries, in two sequences: one query a CTA
        assert plan(1, long - 1) == (1, sms)  # up to the long launches
        # the long launches: persistent where LONG_LAUNCH_PERSISTENT says so, else qt queries a CTA
        walk = (1, sms) if long_persistent else (qt, 0)
        assert plan(1, long) == walk and plan(1, long, batch_invariant=True, num_sms=None) == walk
        assert plan(1, 1 << 16) == walk
        assert plan(64, long // 64) == (qt, 0)  # short sequences: queries of all rows, no persistent CTAs
        assert plan(1, 1 << 16, device_sms=None) == (1, 0)  # no device: as tuned
        assert plan(1, 1 << 16, num_sms=114, device_sms=114) == (
            (1, 114) if long_persistent else (qt, 0))  # another SM count: one CTA an SM
        assert plan(1, 1000, num_sms=114, device_sms=114) == (1, 114)
        short = k.plan(1, 4, keys, num_sms=sms, device_sms=sms)  # split into 128-key pieces where there are several
        assert short.kind == ("split" if k.num_key_blocks(keys, 64) > 2 else "main") and walk_of(short.config) == (1, 0)
        assert short.kind == "main" or short.config.split_keys == 128
        bi_split = k.plan(1, 4, [128, 4096], batch_invariant=True, device_sms=sms)  # two batch-invariant splits
        assert bi_split.kind == "split" and walk_of(bi_split.config) == (1, 0)
        cfg = k.registry_config("main", k.plan(1, 1 << 16, keys, num_sms=sms, device_sms=sms).config)
        assert (cfg["query_tiles"], cfg["persistent_ctas"]) == walk
        assert cfg["overlap_epilogue"] == (walk[0] > 1 and variant in A.LONG_LAUNCH_OVERLAP)
        for b, s in ((1, 2 * sms), (1, 4), (1, long - 1)):  # persistent, split or one query a CTA: no overlap
            assert not k.plan(b, s, keys, num_sms=sms, device_sms=sms).config.overlap_epilogue
        assert not k.plan(1, 4, [128, 4096], batch_invariant=True, device_sms=sms).config.overlap_epilogue
    # the shipped configs hold the query_tiles and the persistent program of every variant (stream layout)
    for variant, qt in A.LONG_LAUNCH_QUERY_TILES.items():
        shipped = [c for c in A._configs(variant) if c["kind"] == "main" and c["heads"] == 64 and not c.get("ring")]
        assert {(c.get("query_tiles", 1), c.get("persistent_ctas", 0)) for c in shipped} == {(1, 0), (qt, 0),
                                                                                            (1, 132)}
        assert [c.get("query_tiles", 1) for c in A._configs(variant) if c.get("overlap_epilogue")] == (
            [qt] if variant in A.LONG_LAUNCH_OVERLAP else [])
    pro = A._kernel("csa", 128, False, None, False)  # two head blocks: measured slower with several queries a CTA
    for s in (2 * sms, 1000, 1 << 16):
        assert walk_of(pro.plan(1, s, [128, 1024], num_sms=sms, device_sms=sms).config) == (1, 0)


def test_overlap_epilogue_needs_several_queries_a_cta():
    """``overlap_epilogue`` is a walk of several consecutive queries a CTA: refused with one query a CTA or with
    persistent CTAs (ValueError naming both knobs), and it must be a bool (TypeError); a split program walks one query
    a CTA without it."""
    from tilev4.dsl.codegen import AttentionConfig

    with pytest.raises(ValueError, match=r"overlap_epilogue=True needs query_tiles > 1.*query_tiles=1"):
        AttentionConfig(overlap_epilogue=True)
    with pytest.raises(ValueError, match=r"overlap_epilogue=True needs query_tiles > 1.*persistent_ctas=132"):
        AttentionConfig(persistent_ctas=132, overlap_epilogue=True)
    with pytest.raises(TypeError, match="overlap_epilogue must be a bool, got 1"):
        AttentionConfig(query_tiles=2, overlap_epilogue=1)
    cfg = AttentionConfig(query_tiles=8, overlap_epilogue=True)
    assert cfg.one_query() == AttentionConfig()
