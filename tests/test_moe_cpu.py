"""MoE kernels without a GPU: registry entries, input checks, the schedule bound, the exact gate weight split."""

import importlib

import pytest
import torch

from tilev4.kernels import get_kernel_def, iter_registry

K = importlib.import_module("tilev4.kernels.moe")  # tilev4.kernels also exports the function `moe`
F8 = importlib.import_module("tilev4.kernels.moe_fp8")

MOE_KERNELS = {"moe_gate", "moe_count", "moe_scan", "moe_scatter", "moe_up", "moe_down", "moe_combine", "moe_up_fp8",
               "moe_up_fp8_q", "moe_down_fp8", "moe_up_fp4", "moe_down_fp4"}


def test_registry_has_every_moe_kernel_with_flash_and_tiny_configs():
    kernels = {k.name: k for k in iter_registry() if "moe" in k.tags}
    assert set(kernels) == MOE_KERNELS
    # every config is compiled by the AOT test (10-60 s each on 2 cores): one per FP8 / FP4 GEMM at the V4-Flash K
    # (and the FP8 up-projection quantising h, and the FP4 GEMMs for prepared weights)
    assert sum(len(k.configs) for k in kernels.values()) <= 19
    for name in ("moe_up_fp4", "moe_down_fp4"):
        assert [dict(c).get("layout", "checkpoint") for c in kernels[name].configs] == ["checkpoint", "prepared"]
    for k in kernels.values():
        assert k.summary, f"{k.name}: the factory needs a docstring"
        assert k.batch_invariant, f"{k.name}: every MoE kernel is batch-invariant"
    gate = [dict(c) for c in kernels["moe_gate"].configs]
    assert {"dim": 4096, "num_experts": 256, "top_k": 6} in gate  # V4-Flash score layers
    assert {"dim": 4096, "num_experts": 256, "top_k": 6, "hash": True} in gate  # V4-Flash hash layers
    assert {"dim": 256, "num_experts": 8, "top_k": 2} in gate  # the tiny test model
    combine = [dict(c) for c in kernels["moe_combine"].configs]
    assert {"dim": 4096, "top_k": 6} in combine and {"dim": 256, "top_k": 2} in combine
    # the K extent of each GEMM is static (dim for up, inter for down); token counts and N are run-time
    up = [dict(c) for c in kernels["moe_up"].configs]
    assert {"dim": 4096} in up and {"dim": 4096, "dense": True} in up
    down = [dict(c) for c in kernels["moe_down"].configs]
    assert {"inter": 2048} in down and {"inter": 2048, "dense": True} in down


@pytest.mark.parametrize(
    ("build", "kwargs", "match"),
    [
        (K.build_moe_up, {"dim": 4096, "weight_format": "fp8"}, "weight_format"),
        (K.build_moe_down, {"inter": 2048, "weight_format": "fp4"}, "weight_format"),
        (K.build_moe_up, {"dim": 4096, "schedule": "tma"}, "schedule"),
        (K.build_moe_down, {"inter": 2048, "block_m": 64}, "block_m"),
        (K.build_moe_gate, {"dim": 256, "num_experts": 8, "top_k": 9}, "top_k"),
        (K.build_moe_gate, {"dim": 256, "num_experts": 400, "top_k": 6}, "num_experts"),
        (K.build_moe_combine, {"dim": 256, "top_k": 2, "out_dtype": "float16"}, "out_dtype"),
        (F8.build_moe_down_fp8, {"inter": 2048, "block_n": 256, "schedule": "pipelined"}, "block_n=256"),
        (F8.build_moe_down_fp8, {"inter": 2048, "block_n": 192}, "block_n=192"),
        (F8.build_moe_down_fp8, {"inter": 2048, "block_n": 32}, "block_n=32"),
    ],
)
def test_factories_reject_bad_keys(build, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(**kwargs)


def test_max_tiles_bounds_every_routing(gen):
    """The grouped GEMM grid is sized from _max_tiles: it must cover Σ_e ceil(count_e / BM) for any counts."""
    bm = K.BLOCK_M
    for _ in range(200):
        num_experts = int(torch.randint(1, 400, (1,), generator=gen))
        n = int(torch.randint(0, 5000, (1,), generator=gen))
        ids = torch.randint(0, num_experts, (n,), generator=gen)
        if n and torch.rand(1, generator=gen) < 0.3:  # skewed: most pairs on a few experts
            ids = ids % max(1, num_experts // 50)
        counts = torch.bincount(ids, minlength=num_experts)
        assert int(((counts + bm - 1) // bm).sum()) <= K._max_tiles(n, num_experts, bm)


def test_gate_weight_split_is_exact(gen):
    """The gate runs x·(hi + mid + lo) with three bf16 roundings of what is left: their sum is the fp32 weight."""
    w = torch.randn(1 << 16, generator=gen) * torch.exp2(torch.randint(-60, 60, (1 << 16,), generator=gen).float())
    w = torch.cat([w, torch.tensor([0.0, -0.0, 1.0, -3.0e38, 3.0e38, 1.0e-30, 0.1, 1 / 3])])
    hi = w.bfloat16()
    rest = w - hi.float()  # exact (Sterbenz), as in the kernel
    mid = rest.bfloat16()
    lo = (rest - mid.float()).bfloat16()
    assert torch.equal(hi.double() + mid.double() + lo.double(), w.double())


def _routing(t=4, dim=64, k=2):
    x = torch.randn(t, dim).bfloat16()
    return x, torch.rand(t, k), torch.randint(0, 8, (t, k), dtype=torch.int32)


def _stacked(e=8, inter=32, dim=64):
    return (torch.randn(e, inter, dim).bfloat16(), torch.randn(e, dim, inter).bfloat16(),
            torch.randn(e, inter, dim).bfloat16())


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: K.moe_route(torch.randn(4, 64), torch.randn(8, 64), top_k=2), TypeError, "x must be bfloat16"),
        (lambda: K.moe_route(torch.randn(4, 64).bfloat16(), torch.randn(8, 64).bfloat16(), top_k=2), TypeError,
         "weight must be float32"),
        (lambda: K.moe_route(torch.randn(4, 64).bfloat16(), torch.randn(8, 64), top_k=9), ValueError,
         "top_k must be <= the number of experts E=8"),
        (lambda: K.moe_route(torch.randn(4, 64).bfloat16(), torch.randn(8, 32), top_k=2), ValueError,
         r"weight must have shape \[8, 64\]"),
        (lambda: K.moe_route(torch.randn(4, 60).bfloat16(), torch.randn(8, 60), top_k=2), ValueError,
         "multiple of 8"),
        (lambda: K.moe_route(torch.randn(4, 64).bfloat16(), torch.randn(8, 64), top_k=2, route_scale=0.0),
         ValueError, "route_scale"),
        (lambda: K.moe_route(torch.randn(4, 64).bfloat16(), torch.randn(8, 64), torch.zeros(7), top_k=2),
         ValueError, "bias must have shape"),
        (lambda: K.moe_route(torch.randn(4, 64).bfloat16(), torch.randn(8, 64), top_k=2,
                             tid2eid=torch.zeros(10, 2, dtype=torch.int32)), ValueError, "token_ids is None"),
        (lambda: K.moe_route(torch.randn(4, 64).bfloat16(), torch.randn(8, 64), torch.zeros(8), top_k=2,
                             tid2eid=torch.zeros(10, 2, dtype=torch.int32),
                             token_ids=torch.zeros(4, dtype=torch.int64)), ValueError, "bias must be None"),
        (lambda: K.moe_route(torch.randn(4, 64).bfloat16(), torch.randn(8, 64), top_k=2,
                             tid2eid=torch.zeros(10, 3, dtype=torch.int32),
                             token_ids=torch.zeros(4, dtype=torch.int64)), ValueError, "tid2eid must have shape"),
        (lambda: K.moe_route(torch.randn(4, 64).bfloat16(), torch.randn(8, 64), top_k=2), ValueError,
         "x must be a CUDA tensor"),
        (lambda: K.moe_permute(*_routing(), num_experts=0), ValueError, "num_experts must be >= 1"),
        (lambda: K.moe_permute(_routing()[0], _routing()[1].double(), _routing()[2], 8), TypeError,
         "weights must be float32"),
        (lambda: K.moe_permute(_routing()[0], torch.rand(4, 3), _routing()[2], 8), ValueError,
         r"experts must have shape \[4, 3\]"),
        (lambda: K.moe_permute(*_routing(), num_experts=8), ValueError, "x must be a CUDA tensor"),
        (lambda: K.moe_experts(*_routing(), *_stacked(), weight_format="fp2"), ValueError, "weight_format"),
        (lambda: K.moe_experts(*_routing(), *_stacked(), weight_format="fp4"), TypeError, "w1 must be an FP4Weight"),
        (lambda: K.moe_experts(*_routing(), *_stacked(), swiglu_limit=-1.0), ValueError, "swiglu_limit"),
        (lambda: K.moe_experts(*_routing(), *_stacked(), out_dtype=torch.float16), TypeError, "out_dtype"),
        (lambda: K.moe_experts(*_routing(), *_stacked(), up_block_m=256), ValueError,
         "up_block_m must be None or one of"),
        (lambda: K.moe_experts(*_routing(), *_stacked(), weight_format="fp8", up_block_m=192), ValueError,
         "up_block_m=192 needs bf16 weights"),
        (lambda: K.moe_experts(*_routing(), *_stacked(inter=30)), ValueError, "multiple of 8"),
        (lambda: K.moe_experts(*_routing(), *_stacked()[:2], torch.randn(8, 16, 64).bfloat16()), ValueError,
         r"w3 must have shape \[8, 32, 64\]"),
        (lambda: K.moe_experts(*_routing(), _stacked()[0].float(), *_stacked()[1:]), TypeError,
         "w1 must be bfloat16"),
        (lambda: K.moe_experts(*_routing(), *_stacked(), shared=(torch.randn(32, 64).bfloat16(),)), TypeError,
         "shared must be a"),
        (lambda: K.moe_experts(*_routing(), *_stacked(), shared=(torch.randn(32, 64).bfloat16(),
                                                                 torch.randn(64, 16).bfloat16(),
                                                                 torch.randn(32, 64).bfloat16())), ValueError,
         r"shared.w2 must have shape \[64, 32\]"),
        (lambda: K.moe_experts(*_routing(), *_stacked()), ValueError, "x must be a CUDA tensor"),
        (lambda: K.moe_shared_expert(torch.randn(4, 64).bfloat16(), torch.randn(32, 64).bfloat16(),
                                     torch.randn(64, 32).bfloat16(), torch.randn(32, 64).bfloat16()), ValueError,
         "x must be a CUDA tensor"),
        (lambda: K.moe_combine(torch.randn(8, 64).bfloat16(), torch.zeros(4, 2, dtype=torch.int64)), TypeError,
         "pair_pos must be int32"),
        (lambda: K.moe_combine(torch.randn(8, 64).bfloat16(), torch.zeros(4, 2, dtype=torch.int32)), ValueError,
         "y_sorted must be a CUDA tensor"),
        (lambda: K.moe("x", torch.randn(8, 64), None, *_stacked()), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_zero_tokens_are_validated_like_any_batch():
    x = torch.empty(0, 64).bfloat16()
    with pytest.raises(ValueError, match="CUDA"):  # shapes are fine: only the device is wrong
        K.moe_experts(x, torch.empty(0, 2), torch.empty(0, 2, dtype=torch.int32), *_stacked())
    with pytest.raises(ValueError, match=r"experts must have shape \[0, 2\]"):
        K.moe_experts(x, torch.empty(0, 2), torch.empty(0, 3, dtype=torch.int32), *_stacked())


def test_kernel_lookup_by_name():
    assert get_kernel_def("moe_up").default_config == {"dim": 4096}
    assert get_kernel_def("moe_gate").default_config == {"dim": 4096, "num_experts": 256, "top_k": 6}


def test_up_tile_table_192_rule():
    """The bf16 up-projection's 192-row table: one tile for an expert of 1-192 rows, 128-row tiles past that, the
    last one taking a remainder of at most 64 rows too (320 = 128 + 192; a 193-row expert is 128 + 65 rows, not
    192 + 1), none for an empty expert; the same rule in the scan's TileLang expression and in the tuner's
    host-side tables."""
    import torch

    from tilev4.kernels.moe_tuning import tile_tables
    from tilev4.kernels.moe_ws import tiles_of

    counts = [0, 1, 64, 128, 129, 192, 193, 256, 257, 320, 321, 1088, 1089]
    want = [0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 8, 9]
    assert [tiles_of(c, 192) for c in counts] == want
    assert [tiles_of(c, 128) for c in counts] == [-(-c // 128) for c in counts]
    offsets, tile_offsets, tile_expert = tile_tables(torch.tensor(counts), 192, sum(counts))
    assert tile_offsets.tolist() == [0, *torch.tensor(want).cumsum(0).tolist()]
    assert tile_expert[: sum(want)].tolist() == [e for e, t in enumerate(want) for _ in range(t)]
    assert offsets[-1] == sum(counts)


def test_permute_rejects_an_unknown_up_tile():
    from tilev4.kernels.moe import moe_permute

    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    for bad in (64, 192.0, True, "192"):
        with pytest.raises(ValueError, match="up_block_m must be None or one of"):
            moe_permute(x, torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.int32), 8, up_block_m=bad)
    with pytest.raises(ValueError, match="up_block_m=192 is for bf16 rows"):
        moe_permute(x, torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.int32), 8, up_block_m=192, payload=x)


def test_the_benchmarks_balanced_routing_gives_every_expert_the_same_rows():
    from tilev4.bench.moe import ROUTE_SCALE, balanced_routing

    gen = torch.Generator().manual_seed(3)
    weights, experts = balanced_routing(96, 16, 4, gen)
    assert experts.dtype == torch.int32 and experts.shape == (96, 4)
    assert torch.bincount(experts.flatten().long(), minlength=16).tolist() == [24] * 16
    assert (experts.sort(-1).values.diff(dim=-1) != 0).all()  # a token's experts are distinct
    assert (weights > 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.full((96,), ROUTE_SCALE))
    with pytest.raises(ValueError, match="num_experts=16"):
        balanced_routing(5, 16, 4, gen)


def test_the_default_up_table_is_192_rows_where_a_balanced_routing_fills_them():
    assert K.choose_up_block_m(8192 * 6, 256) == 192  # V4-Flash prefill: 192 rows an expert
    assert K.choose_up_block_m(192 * 256, 256) == 192 and K.choose_up_block_m(192 * 256 + 1, 256) == 128
    assert K.choose_up_block_m(128 * 256, 256) == 128 and K.choose_up_block_m(128 * 256 + 1, 256) == 192
    assert K.choose_up_block_m(64 * 6, 256) == 128 and K.choose_up_block_m(0, 8) == 128  # decode, no token
