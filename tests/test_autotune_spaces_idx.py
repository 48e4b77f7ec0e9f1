"""Tuning spaces and harnesses of the indexer, compressor and mhc_pre kernels, on the CPU.

For every harness: the case is built with the reference, the check passes on the expected outputs and
fails on poisoned (0xFF) or slightly wrong ones, and ``batch_slice`` gives the matching rows. The spaces
keep their defaults first and their invariance constraints; the tuner's measuring loop, with CPU stand-ins
for the kernels, restores the decode step's in-place state so that every candidate is checked from the
state the reference started from.
"""

import math

import pytest
import torch

from tilev4.autotune.harness import TuningCase
from tilev4.autotune.space import SMEM_LIMIT_BYTES
from tilev4.autotune.tuner import WallTimer, measure_bucket, parse_shapes, plan_kernel
from tilev4.kernels import compressor as C
from tilev4.kernels import get_kernel_def
from tilev4.kernels import indexer as I
from tilev4.kernels.registry import resolve_config
from tilev4.reference.compressor import CompressorState, compressor_decode_step
from tilev4.reference.indexer import indexer_scores, indexer_topk
from tilev4.reference.quant import kv_fp8_simulate

KERNELS = ("indexer_logits", "topk_select", "compressor_prefill", "compressor_decode", "mhc_pre")


def _poisoned(ts):
    out = tuple(t.clone() for t in ts)
    for t in out:
        t.view(-1).view(torch.uint8).fill_(255)
    return out


def _as_outputs(case: TuningCase, refs) -> tuple[torch.Tensor, ...]:
    """The expected values in the dtypes of the case's outputs (what a perfect kernel writes)."""
    return tuple(r.to(o.dtype) for o, r in zip(case.output_tensors(), refs))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _check_slice(case: TuningCase, sub: TuningCase, a: int, b: int, batched: set[int], fresh: set[int] = frozenset()):
    """Args in ``batched`` hold rows [a, b) of the case's, outputs and ``fresh`` ones are new tensors of those
    rows' shape, the others are the case's own."""
    assert sub.rows == b - a and sub.expected is None and sub.outputs == case.outputs
    for i, (s, f) in enumerate(zip(sub.args, case.args)):
        if i in case.outputs or i in fresh:
            assert s.shape == f[a:b].shape and s.dtype == f.dtype and s.data_ptr() != f.data_ptr()
        elif i in batched:
            assert torch.equal(_bits(s), _bits(f[a:b])), f"arg {i}: not rows [{a}, {b})"
        else:
            assert s is f, f"arg {i} changed"


# ------------------------------------------------------------------------------------------- the spaces


def test_spaces_put_the_default_first_and_stay_small():
    for name in KERNELS:
        kdef = get_kernel_def(name)
        assert kdef.space is not None and kdef.harness is not None and kdef.batch_invariant
        for plan in plan_kernel(name, arch="sm_90a"):
            assert plan.default_is_candidate0, (name, plan.bucket)
            assert 2 <= len(plan.candidates) <= 8, (name, plan.bucket, plan.candidates)
            for problem in plan.problems:
                for cand in plan.candidates:
                    assert kdef.space.why_invalid({**problem, **cand}, SMEM_LIMIT_BYTES["sm_90a"]) is None


def test_shipped_configs_hold_only_problem_keys():
    for name in KERNELS:
        kdef = get_kernel_def(name)
        for cfg in kdef.configs:
            assert not set(cfg) & set(kdef.tunable_keys), (name, cfg)
            assert resolve_config(kdef, cfg, "sm_90a", gpu=None).source == "heuristic"


def test_indexer_logits_decode_builds_keep_one_query_per_cta():
    kdef = get_kernel_def("indexer_logits")
    plans = {p.bucket: p for p in plan_kernel("indexer_logits", arch="sm_90a")}
    assert set(plans) == {f"H={h},D=128,{m}" for h in (64, 8) for m in ("prefill", "decode")}
    for h in (64, 8):
        plan = plans[f"H={h},D=128,decode"]
        assert {c["BQ"] for c in plan.candidates} == {1}
        assert any(c["BQ"] == 2 and "one query per CTA" in why for c, why in plan.pruned)
    assert plans["H=64,D=128,prefill"].candidates[0] == {"BQ": 2, "SPLIT": 2048, "num_stages": 4, "min_ctas": 4,
                                                         "schedule": "tma"}
    assert {c["BQ"] for c in plans["H=64,D=128,prefill"].candidates} == {1, 2}
    # the op's problem: decode only at S = 1, never a tunable; no separate batch-invariant build
    assert I._logits_problem(1) == {"H": 64, "D": 128, "decode": True}
    assert I._logits_problem(4096) == {"H": 64, "D": 128, "decode": False}
    assert not set(I._logits_problem(7)) & set(kdef.tunable_keys)
    with pytest.raises(TypeError):
        I.build_indexer_logits(batch_invariant=True)
    with pytest.raises(ValueError, match="BQ must be 1 or 2, got 4"):
        I.build_indexer_logits(BQ=4)
    with pytest.raises(ValueError, match="release must be 'barrier' or 'mbarrier', got 'fence'"):
        I.build_indexer_logits(release="fence")
    with pytest.raises(ValueError, match="release is a knob of the tma schedule"):
        I.build_indexer_logits(schedule="pipelined", release="mbarrier")
    with pytest.raises(ValueError, match="one warpgroup"):
        I.build_indexer_logits(schedule="pipelined", threads=256)


def test_indexer_logits_head_sum_reads_the_wgmma_accumulator_layout():
    """The epilogue's lane -> (query, entry) map (:func:`_tile_entry`) against the m64 wgmma accumulator layout
    (rows 16·warp + lane/4 and +8; column pairs 2·(lane%4)): every (query, entry) of a tile is stored exactly once,
    by a lane of the quad that holds its row."""
    for bq in (1, 2):
        stored = []
        for tx in range(128):
            j, c, stores = I._tile_entry(tx, bq)
            warp, lane = divmod(tx, 32)
            assert c in (16 * warp + lane // 4, 16 * warp + lane // 4 + 8)
            if stores:
                stored.append((j, c))
        assert sorted(stored) == [(j, c) for j in range(bq) for c in range(64)]


def test_topk_threads_cover_the_sort_and_set_the_digit_width():
    plans = {p.bucket: p for p in plan_kernel("topk_select", parse_shapes(["K=512", "K=300", "K=1024"]),
                                              arch="sm_90a")}
    assert set(plans) == {"K<=512,vec=1", "K<=1024,vec=1"} and len(plans["K<=512,vec=1"].problems) == 2
    # a sort of 1024 keys needs 512 threads: 256 is pruned, the default first
    cands = plans["K<=1024,vec=1"].candidates
    assert cands[0] == {"threads": 512, "unroll": 8, "prefilter": True}
    assert {c["threads"] for c in cands} == {512} and len(cands) == 4
    assert {c["threads"] for c in plans["K<=512,vec=1"].candidates} == {256, 512}
    with pytest.raises(ValueError, match="threads must be"):
        I.build_topk_select(K=2048, threads=512)
    with pytest.raises(ValueError, match="vec must be"):
        I.build_topk_select(K=512, vec=2)
    for digit_bits in (10, 11, 12):  # 32 value bits + index bits + padding: whole digits within 64 bits
        for n in (1, 2, 1000, 32768, I._MAX_TOPK_N):
            ib, pad = I._topk_key_bits(n, digit_bits)
            assert (32 + ib + pad) % digit_bits == 0 and 32 + ib + pad <= 64


def test_compressor_spaces_keep_the_pooling_shape_and_whole_warps():
    for name in ("compressor_prefill", "compressor_decode"):
        for plan in plan_kernel(name, arch="sm_90a"):
            ratio, d = plan.problems[0]["ratio"], plan.problems[0]["D"]
            for cand in plan.candidates:
                threads = C._cta_threads(ratio, d, cand["block_entries"])
                assert threads % 32 == 0 and threads <= 1024
                if cand.get("schedule") == "stream":
                    assert threads <= 256
                else:  # the stream knobs stay at their defaults for the direct schedule
                    assert (cand.get("num_stages", 2), cand.get("entry_steps", 1)) == (2, 1)
            if name == "compressor_decode":
                assert plan.candidates[0] == {"block_entries": 1 if d == 512 else 2}
            else:  # the measured defaults go first
                assert plan.candidates[0] == C._PREFILL_DEFAULTS[(ratio, d)]
                assert any(c.get("schedule") == "direct" for c in plan.candidates)
    with pytest.raises(ValueError, match="block_entries=1"):
        C.build_compressor_decode(ratio=4, D=128, quant="indexer", block_entries=1)  # 16 threads
    with pytest.raises(ValueError, match="knobs of the stream schedule"):
        C.build_compressor_prefill(ratio=4, D=512, quant="attention", num_stages=3)
    with pytest.raises(ValueError, match="schedule must be"):
        C.build_compressor_prefill(ratio=4, D=512, quant="attention", schedule="tma")


def test_mhc_pre_threads_divide_dim_and_fit_registers():
    plans = {p.bucket: p for p in plan_kernel("mhc_pre", arch="sm_90a")}
    assert plans["pre,dim=4096"].candidates == [{"threads": 256}, {"threads": 512}, {"threads": 1024}]
    assert {c["threads"] for c in plans["pre,dim=256"].candidates} == {32, 64, 128, 256}
    assert plans["head,dim=1024"].candidates[0] == {"threads": 128}


# ------------------------------------------------------------------------------------------- harnesses


@pytest.mark.parametrize("problem", [{}, {"decode": True}], ids=lambda p: str(p))
def test_indexer_logits_harness(problem):
    kdef = get_kernel_def("indexer_logits")
    problem = kdef.problem({"H": 64, "D": 128, **problem})
    n = 6 if problem["decode"] else 12
    case = I._logits_case(problem, n, torch.Generator().manual_seed(1), "cpu", True, entries=300, seq_queries=4)
    b = 6 if problem["decode"] else 3
    assert case.rows == b and case.args[5].shape == (b, n // b, 300) and case.outputs == (5,)
    ref, bound = case.expected
    visible = torch.isfinite(ref)
    assert visible.any() and (~visible).any()
    if problem["decode"]:  # ragged: garbage in the padding slots (FP8 NaN bytes, infinite scales)
        assert torch.isinf(case.args[3]).any() and (case.args[2].view(torch.uint8) == 0x7F).any()
    assert kdef.harness.check((ref.float(),), case.expected) is None
    assert kdef.harness.check(_poisoned((ref.float(),)), case.expected)
    wrong = ref.float().clone()
    c = visible.nonzero()[0].tolist()
    wrong[tuple(c)] += 1e-3 * float(bound[tuple(c)]) + 1e-6
    assert "logits off" in kdef.harness.check((wrong,), case.expected)
    shown = ref.float().clone()
    shown[~visible] = 0.0
    assert "not −inf" in kdef.harness.check((shown,), case.expected)
    sub = kdef.harness.batch_slice(case, 1, 3)
    _check_slice(case, sub, 1, 3, {0, 1, 2, 3, 4})


def test_indexer_logits_expected_is_the_reference_formula():
    """The harness's fp64 expectation agrees with tilev4.reference.indexer_scores on the dequantised inputs."""
    kdef = get_kernel_def("indexer_logits")
    problem = kdef.problem({"H": 64, "D": 128})
    gen = torch.Generator().manual_seed(3)
    case = I._logits_case(problem, 8, gen, "cpu", True, entries=200, seq_queries=4)
    q8, qw, k8, ks, visible, _ = case.args
    # the kernel's inputs dequantised: k = k8 · s_k exactly, and s_q folded into the head weight w · s_q
    k = k8.float() * ks.unsqueeze(-1)
    positions = visible.long() * 4 + 2  # a position that sees exactly `visible` entries: (t + 1) // 4
    ref = indexer_scores(q8.float(), qw, k, positions)
    assert torch.equal(torch.isfinite(ref), torch.isfinite(case.expected[0]))
    fin = torch.isfinite(ref)
    assert ((ref.double() - case.expected[0]).abs()[fin] <= 1e-5 * case.expected[1][fin] + 1e-30).all()


def test_topk_harness():
    kdef = get_kernel_def("topk_select")
    problem = kdef.problem({"K": 512})
    case = I._topk_case(problem, 9, torch.Generator().manual_seed(2), "cpu", True, entries=2000)
    logits, lengths, out, offset, ib = case.args
    logits = logits.reshape(9, -1)  # [R, N / vec, vec] -> [R, N]
    assert case.rows == 9 and out.shape == (9, 512) and ib == 11
    assert lengths[:4].tolist() == [0, 1, 511, 2000]
    (exp,) = case.expected
    assert exp[0].eq(-1).all() and exp[1, 0] == offset and exp[1, 1:].eq(-1).all()
    # row 3 holds ties only: equal values in increasing index order
    row = exp[3][exp[3] >= 0] - offset
    vals = logits[3, row]
    assert ((vals[1:] < vals[:-1]) | ((vals[1:] == vals[:-1]) & (row[1:] > row[:-1]))).all()
    assert kdef.harness.check((exp.clone(),), case.expected) is None
    assert kdef.harness.check(_poisoned((exp,)), case.expected)
    swapped = exp.clone()
    swapped[5, [0, 1]] = swapped[5, [1, 0]]
    assert "1 rows differ" in kdef.harness.check((swapped,), case.expected)
    sub = kdef.harness.batch_slice(case, 2, 7)
    _check_slice(case, sub, 2, 7, {0, 1})
    # the expectation is the reference's selection of each row alone
    hidden = torch.arange(2000) >= lengths[6]
    alone = indexer_topk(logits[6].masked_fill(hidden, -math.inf).view(1, 1, -1), 512, offset)[0, 0]
    assert torch.equal(alone, exp[6])


PREFILL = [{"ratio": 4, "D": 128, "quant": "indexer"}, {"ratio": 128, "D": 512, "quant": "attention"},
           {"ratio": 4, "D": 512, "quant": "none", "out_dtype": "float32"}]


@pytest.mark.parametrize("cfg", PREFILL, ids=lambda c: f"m{c['ratio']}-D{c['D']}-{c['quant']}")
def test_compressor_prefill_harness(cfg):
    kdef = get_kernel_def("compressor_prefill")
    problem = kdef.problem(cfg)
    ratio = problem["ratio"]
    n = 3 * ratio + 1
    case = C._prefill_case(problem, n, torch.Generator().manual_seed(4), "cpu", True, sequences=3)
    assert case.rows == 3 and case.initial is None
    *refs, fmt = case.expected
    assert fmt.quant == problem["quant"] and len(refs) == len(case.outputs) == (6 if ratio == 4 else 4)
    entries, num_tokens = refs[0], refs[1]
    heads = case.args[5]
    assert torch.equal(num_tokens, heads + n)
    for j in range(3):  # exactly the entries completed by this call are expected, the rest stays untouched
        done = torch.arange(entries.shape[1])
        want = (done >= heads[j] // ratio) & (done < (heads[j] + n) // ratio)
        assert torch.equal(~torch.isnan(entries[j, :, 0]), want)
    perfect = _as_outputs(case, refs)
    assert kdef.harness.check(perfect, case.expected) is None
    assert kdef.harness.check(_poisoned(perfect), case.expected)
    # a changed entry value, a row written that must not be, a state bit
    wrong = list(perfect)
    j, i = torch.nonzero(~torch.isnan(entries[..., 0]))[0].tolist()
    wrong[0] = perfect[0].clone()
    wrong[0][j, i, :8] += 64.0
    assert kdef.harness.check(tuple(wrong), case.expected)
    wrong[0] = perfect[0].clone()
    wrong[0][:, -1] = 0
    assert "must not write" in kdef.harness.check(tuple(wrong), case.expected)
    wrong[0] = perfect[0]
    wrong[2] = perfect[2].clone()
    wrong[2].view(-1)[7] = torch.nextafter(wrong[2].view(-1)[7], torch.tensor(math.inf))
    assert "state.kv" in kdef.harness.check(tuple(wrong), case.expected)
    sub = kdef.harness.batch_slice(case, 1, 3)
    _check_slice(case, sub, 1, 3, {0, 1, 5, 6, 7, 8, 9}, fresh=set(range(10, 16)))


def test_compressor_entries_check_allows_one_quantum_on_few_values():
    cache = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(11))
    fmt = C._EntryFormat("attention", 64)
    ref = kv_fp8_simulate(cache, nope_dim=448, block=64)
    assert C._entries_check(ref.clone(), ref, fmt) is None
    one = ref.clone()
    blk = one[0, 0, :64]
    scale = torch.exp2(torch.ceil(torch.log2(blk.abs().max() / 448)))
    k = int(blk.abs().argmax())
    # the neighbouring e4m3 code towards 0: 3 mantissa bits, so one quantum is 2^(exponent - 3) (16 in [128, 256),
    # 32 in [256, 448]); the block's largest code lies in (224, 448] whatever the random draw
    quantum = torch.exp2(torch.floor(torch.log2(blk[k].abs() / scale)) - 3)
    one[0, 0, k] = blk[k] - torch.sign(blk[k]) * quantum * scale
    assert C._entries_check(one, ref, fmt) is None  # one quantum, one value of 2688
    many = ref.clone()
    many[..., :448] *= 1 + 2.0**-4  # within one quantum, but most values differ
    assert "differ" in C._entries_check(many, ref, fmt)
    far = ref.clone()
    far[1, 2, 10] *= 1.5
    assert "quantum" in C._entries_check(far, ref, fmt)


DECODE = [{"ratio": 4, "D": 512, "quant": "attention"}, {"ratio": 128, "D": 512, "quant": "attention"},
          {"ratio": 4, "D": 128, "quant": "indexer", "in_dtype": "float32"}]


@pytest.mark.parametrize("cfg", DECODE, ids=lambda c: f"m{c['ratio']}-D{c['D']}-{c['quant']}")
def test_compressor_decode_harness(cfg):
    kdef = get_kernel_def("compressor_decode")
    problem = kdef.problem(cfg)
    ratio = problem["ratio"]
    case = C._decode_case(problem, 10, torch.Generator().manual_seed(5), "cpu", True)
    *refs, _ = case.expected
    in_place = (5, 6, 7) + ((8, 9) if ratio == 4 else ())
    assert case.outputs == (10, *in_place) and set(case.initial) == set(in_place)
    t = case.args[5]
    emitted = (t + 1) % ratio == 0
    assert emitted[::2].all()  # every other sequence completes a block
    assert torch.equal((~torch.isnan(refs[0][..., 0])).any(-1), emitted)
    assert torch.equal(refs[1], t + 1)
    perfect = _as_outputs(case, refs)
    assert kdef.harness.check(perfect, case.expected) is None
    assert kdef.harness.check(_poisoned(perfect), case.expected)
    stale = list(perfect)
    stale[1] = t.clone()  # num_tokens not advanced
    assert "state.num_tokens" in kdef.harness.check(tuple(stale), case.expected)
    # the case's state moves on with every launch; restore() and batch_slice start from the initial one
    start = {i: case.args[i].clone() for i in in_place}
    for i in in_place:
        case.args[i].add_(1)
    sub = kdef.harness.batch_slice(case, 3, 8)
    assert sub.rows == 5 and torch.equal(sub.args[5], start[5][3:8]) and torch.equal(sub.args[6], start[6][3:8])
    assert set(sub.initial) == set(in_place) and all(sub.args[i].data_ptr() != case.args[i].data_ptr()
                                                     for i in in_place)
    assert torch.equal(sub.args[0], case.args[0][3:8]) and sub.args[2] is case.args[2]
    assert sub.args[10].shape == (5, *case.args[10].shape[1:])
    case.restore()
    for i in in_place:
        assert torch.equal(case.args[i], start[i])


@pytest.mark.parametrize("cfg", [{"dim": 256}, {"dim": 256, "head": True},
                                 {"dim": 256, "h_dtype": "bfloat16", "x_dtype": "bfloat16"}], ids=str)
def test_mhc_pre_harness(cfg):
    kdef = get_kernel_def("mhc_pre")
    problem = kdef.problem(cfg)
    case = kdef.harness.make_case(problem, 7, torch.Generator().manual_seed(6), "cpu", True)
    assert case.rows == 7 and len(case.expected) == len(case.outputs) == (2 if problem["head"] else 4)
    perfect = _as_outputs(case, case.expected)
    assert kdef.harness.check(perfect, case.expected) is None
    assert kdef.harness.check(_poisoned(perfect), case.expected)
    wrong = list(perfect)
    wrong[1] = perfect[1].clone()
    wrong[1][3, 2] += 1e-3 * float(perfect[1].abs().max())
    assert "mix exceeds" in kdef.harness.check(tuple(wrong), case.expected)
    sub = kdef.harness.batch_slice(case, 2, 5)
    _check_slice(case, sub, 2, 5, {0})


# ------------------------------------------------------------------- the tuner's loop with CPU stand-ins


def _decode_stand_in(problem):
    """compressor_decode on the CPU with the reference: updates the state in place, as the kernel does."""
    ratio, quant = problem["ratio"], None if problem["quant"] == "none" else problem["quant"]

    def kernel(kv, gate, ape, weight, freqs, num_tokens, st_kv, st_score, st_pkv, st_pscore, cache):
        overlap = ratio == 4
        state = CompressorState(st_kv.clone(), st_score.clone(), st_pkv.clone() if overlap else None,
                                st_pscore.clone() if overlap else None, num_tokens.clone())
        e, emitted, index, new = compressor_decode_step(kv, gate, state, ape, weight, ratio, quant=quant)
        sel = (emitted & (index < cache.shape[1])).nonzero().squeeze(1)
        cache[sel, index[sel]] = e[sel].to(cache.dtype)
        for dst, src in ((num_tokens, new.num_tokens), (st_kv, new.kv), (st_score, new.score),
                         (st_pkv, new.prev_kv), (st_pscore, new.prev_score)):
            if src is not None:
                dst.copy_(src)

    return kernel


@pytest.mark.parametrize("restore", [True, False])
def test_tuner_restores_the_decode_state_for_every_candidate(monkeypatch, restore):
    """The candidates checked one after the other on one case: each must start from the initial state (a
    check launch moves it on by a token, and the poisoning of the outputs hits the state too)."""
    if not restore:
        monkeypatch.setattr(TuningCase, "restore", lambda self: None)
    kdef = get_kernel_def("compressor_decode")
    (plan,) = plan_kernel("compressor_decode", parse_shapes(["ratio=128,D=512,quant=attention,b=8"]), arch="sm_90a")
    assert len(plan.candidates) == 4 and plan.sizes == [[8]]  # 1, 2, 4, 8 sequences of 128 threads
    kernel = _decode_stand_in(plan.problems[0])
    kernels = {(0, label): kernel for label in plan.labels}
    m = measure_bucket(plan, kernels, kdef.harness, batch_invariant=True, device="cpu", timer=WallTimer(),
                       rounds=1, reps=1, warmup=0, num_inputs=1)
    if restore:
        assert set(m.status.values()) == {"ok"}, m.detail
    else:  # the poisoned state (num_tokens = -1) is what the launches read
        assert "ok" not in m.status.values(), m.status
