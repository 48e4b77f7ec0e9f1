"""Tuning spaces, buckets and harnesses of the MoE kernels and fp8_linear, on the CPU.

The harnesses are exercised as the tuner uses them: a case with reference outputs, a check that passes on
the expected outputs (and on fp32 math rounded as a kernel rounds it) and fails on poisoned (0xFF) or wrong
outputs, and sub-batches whose inputs and tile tables are the matching rows of the full batch.
"""

import contextlib
import dataclasses
import importlib
import inspect

import pytest
import torch

from tilev4.autotune.space import SMEM_LIMIT_BYTES
from tilev4.autotune.tuner import NotTunable, plan_kernel
from tilev4.kernels import get_kernel_def
from tilev4.kernels import moe_tuning as MT

K = importlib.import_module("tilev4.kernels.moe")  # tilev4.kernels also exports the function `moe`
F8 = importlib.import_module("tilev4.kernels.moe_fp8")
F4 = importlib.import_module("tilev4.kernels.moe_fp4")

GROUPED = ("moe_up", "moe_down", "moe_up_fp8", "moe_down_fp8", "moe_up_fp4", "moe_down_fp4")
TUNED = (*GROUPED, "fp8_linear", "moe_gate", "moe_combine")
UNTUNED = ("moe_count", "moe_scan", "moe_scatter")

# (kernel, config): small problems of every harness path (grouped / dense, score / hash, out dtypes)
CASES = [
    ("moe_up", {"dim": 256}),
    ("moe_up", {"dim": 256, "dense": True}),
    ("moe_down", {"inter": 128}),
    ("moe_down", {"inter": 128, "dense": True}),
    ("moe_up_fp8", {"dim": 256}),
    ("moe_down_fp8", {"inter": 128}),
    ("moe_up_fp4", {"dim": 256}),
    ("moe_down_fp4", {"inter": 128}),
    ("fp8_linear", {"K": 256}),
    ("fp8_linear", {"K": 256, "out_dtype": "bfloat16"}),
    ("moe_gate", {"dim": 256, "num_experts": 8, "top_k": 2}),
    ("moe_gate", {"dim": 256, "num_experts": 8, "top_k": 2, "hash": True}),
    ("moe_combine", {"dim": 256, "top_k": 2}),
    ("moe_combine", {"dim": 256, "top_k": 2, "has_shared": False, "out_dtype": "float32"}),
]
ROWS = 150  # several partial M tiles over the harness's experts


def _case(name, cfg, rows=ROWS, seed=0):
    kdef = get_kernel_def(name)
    problem = kdef.problem(cfg)
    return kdef, problem, kdef.harness.make_case(problem, rows, torch.Generator().manual_seed(seed), "cpu", True)


def _as_outputs(case):
    """The expected values in the output tensors' dtypes (what a kernel that rounds like the reference writes)."""
    return tuple((e.ref if isinstance(e, (MT.Bounded, MT.Selection)) else e).to(o.dtype)
                 for o, e in zip(case.output_tensors(), case.expected))


def _poisoned(outs):
    outs = tuple(o.clone() for o in outs)
    for t in outs:
        t.view(-1).view(torch.uint8).fill_(255)
    return outs


# ------------------------------------------------------------------------------------------------ spaces


def test_tuned_kernels_have_small_spaces_with_the_defaults_first():
    shapes = {"moe_up": [{"dim": 7168}, {"dim": 256, "dense": True}], "moe_down": [{"inter": 3072}],
              "moe_up_fp4": [{"dim": 7168}], "moe_gate": [{"dim": 7168, "num_experts": 384, "top_k": 6}],
              "fp8_linear": [{"K": 7168, "out_dtype": "bfloat16"}], "moe_combine": [{"dim": 7168, "top_k": 6}]}
    for name in TUNED:
        kdef = get_kernel_def(name)
        assert kdef.space is not None and kdef.harness is not None and kdef.bucket_fn is not None, name
        assert "warp_specialized" not in kdef.space.keys, name
        plans = plan_kernel(name, arch="sm_90a") + plan_kernel(name, shapes.get(name, []), arch="sm_90a")
        for plan in plans:
            assert 1 <= len(plan.candidates) <= 8, (name, plan.bucket, len(plan.candidates))
            assert plan.default_is_candidate0, (name, plan.bucket)
            defaults = {k: v.default for k, v in inspect.signature(kdef.builder).parameters.items()}
            assert plan.candidates[0] == {k: defaults[k] for k in kdef.space.keys}, name
            for cand in plan.candidates:
                for problem in plan.problems:
                    assert kdef.space.why_invalid({**problem, **cand}, SMEM_LIMIT_BYTES["sm_90a"]) is None


def test_measured_faster_configs_are_candidates():
    """The H200 hints: both schedules; the pipelined moe_down 128×128×64 with 3 stages and moe_up 128×128×64 with
    3-4 stages measured fastest of that schedule; ws moe_up 128×(128+128) and moe_down 128×256, 4 stages, are the
    defaults."""
    (down,) = plan_kernel("moe_down", [{"inter": 2048}], arch="sm_90a")
    assert down.candidates[0] == {"schedule": "ws", "block_n": 256, "block_k": 64, "num_stages": 4, "threads": 256}
    assert {"schedule": "pipelined", "block_n": 128, "block_k": 64, "num_stages": 3, "threads": 256} in down.candidates
    (up,) = plan_kernel("moe_up", [{"dim": 4096}], arch="sm_90a")
    assert up.candidates[0] == {"schedule": "ws", "block_n": 128, "block_k": 64, "num_stages": 4, "threads": 256}
    (down8,) = plan_kernel("moe_down_fp8", [{"inter": 2048}], arch="sm_90a")  # 128 × 256 measured 16 % faster
    assert down8.candidates[0] == {"block_n": 256, "num_stages": 4, "threads": 256}
    assert {"block_n": 128, "num_stages": 4, "threads": 256} in down8.candidates
    for stages in (3, 4):
        assert {"schedule": "pipelined", "block_n": 128, "block_k": 64, "num_stages": stages,
                "threads": 256} in up.candidates


def test_static_pruning_reasons():
    up = get_kernel_def("moe_up")
    base = {**up.problem({"dim": 4096}), "block_n": 128, "block_k": 64, "num_stages": 4, "threads": 256}
    assert up.space.why_invalid(base, SMEM_LIMIT_BYTES["sm_90a"]) is None
    assert MT._moe_up_smem(base) == 230400  # the sm_90a build of the default allocates exactly this
    assert "warpgroup" in up.space.why_invalid({**base, "threads": 128})
    assert "in flight" in up.space.why_invalid({**base, "block_k": 128, "num_stages": 3})
    assert "partial K tile" in up.space.why_invalid({**base, "dim": 192, "block_k": 128, "num_stages": 2})
    assert up.space.why_invalid({**base, "dim": 264}) is None  # the default's own partial tile stays allowed
    assert "accumulators" in up.space.why_invalid({**base, "block_n": 256})
    fp8 = get_kernel_def("moe_up_fp8")
    assert "one weight scale" in fp8.space.why_invalid({**fp8.problem({"dim": 4096}), "block_n": 96,
                                                        "num_stages": 3, "threads": 256})
    # the FP8 down-projection's 256-column tile: two halves of one scale each, ws schedule only
    down8 = get_kernel_def("moe_down_fp8")
    wide = {**down8.problem({"inter": 2048}), "block_n": 256, "num_stages": 4, "threads": 256}
    assert down8.space.why_invalid(wide, SMEM_LIMIT_BYTES["sm_90a"]) is None
    assert "ws schedule" in down8.space.why_invalid({**wide, "schedule": "pipelined"})
    assert "one weight scale" in down8.space.why_invalid({**wide, "block_n": 192})
    gate = get_kernel_def("moe_gate")
    tiny = {**gate.problem({"dim": 256, "num_experts": 8, "top_k": 2}), "block_k": 32, "block_e": 128,
            "num_stages": 2}
    assert "the kernel of block_e=256" in gate.space.why_invalid(tiny)
    pro = {**gate.problem({"dim": 7168, "num_experts": 384, "top_k": 6}), "block_k": 32, "block_e": 256,
           "num_stages": 3}
    assert "shared memory" in gate.space.why_invalid(pro, SMEM_LIMIT_BYTES["sm_90a"])


def test_192_row_tiles_prune_to_their_one_shape():
    """block_m = 192 (the bf16 up-projection's opt-in table): the ws program's own 512 threads, its A-slab staging
    (block_n = 2·block_k up, 4·block_k down, enough stages) and its shared memory (no staging tiles)."""
    up, down = get_kernel_def("moe_up"), get_kernel_def("moe_down")
    cfg = {**up.problem({"dim": 4096, "block_m": 192}), **{k: v for k, v in K.UP_192_CONFIG.items() if k != "block_m"}}
    assert up.space.why_invalid(cfg, SMEM_LIMIT_BYTES["sm_90a"]) is None
    assert MT._moe_up_smem(cfg) <= SMEM_LIMIT_BYTES["sm_90a"]
    assert "A slabs" in up.space.why_invalid({**cfg, "block_n": 64})
    assert up.space.why_invalid({**cfg, "schedule": "pipelined"}) is not None  # 384 threads, not a ws program
    assert up.space.why_invalid({**cfg, "num_stages": 5}, SMEM_LIMIT_BYTES["sm_90a"]) is not None
    wide = {**down.problem({"inter": 2048, "block_m": 192}), "schedule": "ws", "block_n": 256, "block_k": 64,
            "num_stages": 4, "threads": 256}
    assert down.space.why_invalid(wide, SMEM_LIMIT_BYTES["sm_90a"]) is None
    assert "A slabs" in down.space.why_invalid({**wide, "num_stages": 3})


def test_buckets_follow_the_static_sizes():
    up, down, comb = get_kernel_def("moe_up"), get_kernel_def("moe_down"), get_kernel_def("moe_combine")
    assert up.bucket(up.problem({"dim": 4096})) == "grouped,dim<=4096"
    assert up.bucket(up.problem({"dim": 4096, "dense": True})) == "dense,dim<=4096"
    assert up.bucket(up.problem({"dim": 7168})) == "grouped,dim>4096"
    assert up.bucket(up.problem({"dim": 4096, "block_m": 64})) == "grouped,dim<=4096,block_m=64"
    assert down.bucket(down.problem({"inter": 2048})) == "grouped,inter<=2048"
    assert down.bucket(down.problem({"inter": 3072})) == "grouped,inter>2048"
    assert get_kernel_def("moe_up_fp8").bucket({"dim": 1024, "block_m": 128}) == "dim<=1024"
    gate = get_kernel_def("moe_gate")
    assert gate.bucket(gate.problem({"dim": 4096, "num_experts": 256, "top_k": 6, "hash": True})) == "E>128"
    assert comb.bucket(comb.problem({"dim": 256, "top_k": 2})) == "dim<=1024"
    assert get_kernel_def("fp8_linear").bucket({"K": 7168}) == "K>4096"


def test_grouped_gemms_keep_block_m_a_problem_key():
    for name in GROUPED:
        kdef = get_kernel_def(name)
        assert "block_m" not in kdef.space.keys, name  # the tile table is built for it
        assert kdef.problem()["block_m"] == K.BLOCK_M


def test_permutation_kernels_are_not_tuned():
    for name in UNTUNED:
        kdef = get_kernel_def(name)
        assert kdef.space is None and kdef.harness is None and "Not tuned" in kdef.builder.__doc__
        with pytest.raises(NotTunable):
            plan_kernel(name, arch="sm_90a")


# ------------------------------------------------------------------------------------------------ ops


def _perm(n, dim, num_experts, block_m):
    """A CPU stand-in for a permutation (only shapes matter before the launch)."""
    i32 = torch.int32
    return K.MoEPermutation(num_experts, 2, block_m, torch.zeros(num_experts, dtype=i32),
                            torch.zeros(num_experts + 1, dtype=i32), torch.zeros(n, dtype=i32),
                            torch.zeros(n // 2, 2, dtype=i32), torch.zeros(num_experts + 1, dtype=i32),
                            torch.zeros(8, dtype=i32), torch.zeros(n, dim, dtype=torch.bfloat16), torch.ones(n),
                            tile_info=torch.zeros(8, 4, dtype=i32))


@pytest.fixture
def launches(monkeypatch):
    """Record (kernel, config) of every compile_kernel call of the MoE ops; launches do nothing."""
    seen = []

    def fake_compile(name, config=None, arch=None):
        seen.append((name, dict(config)))
        return lambda *args: None

    monkeypatch.setattr(K, "compile_kernel", fake_compile)
    monkeypatch.setattr(F8, "compile_kernel", fake_compile)
    monkeypatch.setattr(K, "_check_cuda", lambda name, t: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    return seen


def test_bf16_gemms_refuse_a_permutation_without_tile_records(launches):
    n, dim, inter, e = 6, 256, 128, 4
    perm = dataclasses.replace(_perm(n, dim, e, K.BLOCK_M), tile_info=None)
    bf = torch.bfloat16
    with pytest.raises(ValueError, match=r"perm\.tile_info must be the tile records"):
        K.moe_up(perm, torch.zeros(e, inter, dim, dtype=bf), torch.zeros(e, inter, dim, dtype=bf))
    with pytest.raises(ValueError, match=r"perm\.tile_info must be the tile records"):
        K.moe_down(perm, torch.zeros(n, inter, dtype=bf), torch.zeros(e, dim, inter, dtype=bf))
    assert not launches


def _quantized_ops(perm, n, dim, inter, e):
    """Each FP8 / FP4 expert GEMM op on ``perm`` (zero inputs), by the program it launches."""
    x8, xs = torch.zeros(n, dim, dtype=torch.float8_e4m3fn), torch.ones(n, dim // 128)
    h8, hs = torch.zeros(n, inter, dtype=torch.float8_e4m3fn), torch.ones(n, inter // 128)
    q8 = F8.quantize_fp8_weight
    w8 = {k: q8(torch.zeros(e, *shape)) for k, shape in (("up", (inter, dim)), ("down", (dim, inter)))}

    def q4(rows, k):
        return F4.FP4Weight(torch.zeros(e, rows, k // 2, dtype=torch.uint8),
                            torch.full((e, rows, k // 32), 127, dtype=torch.uint8))

    return {
        "moe_up_fp8": lambda: F8.moe_up_fp8(perm, x8, xs, w8["up"], w8["up"]),
        "moe_up_fp8_q": lambda: F8.moe_up_fp8(perm, x8, xs, w8["up"], w8["up"], quantize=True),
        "moe_down_fp8": lambda: F8.moe_down_fp8(perm, h8, hs, w8["down"]),
        "moe_up_fp4": lambda: F4.moe_up_fp4(perm, x8, xs, q4(inter, dim), q4(inter, dim)),
        "moe_down_fp4": lambda: F4.moe_down_fp4(perm, h8, hs, q4(dim, inter)),
    }


@pytest.mark.parametrize("name", ["moe_up_fp8", "moe_up_fp8_q", "moe_down_fp8", "moe_up_fp4", "moe_down_fp4"])
def test_quantized_gemms_refuse_a_permutation_without_tile_records(launches, name):
    n, dim, inter, e = 6, 256, 128, 4
    perm = dataclasses.replace(_perm(n, dim, e, K.BLOCK_M), tile_info=None)
    with pytest.raises(ValueError, match=r"perm\.tile_info must be the tile records"):
        _quantized_ops(perm, n, dim, inter, e)[name]()
    assert not launches


@pytest.fixture
def launch_args(launches, monkeypatch):
    """As ``launches``, and the arguments of every launch: (kernel, args)."""
    calls = []

    def fake_compile(name, config=None, arch=None):
        launches.append((name, dict(config)))
        return lambda *args: calls.append((name, args))

    monkeypatch.setattr(K, "compile_kernel", fake_compile)
    monkeypatch.setattr(F8, "compile_kernel", fake_compile)
    return calls


def test_quantized_gemms_read_the_128_row_tables_records(launch_args):
    """The FP8 / FP4 GEMMs read the records of the permutation's own (128-row) table, also where the bf16 GEMMs have
    a 192-row one (``perm.up_tiles``), with its offsets and tile offsets."""
    n, dim, inter, e = 6, 256, 128, 4
    i32 = torch.int32
    perm = dataclasses.replace(_perm(n, dim, e, K.BLOCK_M), up_tiles=(
        K.UP_BLOCK_M, torch.zeros(e + 1, dtype=i32), torch.zeros(8, dtype=i32), torch.zeros(8, 4, dtype=i32)))
    ops = _quantized_ops(perm, n, dim, inter, e)
    for op in ops.values():
        op()
    assert [name for name, _ in launch_args] == list(ops)
    for name, args in launch_args:
        j = next(i for i, a in enumerate(args) if a is perm.offsets)
        assert args[j + 1] is perm.tile_offsets and args[j + 2] is perm.tile_info, name
        assert not any(a is perm.up_tiles[3] for a in args), name


@pytest.mark.parametrize("block_m", [K.BLOCK_M, 64])
def test_ops_pass_only_problem_keys_and_the_permutations_block_m(launches, block_m):
    n, dim, inter, e = 6, 256, 128, 4
    perm = _perm(n, dim, e, block_m)
    bf = torch.bfloat16
    K.moe_up(perm, torch.zeros(e, inter, dim, dtype=bf), torch.zeros(e, inter, dim, dtype=bf))
    K.moe_down(perm, torch.zeros(n, inter, dtype=bf), torch.zeros(e, dim, inter, dtype=bf))
    x8, xs = torch.zeros(n, dim, dtype=torch.float8_e4m3fn), torch.ones(n, dim // 128)
    h8, hs = torch.zeros(n, inter, dtype=torch.float8_e4m3fn), torch.ones(n, 1)
    q = F8.quantize_fp8_weight
    F8.moe_up_fp8(perm, x8, xs, q(torch.zeros(e, inter, dim)), q(torch.zeros(e, inter, dim)))
    F8.moe_down_fp8(perm, h8, hs, q(torch.zeros(e, dim, inter)))
    fp4 = F4.FP4Weight
    F4.moe_up_fp4(perm, x8, xs, *(fp4(torch.zeros(e, inter, dim // 2, dtype=torch.uint8),
                                      torch.full((e, inter, dim // 32), 127, dtype=torch.uint8)) for _ in range(2)))
    F4.moe_down_fp4(perm, h8, hs, fp4(torch.zeros(e, dim, inter // 2, dtype=torch.uint8),
                                      torch.full((e, dim, inter // 32), 127, dtype=torch.uint8)))
    x = torch.zeros(n, dim, dtype=bf)
    K.moe_shared_expert(x, torch.zeros(inter, dim, dtype=bf), torch.zeros(dim, inter, dtype=bf),
                        torch.zeros(inter, dim, dtype=bf))
    K.moe_combine(torch.zeros(2 * n, dim, dtype=bf), torch.zeros(n, 2, dtype=torch.int32))
    K.moe_route(x, torch.zeros(8, dim), None, top_k=2)
    assert [name for name, _ in launches] == [*GROUPED, "moe_up", "moe_down", "moe_combine", "moe_gate"]
    for name, cfg in launches:
        # so that tuned configs apply; the one exception: the FP4 ops' swap schedule for few rows an expert (a rule,
        # not a tuned choice; here 1.5 rows an expert), on the 128-row tile table it is built for
        rule = F4.swap_config(name.split("_")[1], n, e) if name.endswith("_fp4") and block_m == K.BLOCK_M else {}
        assert rule or not name.endswith("_fp4") or block_m != K.BLOCK_M
        assert {k: v for k, v in cfg.items() if k in get_kernel_def(name).tunable_keys} == rule, (name, cfg)
    for name, cfg in launches[: len(GROUPED)]:
        assert cfg["block_m"] == block_m, (name, cfg)  # compiled for the tile table it reads


# ------------------------------------------------------------------------------------------------ harnesses


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=[f"{n}-{'-'.join(map(str, c.values()))}" for n, c in CASES])
def test_harness_case_check_and_slice(name, cfg):
    kdef, _, case = _case(name, cfg)
    assert case.rows == ROWS and len(case.expected) == len(case.outputs)
    assert case.args[case.row_args[0]].shape[0] == ROWS
    for i, t in enumerate(case.args):
        if i not in case.outputs and isinstance(t, torch.Tensor) and t.is_floating_point():
            assert t.float().abs().sum() > 0 and not torch.isnan(t.float()).any()  # random, never zeros
    outs = _as_outputs(case)
    assert kdef.harness.check(outs, case.expected) is None
    assert kdef.harness.check(_poisoned(outs), case.expected)
    for i in range(len(outs)):  # each output on its own
        assert kdef.harness.check(tuple(_poisoned(outs)[i] if j == i else o for j, o in enumerate(outs)),
                                  case.expected), i
    # rows [a, b): the row-batched inputs are the full batch's rows, outputs fresh and of the right shape
    a, b = 37, 111
    sub = kdef.harness.batch_slice(case, a, b)
    assert sub.rows == b - a and sub.expected is None and sub.outputs == case.outputs
    for i in case.row_args:
        assert torch.equal(sub.args[i], case.args[i][a:b])
    for got, full in zip(sub.output_tensors(), case.output_tensors()):
        assert got.shape == full[a:b].shape and got.dtype == full.dtype and got.data_ptr() != full.data_ptr()
    for i, arg in enumerate(case.args):
        if i not in (*case.row_args, *case.outputs) and (case.tables_at is None or
                                                        not case.tables_at <= i < case.tables_at + 3):
            assert sub.args[i] is arg  # weights, tables of hash layers, y_sorted of the combine: shared


def _schedule(case):
    """Expert of each row as the grouped GEMMs' CTAs find it from the tables (``_grouped_tile``); -1 if no
    CTA stores the row. Fails if two CTAs store the same row."""
    j, bm = case.tables_at, case.block_m
    offsets, tile_offsets, tile_expert = (t.tolist() for t in case.args[j : j + 3])
    num_experts = len(offsets) - 1
    owner = [-1] * case.rows
    for q in range(tile_offsets[num_experts]):
        e = tile_expert[q]
        if case.records:  # the bf16 GEMMs' tile records: expert, its first M tile, first row, rows
            e, first_tile, first_row, count = e
            assert (first_tile, first_row, count) == (tile_offsets[e], offsets[e], offsets[e + 1] - offsets[e])
        row0 = offsets[e] + (q - tile_offsets[e]) * bm
        for r in range(row0, min(row0 + bm, offsets[e + 1])):
            assert owner[r] == -1, f"row {r} stored twice"
            owner[r] = e
    assert len(tile_expert) >= tile_offsets[num_experts]  # the grid covers every tile
    if case.records:  # past the last tile the records have no rows: those CTAs exit
        assert all(r == [0, 0, 0, 0] for r in tile_expert[tile_offsets[num_experts]:])
    return owner


@pytest.mark.parametrize("name", GROUPED)
def test_grouped_sub_batches_keep_each_rows_expert(name):
    cfg = {"dim": 256} if "up" in name else {"inter": 128}
    _, _, case = _case(name, cfg)
    offsets = case.args[case.tables_at].long()
    expected_owner = (torch.searchsorted(offsets, torch.arange(ROWS), right=True) - 1).tolist()
    full = _schedule(case)
    assert full == expected_owner  # every row once, in its expert's segment
    counts = offsets.diff()
    assert (counts == 0).any() and (counts % case.block_m != 0).any()  # empty experts and partial tiles
    for a, b in ((0, 1), (ROWS - 1, ROWS), (0, 17), (75, 80), (3, ROWS)):
        sub = get_kernel_def(name).harness.batch_slice(case, a, b)
        assert _schedule(sub) == full[a:b], (a, b)


def _fp32_grouped(case, weight_of):
    """A grouped GEMM computed as a kernel would: fp32 math per expert segment, rounded to bf16 once."""
    j = case.tables_at
    offsets = case.args[j].tolist()
    out = torch.empty_like(case.output_tensors()[0])
    for e in range(len(offsets) - 1):
        r = slice(offsets[e], offsets[e + 1])
        out[r] = weight_of(e, r).to(out.dtype)
    return out


def test_gemm_checks_accept_fp32_math_and_reject_wrong_experts():
    _, _, up = _case("moe_up", {"dim": 256})
    x, w_sorted, w1, w3 = (t for t in up.args[:4])

    def swiglu(e, r):
        g, u = x[r].float() @ w1[e].float().T, x[r].float() @ w3[e].float().T
        return torch.nn.functional.silu(g.clamp(max=10.0)) * u.clamp(-10.0, 10.0) * w_sorted[r, None]

    check = get_kernel_def("moe_up").harness.check
    assert check((_fp32_grouped(up, swiglu),), up.expected) is None
    assert check((_fp32_grouped(up, lambda e, r: swiglu((e + 1) % w1.shape[0], r)),), up.expected)  # wrong expert
    assert check((_fp32_grouped(up, lambda e, r: swiglu(e, r) * 1.02),), up.expected)  # 2 % off
    _, _, down = _case("moe_down", {"inter": 128})
    h, w2 = down.args[:2]
    check = get_kernel_def("moe_down").harness.check
    assert check((_fp32_grouped(down, lambda e, r: h[r].float() @ w2[e].float().T),), down.expected) is None
    dropped = _fp32_grouped(down, lambda e, r: h[r, 64:].float() @ w2[e, :, 64:].float().T)  # half of K missing
    assert check((dropped,), down.expected)
    _, _, lin = _case("fp8_linear", {"K": 256})
    a8, a_s, w8, w_s = lin.args[:4]
    a = a8.float() * a_s.repeat_interleave(128, 1)
    w = w8[0].float() * w_s[0].repeat_interleave(128, 0)[: w8.shape[1]].repeat_interleave(128, 1)
    check = get_kernel_def("fp8_linear").harness.check
    assert check((a @ w.T,), lin.expected) is None
    assert check((a @ (w * 2).T,), lin.expected)  # a wrong (2x) scale


def test_gate_check_judges_selection_and_the_exact_weight_split():
    kdef, problem, case = _case("moe_gate", {"dim": 256, "num_experts": 8, "top_k": 2})
    x, weight, bias = case.args[:3]
    logits = x.float() @ weight.T  # fp32 in another order: within the bound

    def outputs(lg):
        s = torch.sqrt(torch.nn.functional.softplus(lg))
        ids = torch.sort(s + bias, dim=-1, descending=True, stable=True).indices[:, :2]
        sel = s.gather(1, ids)
        return s, sel / sel.sum(-1, keepdim=True) * problem["route_scale"], ids.int()

    s, w, ids = outputs(logits)
    assert kdef.harness.check((s, w, ids), case.expected) is None
    rounded = kdef.harness.check(outputs(x.float() @ weight.bfloat16().float().T), case.expected)  # not split
    assert rounded and ("bound" in rounded or "mean error" in rounded)
    assert "own scores" in kdef.harness.check((s, w, ids.flip(-1)), case.expected)  # selection order
    assert "own scores" in kdef.harness.check((s, w * 1.001, ids), case.expected)


def test_combine_check_is_bit_exact():
    kdef, _, case = _case("moe_combine", {"dim": 256, "top_k": 2})
    out = case.expected[0].clone()
    out.view(torch.int16)[5, 7] ^= 1  # one ulp on one element
    assert kdef.harness.check((out,), case.expected)
    y, pos, ys = (t.float() for t in case.args[:3])
    assert kdef.harness.check(((y[pos[:, 0].long()] + y[pos[:, 1].long()] + ys).bfloat16(),), case.expected) is None
    assert kdef.harness.check(((y[pos[:, 0].long()] + y[pos[:, 1].long()]).bfloat16(),), case.expected)  # no shared
    other = pos.roll(1, 0).long()  # the rows of another token
    assert kdef.harness.check(((y[other[:, 0]] + y[other[:, 1]] + ys).bfloat16(),), case.expected)
