"""Tuning of the attention kernels on the CPU: the DSL's config space, buckets, the harnesses against the
reference, batch slices, and the runtime launching the configs it resolved (not the defaults)."""

import dataclasses

import pytest
import torch

from tilev4.autotune import identity, store
from tilev4.autotune.identity import GpuIdentity
from tilev4.autotune.space import SMEM_LIMIT_BYTES
from tilev4.autotune.store import TuningRecord, current_key, save_record
from tilev4.autotune.tuner import WallTimer, measure_bucket, parse_shapes, plan_kernel
from tilev4.dsl import AttentionConfig
from tilev4.dsl import tuning as dsl_tuning
from tilev4.dsl.codegen import build_main_program
from tilev4.dsl.runtime import BATCH_INVARIANT_SPLIT_KEYS, FINE_SPLIT_KEYS, OCCUPANCY_SPLIT_KEYS, AttentionKernel
from tilev4.dsl.spec import AttentionSpec, CompressedDense
from tilev4.kernels import attention_tuning as attn_tuning
from tilev4.kernels import get_kernel_def
from tilev4.kernels.attention import _kernel, csa_spec, variant_spec
from tilev4.kernels.registry import aot_configs, clear_kernel_memo, resolve_config

NAMES = ("sparse_attention", "csa_attention", "hca_attention")
H200 = GpuIdentity("NVIDIA H200", "9.0", 132, 143771)
SMEM = SMEM_LIMIT_BYTES["sm_90a"]


# --- the DSL's space -----------------------------------------------------------------------------


def test_dsl_space_pins_what_a_schedule_does_not_use():
    ws, simple16 = csa_spec(64), csa_spec(16)
    why = dsl_tuning.why_invalid
    assert dsl_tuning.schedule_of(ws, AttentionConfig()) == "seesaw"
    assert dsl_tuning.schedule_of(ws, AttentionConfig(schedule="ws")) == "ws"
    assert dsl_tuning.schedule_of(ws, AttentionConfig(schedule="seesaw")) == "seesaw"
    assert dsl_tuning.schedule_of(simple16, AttentionConfig()) == "simple"
    assert dsl_tuning.schedule_of(simple16, AttentionConfig(schedule="seesaw")) == "simple"
    assert why(ws, AttentionConfig(schedule="seesaw", block_kv=32), "split") is None
    assert "needs 64-head CTAs" in why(simple16, AttentionConfig(schedule="ws"), "main")
    assert "not used by the combine" in why(ws, AttentionConfig(schedule="ws"), "combine")
    with pytest.raises(ValueError, match="schedule"):
        AttentionConfig(schedule="pingpong")
    why = dsl_tuning.why_invalid
    assert why(ws, AttentionConfig(block_kv=32), "main") is None
    assert "not used by the warp-specialised" in why(ws, AttentionConfig(threads=128), "main")
    assert why(simple16, AttentionConfig(threads=128), "main") is None  # the simple schedule uses threads
    assert "8 warps" in why(simple16, AttentionConfig(block_kv=32, threads=256), "main")  # does not lower
    assert why(simple16, AttentionConfig(block_kv=32, threads=128), "main") is None
    assert "combine program only" in why(ws, AttentionConfig(combine_threads=256), "split")
    assert why(ws, AttentionConfig(combine_threads=256), "combine") is None
    assert "not used by the combine" in why(ws, AttentionConfig(block_kv=32), "combine")
    assert "does not divide" in why(ws, AttentionConfig(block_kv=48, split_keys=256), "split")
    assert "does not divide" in why(ws, AttentionConfig(block_kv=48), "main")  # its config runs the BI split
    assert "registers" in why(variant_spec("csa", 64), AttentionConfig(threads=128, schedule="simple"), "main")
    # shared memory: the defaults fit with room to spare; a 128-key double buffer does not
    assert 200_000 < dsl_tuning.smem_bytes(ws, AttentionConfig(), "main") <= SMEM
    assert 200_000 < dsl_tuning.smem_bytes(ws, AttentionConfig(schedule="seesaw"), "main") <= SMEM
    # several queries a CTA (or persistent CTAs): two 64 x 64 bf16 output staging slots and two more row sums
    for walk in ({"query_tiles": 4}, {"persistent_ctas": 132}):
        several = dsl_tuning.smem_bytes(ws, AttentionConfig(schedule="seesaw", **walk), "main")
        one = dsl_tuning.smem_bytes(ws, AttentionConfig(schedule="seesaw"), "main")
        assert several - one == 2 * 64 * 64 * 2 + 2 * 64 * 4 and several <= SMEM
    assert dsl_tuning.smem_bytes(ws, AttentionConfig(block_kv=128), "main") > SMEM
    with pytest.raises(ValueError, match="multiple of block_kv"):
        AttentionConfig(block_kv=48, split_keys=256).blocks_per_split()
    # a ring of two block pairs: seesaw only, and 32-key blocks to fit
    assert why(ws, AttentionConfig(block_kv=32, pair_stages=2), "main") is None
    assert "needs the seesaw schedule" in why(ws, AttentionConfig(block_kv=32, pair_stages=2, schedule="ws"), "main")
    assert dsl_tuning.smem_bytes(ws, AttentionConfig(block_kv=32, pair_stages=2), "main") <= SMEM
    assert dsl_tuning.smem_bytes(ws, AttentionConfig(pair_stages=2), "main") > SMEM
    with pytest.raises(ValueError, match="pair_stages must be 1 or 2"):
        AttentionConfig(pair_stages=3)
    # queries a CTA walks: the seesaw main program (and the batch-invariant split of its bucket, which ignores it)
    assert why(ws, AttentionConfig(query_tiles=4), "main") is None
    assert why(ws, AttentionConfig(query_tiles=2), "split") is None  # split_keys = the batch-invariant size
    assert "seesaw main program" in why(ws, AttentionConfig(query_tiles=2, split_keys=256), "split")
    assert "seesaw main program" in why(ws, AttentionConfig(query_tiles=2, schedule="ws"), "main")
    assert "seesaw main program" in why(ws, AttentionConfig(query_tiles=2), "combine")
    assert "seesaw main program" in why(simple16, AttentionConfig(query_tiles=2), "main")
    dense_only = AttentionSpec(heads=64, sources=(CompressedDense("comp", 128),))
    assert "window or an index-list" in why(dense_only, AttentionConfig(query_tiles=2), "main")
    assert dsl_tuning.smem_bytes(ws, AttentionConfig(query_tiles=2), "main") <= SMEM
    with pytest.raises(ValueError, match="query_tiles must be in"):
        AttentionConfig(query_tiles=0)
    with pytest.raises(ValueError, match="query_tiles=2 needs the seesaw main program"):
        build_main_program(ws, AttentionConfig(query_tiles=2), split=True)
    # persistent CTAs: the same rules, and not with query_tiles
    assert why(ws, AttentionConfig(persistent_ctas=132), "main") is None
    assert why(ws, AttentionConfig(persistent_ctas=132), "split") is None  # the batch-invariant split ignores it
    assert "persistent_ctas=132 needs the seesaw main" in why(ws, AttentionConfig(persistent_ctas=132,
                                                                                    split_keys=256), "split")
    assert "persistent_ctas=7 needs the seesaw main" in why(simple16, AttentionConfig(persistent_ctas=7), "main")
    assert "persistent_ctas=7 needs a window" in why(dense_only, AttentionConfig(persistent_ctas=7), "main")
    assert dsl_tuning.smem_bytes(ws, AttentionConfig(persistent_ctas=132), "main") <= SMEM
    for bad in (-1, 1 << 17):
        with pytest.raises(ValueError, match=f"persistent_ctas must be in \\[0, 65536\\], got {bad}"):
            AttentionConfig(persistent_ctas=bad)
    with pytest.raises(ValueError, match="persistent_ctas=132 needs query_tiles=1"):
        AttentionConfig(persistent_ctas=132, query_tiles=2)
    with pytest.raises(ValueError, match="persistent_ctas=132 needs the seesaw main program"):
        build_main_program(ws, AttentionConfig(persistent_ctas=132), split=True)


@pytest.mark.parametrize("name", NAMES)
def test_spaces_are_small_defaults_first_and_bucketed_by_compile_time_keys(name):
    kdef = get_kernel_def(name)
    assert kdef.tunable_keys == ("block_kv", "threads", "combine_threads", "schedule", "pair_stages")
    plans = {p.bucket: p for p in plan_kernel(name, arch="sm_90a")}
    layouts = ("",) if name == "sparse_attention" else (",prefill", ",decode")
    expected = {f"H={h},combine" for h in (64, 128)}
    expected |= {f"H={h}{lay},{grp}" for h in (64, 128) for lay in layouts for grp in ("main", "split")}
    assert set(plans) == expected
    for plan in plans.values():
        assert 1 < len(plan.candidates) <= 8
        assert plan.candidates[0] == {"block_kv": 64, "threads": 256, "combine_threads": 128, "schedule": "seesaw",
                                      "pair_stages": 1}
        assert plan.default_is_candidate0
        for problem in plan.problems:
            for cand in plan.candidates:
                assert kdef.space.why_invalid({**problem, **cand}, SMEM) is None
        if plan.bucket.endswith("combine"):
            assert [c["combine_threads"] for c in plan.candidates] == [128, 256, 64]
        else:  # warp-specialised: the block size and the schedule are free; seesaw rings of 32- or 16-key blocks
            # (the 64-head one-pass bucket also holds the long launches' program of several queries a CTA or of
            # persistent CTAs, which only the seesaw schedule builds)
            long_launch = any(p.get("query_tiles", 1) != 1 or p.get("persistent_ctas", 0) for p in plan.problems)
            assert long_launch == (plan.bucket in ("H=64,main", "H=64,prefill,main"))
            schedules = ("seesaw",) if long_launch else ("ws", "seesaw")
            assert sorted((c["block_kv"], c["schedule"], c["pair_stages"]) for c in plan.candidates) == sorted(
                [(bi, sch, 1) for bi in (64, 32, 16) for sch in schedules]
                + [(bi, "seesaw", 2) for bi in (32, 16)])
        if plan.bucket.endswith(",main"):  # the one-pass program and the batch-invariant split share a config
            mains = 1 + (long_launch and 2)  # + the query_tiles and the persistent program
            assert sorted(p["kind"] for p in plan.problems) == ["main"] * mains + ["split"]
            assert all(p.get("split_keys") == BATCH_INVARIANT_SPLIT_KEYS for p in plan.problems)
    # the bucket never sees the number of queries
    plans = plan_kernel(name, parse_shapes(["heads=64,kind=main,Q=4", "heads=64,kind=main,Q=4096"]), arch="sm_90a")
    assert len(plans) == 1 and plans[0].sizes == [[4, 4096]]
    # every candidate block size divides the 64-key granularity the harness builds its key sets with
    assert all(64 % bi == 0 for bi in dsl_tuning.CANDIDATES["block_kv"])


def test_default_configs_are_the_shipped_programs():
    kdef = get_kernel_def("csa_attention")
    for cfg in kdef.configs:
        full = dict(resolve_config(kdef, cfg, "sm_90a", gpu=None).items)
        got = (full["block_kv"], full["threads"], full["combine_threads"], full["schedule"])
        assert got == (64, 256, 128, "seesaw")
    assert {c.get("split_keys") for c in kdef.configs} == {None, BATCH_INVARIANT_SPLIT_KEYS, OCCUPANCY_SPLIT_KEYS,
                                                           FINE_SPLIT_KEYS}


# --- the harnesses ------------------------------------------------------------------------------


def _kinds(name):
    kdef = get_kernel_def(name)
    return [kdef.problem(c) for c in kdef.configs if c["heads"] == 64]


def _bits(t):
    return t.contiguous().view(-1).view(torch.uint8)


def _as_kernel_outputs(case):
    """The reference outputs in the dtypes and units the kernel writes (bf16 o, base-2 partial lse)."""
    outs = []
    for i, ref in zip(case.outputs, case.expected):
        got = case.args[i]
        if case.names[i] == "lse_part":
            ref = ref * attn_tuning.LOG2E
        outs.append(ref.to(got.dtype))
    return tuple(outs)


@pytest.mark.parametrize("name", NAMES)
def test_harness_cases_check_against_the_reference_and_slice_rows(name):
    kdef = get_kernel_def(name)
    harness = kdef.harness
    assert harness.size_name == "Q" and harness.batch_slice is not None and max(harness.sizes) <= 256
    problems = _kinds(name)
    with_lse = [dict(p, return_lse=True) for p in problems if p["kind"] in ("main", "combine")][-2:]
    for problem in [*problems, *with_lse]:
        n = 3 if problem.get("ring") or (problem["kind"] == "combine" and name != "sparse_attention") else 48
        case = harness.make_case(problem, n, torch.Generator().manual_seed(1), "cpu", True)
        assert case.rows == 3 and len(case.expected) == len(case.outputs)
        q = case.args[case.names.index("q")] if "q" in case.names else case.args[case.names.index("o_part")]
        assert q.abs().sum() > 0 and torch.isfinite(q.float()).all()
        if problem.get("return_lse"):
            assert [case.names[i] for i in case.outputs] == ["o", "lse"]
        outs = _as_kernel_outputs(case)
        assert harness.check(outs, case.expected) is None, problem
        # 0xFF-poisoned outputs (NaN) fail; so does one NaN, and an error just past the tolerance
        poisoned = tuple(o.clone() for o in outs)
        for t in poisoned:
            t.view(-1).view(torch.uint8).fill_(255)
        assert "NaN" in harness.check(poisoned, case.expected)
        one_nan = (outs[0].clone(), *outs[1:])
        one_nan[0].view(-1)[7] = float("nan")
        assert harness.check(one_nan, case.expected)
        off = (outs[0].float() + 0.03 + 0.02 * case.expected[0].abs()).to(outs[0].dtype)
        assert "exceeds" in harness.check((off, *outs[1:]), case.expected)
        # batch_slice: rows [1, 3) of every input but the sink, fresh outputs
        sub = harness.batch_slice(case, 1, 3)
        assert sub.rows == 2 and sub.expected is None and sub.names == case.names
        for nm, a, s in zip(case.names, case.args, sub.args):
            if nm == "sink":
                assert s is a
            elif case.names.index(nm) in case.outputs:
                assert s.shape == a[1:3].shape and s.dtype == a.dtype and s.data_ptr() != a.data_ptr()
            else:
                assert s.is_contiguous() and torch.equal(_bits(s), _bits(a[1:3]))  # NaN rows included


def test_split_cases_keep_their_workspace_for_every_candidate_block_size():
    """The split boundaries in keys, hence the partials and the workspace, do not depend on block_kv."""
    for name in NAMES:
        variant = name.split("_")[0]
        kdef = get_kernel_def(name)
        for problem in _kinds(name):
            if problem["kind"] != "split":
                continue
            case = kdef.harness.make_case(problem, 3, torch.Generator().manual_seed(2), "cpu", False)
            tensors = {nm: a for nm, a in zip(case.names, case.args)}
            kern = AttentionKernel(variant_spec(variant, 64, bool(problem.get("ring"))))
            keys = kern.source_keys({k: v for k, v in tensors.items() if k not in ("q", "positions", "sink")})
            ns = tensors["o_part"].shape[2]
            for bi in dsl_tuning.CANDIDATES["block_kv"]:
                cfg = AttentionConfig(block_kv=bi, split_keys=problem["split_keys"])
                assert -(-kern.num_key_blocks(keys, bi) // cfg.blocks_per_split()) == ns, (name, problem, bi)


def test_hca_case_hides_nan_rows_from_the_queries():
    kdef = get_kernel_def("hca_attention")
    case = kdef.harness.make_case({**kdef.problem(kdef.configs[0])}, 48, torch.Generator().manual_seed(3), "cpu", True)
    comp = case.args[case.names.index("comp_kv")]
    assert torch.isnan(comp.float()).any() and not torch.isnan(case.expected[0]).any()


def _stand_in(variant, names, split_keys, *, lazy=False, batch_variant=False):
    """A 'split program' computing the reference partials row by row (so its bits never depend on the batch)."""

    def run(*args):
        t = dict(zip(names, args))
        o_part, lse_part = t["o_part"], t["lse_part"]
        for r in range(o_part.shape[0]):
            row = {k: v if k == "sink" else v[r : r + 1] for k, v in t.items()}
            kv, idx = attn_tuning._key_sets(variant, row)
            o, lse = attn_tuning._split_reference(row["q"].float(), kv, idx, split_keys, o_part.shape[2])
            o_part[r : r + 1] = o + (1e-6 * o_part.shape[0] if batch_variant else 0.0)
            lse_part[r : r + 1] = lse * attn_tuning.LOG2E
        if lazy:
            o_part[:, :, -1].view(torch.uint8).fill_(255)  # the last split left unwritten

    return run


def test_the_tuner_checks_candidates_with_the_attention_harness():
    """measure_bucket on the CPU with stand-ins: right, lazy (a split unwritten) and batch-variant kernels."""
    shape = {"heads": 64, "kind": "split", "ring": True, "split_keys": OCCUPANCY_SPLIT_KEYS, "Q": 5}
    (plan,) = plan_kernel("csa_attention", [shape], arch="sm_90a")
    kdef = get_kernel_def("csa_attention")
    names = kdef.harness.make_case(plan.problems[0], 2, torch.Generator(), "cpu", False).names
    right, lazy, variant = plan.labels[:3]
    kernels = {(0, right): _stand_in("csa", names, OCCUPANCY_SPLIT_KEYS),
               (0, lazy): _stand_in("csa", names, OCCUPANCY_SPLIT_KEYS, lazy=True),
               (0, variant): _stand_in("csa", names, OCCUPANCY_SPLIT_KEYS, batch_variant=True)}
    m = measure_bucket(plan, kernels, kdef.harness, batch_invariant=True, device="cpu", timer=WallTimer(),
                       rounds=1, reps=1, warmup=0, num_inputs=1)
    assert {k: m.status[k] for k in (right, lazy, variant)} == {
        right: "ok", lazy: "wrong_output", variant: "not_batch_invariant"}, m.detail
    assert all(m.status[k] == "not_compiled" for k in plan.labels[3:])
    assert "NaN" in m.detail[lazy]


# --- the runtime launches what it resolved ---------------------------------------------------------


@pytest.fixture
def tuned(tmp_path, monkeypatch):
    """Tuned records for CSA at 64 heads injected into a fresh store, on an H200."""
    monkeypatch.setenv("TILEV4_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(store, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.setattr(store, "_NOTICED", set())
    monkeypatch.setattr(identity, "current_gpu", lambda: H200)
    monkeypatch.delenv("TILEV4_ARCH", raising=False)
    kdef = get_kernel_def("csa_attention")
    default = {"block_kv": 64, "threads": 256, "combine_threads": 128, "schedule": "seesaw"}
    winners = {"H=64,decode,main": {**default, "block_kv": 32}, "H=64,decode,split": {**default, "block_kv": 16},
               "H=64,combine": {**default, "combine_threads": 256}}
    for bucket, config in winners.items():
        key = current_key("csa_attention", kdef.source_hash, bucket, H200)
        save_record(TuningRecord(key, config, default, [], [32, 256], created="2026-11-29T00:00:00Z"))
    clear_kernel_memo()
    _kernel.cache_clear()
    yield kdef
    clear_kernel_memo()
    _kernel.cache_clear()


def test_runtime_launches_the_resolved_configs(tuned):
    kern = _kernel("csa", 64, True, None, False)  # decode ring, the registry's programs
    short, long = [128, 512], [128, 4096]  # keys per source: one split of 2048 keys, or three
    # batch-invariant: the one-pass program runs its tuned block size ...
    plan = kern.plan(64, 1, short, batch_invariant=True)
    assert (plan.kind, plan.num_splits, plan.config.block_kv) == ("main", 1, 32)
    # ... and the split of a long row runs the SAME config (not the split bucket's), sized with it
    plan = kern.plan(64, 1, long, batch_invariant=True)
    assert plan.kind == "split" and plan.config.block_kv == 32 and plan.config.split_keys == BATCH_INVARIANT_SPLIT_KEYS
    assert plan.num_splits == -(-(128 // 32 + 4096 // 32) // (2048 // 32)) == 3
    assert plan.combine.combine_threads == 256
    # small batches: the occupancy split runs the split bucket's block size; its workspace follows it. 128-key
    # pieces where all their CTAs fit in one wave (2 rows x 5 pieces on 132 SMs) ...
    plan = kern.plan(2, 1, short, num_sms=132)
    assert (plan.kind, plan.config.block_kv, plan.config.split_keys) == ("split", 16, FINE_SPLIT_KEYS)
    assert plan.num_splits == -(-(128 // 16 + 512 // 16) // (128 // 16)) == 5
    # ... else 256-key ones (10 CTAs on 9 SMs)
    plan = kern.plan(2, 1, short, num_sms=9)
    assert (plan.kind, plan.config.block_kv, plan.config.split_keys) == ("split", 16, OCCUPANCY_SPLIT_KEYS)
    assert plan.num_splits == -(-(128 // 16 + 512 // 16) // (256 // 16)) == 3
    assert kern.plan(2, 1, short, num_sms=8).kind == "main"  # a quarter of the SMs busy: one pass
    plan = kern.plan(2, 1, short, num_splits=4)
    assert plan.config.block_kv == 16 and plan.config.split_keys % 16 == 0 and plan.num_splits == 4
    assert plan.num_splits * plan.config.blocks_per_split() >= kern.num_key_blocks(short, 16)
    # the workspace covers exactly the blocks the launched program walks with ITS block size
    for keys in ([16, 496], [128, 200], [100, 3000], [128, 4096]):
        for kw in ({"batch_invariant": True}, {"num_sms": 132}, {"num_splits": 3}):
            plan = kern.plan(2, 1, keys, **kw)
            if plan.kind == "split":
                blocks, per = kern.num_key_blocks(keys, plan.config.block_kv), plan.config.blocks_per_split()
                assert (plan.num_splits - 1) * per < blocks <= plan.num_splits * per, (keys, kw)
    # what the runtime compiles is exactly what ahead-of-time compilation builds for this GPU
    aot = [c for c, src in aot_configs(tuned, "sm_90a") if src.startswith("tuned")]
    for kind, cfg in (("main", kern.plan(64, 1, short, batch_invariant=True).config),
                      ("split", kern.plan(2, 1, short, num_sms=132).config), ("combine", plan.combine)):
        launched = dict(resolve_config(tuned, kern.registry_config(kind, cfg), "sm_90a").items)
        assert launched in aot, (kind, launched)
    # the batch-invariant split of a long row is not a shipped config: its canonical config is the main's
    split_bi = dict(resolve_config(tuned, kern.registry_config("split", kern.plan(64, 1, long, batch_invariant=True)
                                                                .config), "sm_90a").items)
    assert split_bi in aot and split_bi["block_kv"] == 32
    # the prefill layout has no record: its programs keep the defaults
    assert _kernel("csa", 64, False, None, False).plan(64, 16, short, batch_invariant=True).config.block_kv == 64


def test_runtime_with_another_scale_uses_the_tuned_configs_too(tuned):
    kern = _kernel("csa", 64, True, 0.05, False)
    assert type(kern).__name__ == "_TunedAttention"
    assert kern.plan(64, 1, [128, 512], batch_invariant=True).config.block_kv == 32


def test_plain_dsl_kernel_launches_its_own_config():
    kern = AttentionKernel(csa_spec(64, ring=True), AttentionConfig(block_kv=32))
    plan = kern.plan(1, 1, [128, 4096], batch_invariant=True)
    assert plan.config == dataclasses.replace(kern.config, split_keys=BATCH_INVARIANT_SPLIT_KEYS)
    assert plan.num_splits == 3 and plan.combine.combine_threads == 128
    # a block size that does not divide the split sizes gets splits of whole blocks
    odd = AttentionKernel(csa_spec(64, ring=True), AttentionConfig(block_kv=48))
    plan = odd.plan(1, 1, [128, 4096], batch_invariant=True)
    assert plan.config.split_keys == 2064 and plan.num_splits == -(-(3 + 86) // 43) == 3
    assert odd.plan(1, 1, [128, 512], num_sms=132).config.split_keys == 144  # 128 keys: 3 blocks
    assert odd.plan(30, 1, [128, 512], num_sms=132).config.split_keys == 288  # 30 x 5 pieces: no wave; 256 keys
