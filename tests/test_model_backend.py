"""The backend switch without a GPU: op selection, KernelOps' calls into the public kernels (emulated on the
CPU from their documented semantics), the bf16 cache, random cache contents, the mHC ops' input validation and
the check-determinism command's CPU behaviour.

Tolerances: the emulated kernels round exactly where the real ones do (bf16 at their boundaries) and compute in
fp64 otherwise; indices are compared exactly.
"""

import pytest
import torch

from tilev4.cli import main
from tilev4.kernels import mhc as K
from tilev4.model import Config, KVCache, Model, random_checkpoint_tensors
from tilev4.model.backend import KernelOps, Linear, ReferenceOps, ops_for_device, read_window, write_window
from tilev4.reference import attention as RA
from tilev4.reference import compressor as RC
from tilev4.reference import indexer as R_I
from tilev4.reference import mhc as RH
from tilev4.reference import moe as RM
from tilev4.reference import norm as RN
from tilev4.reference import quant as RQ
from tilev4.reference.compressor import CompressorState
from tilev4.reference.rope import RopeConfig


def test_ops_for_device_and_modes():
    assert type(ops_for_device("cpu")) is ReferenceOps
    assert ops_for_device("cpu").cache_dtype == torch.float32
    k = KernelOps()
    assert not k.batch_invariant and k.cache_dtype == torch.bfloat16
    assert {"attention"} == set(k.non_invariant_ops())  # the indexer logits are invariant in every build
    assert KernelOps(batch_invariant=True).non_invariant_ops() == {}
    assert "batch_invariant=True" in repr(KernelOps(True))


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_linears_through_the_kernel_ops(monkeypatch, gen, batch_invariant):
    """KernelOps.linear / grouped_linear hand the split-bf16 linear an fp32 x and the checkpoint's weight in bf16
    (exact for FP8 weights with power-of-two block scales and for bf16 weights), in both modes."""
    import tilev4

    fake = _FakeKernels()
    monkeypatch.setattr(tilev4, "linear", fake.linear)
    monkeypatch.setattr(tilev4, "grouped_linear", fake.grouped_linear)
    ops = KernelOps(batch_invariant=batch_invariant)
    w8 = (torch.randn(256, 256, generator=gen) * 8).to(torch.float8_e4m3fn)
    scale = torch.randint(120, 130, (2, 2), generator=gen).to(torch.uint8)  # e8m0 block scales
    for lin in (Linear(torch.randn(96, 192, generator=gen).bfloat16()), Linear(w8, scale)):
        x = torch.randn(2, 5, lin.weight.shape[1], generator=gen)
        torch.testing.assert_close(ops.linear(x, lin), ReferenceOps.linear(x, lin), rtol=1e-6, atol=1e-6)
    lin_g = Linear(torch.randn(4 * 24, 64, generator=gen).bfloat16())
    xg = torch.randn(3, 2, 4, 64, generator=gen)
    torch.testing.assert_close(ops.grouped_linear(xg, lin_g), ReferenceOps.grouped_linear(xg, lin_g), rtol=1e-6,
                               atol=1e-6)
    assert fake.calls == {"linear": 2, "grouped_linear": 1}
    with pytest.raises(ValueError, match="not exactly representable in bf16"):
        ops.linear(torch.randn(1, 64), Linear(torch.randn(8, 64, generator=gen)))  # an fp32 weight


@pytest.mark.parametrize(("ratio", "quant", "d"), [(4, "attention", 512), (128, "attention", 512), (4, "indexer", 128)])
def test_compressor_through_the_kernel_ops(monkeypatch, gen, ratio, quant, d):
    """KernelOps.compress_into hands the compressor kernels what they require and ends with the reference's
    cache and state (kernels emulated from their documented semantics), prefill then decode steps."""
    import tilev4

    fake = _FakeKernels()
    monkeypatch.setattr(tilev4, "compress_prefill", fake.compress_prefill)
    monkeypatch.setattr(tilev4, "compress_decode", fake.compress_decode)
    ops, ref = KernelOps(), ReferenceOps()
    b, coff = 3, 2 if ratio == 4 else 1
    ape = torch.randn(ratio, coff * d, generator=gen)
    norm = torch.randn(d, generator=gen)
    rope = RopeConfig.compressed()
    n = 2 * ratio + 3
    kv = torch.randn(b, n + ratio, coff * d, generator=gen)
    gate = torch.randn(b, n + ratio, coff * d, generator=gen)
    stores = [torch.zeros(b, (n + ratio) // ratio + 1, d, dtype=torch.bfloat16) for _ in range(2)]
    states = [CompressorState.empty(b, ratio, d) for _ in range(2)]
    for o, st, store in ((ops, 0, stores[0]), (ref, 1, stores[1])):
        states[st] = o.compress_into(kv[:, :n], gate[:, :n], states[st], ape, norm, ratio, rope, quant, store)
        for t in range(n, n + ratio):  # decode steps, one of them completes a block
            states[st] = o.compress_into(kv[:, t : t + 1], gate[:, t : t + 1], states[st], ape, norm, ratio, rope,
                                         quant, store)
    assert torch.equal(stores[0], stores[1])
    assert torch.equal(states[0].kv, states[1].kv) and torch.equal(states[0].num_tokens, states[1].num_tokens)
    assert fake.calls == {"compress_prefill": 1, "compress_decode": ratio}


@pytest.mark.parametrize("batch_invariant", [False, True])
@pytest.mark.parametrize("hi", [64, 8])
def test_indexer_through_the_kernel_ops(monkeypatch, gen, batch_invariant, hi):
    """KernelOps.indexer prepares the queries (Hadamard on the linear kernel), casts them and the keys to FP8 rows
    exactly and selects what the reference selects (the kernel ops emulated from their documented semantics),
    in one call for the whole batch in both modes."""
    import tilev4

    fake = _FakeKernels()
    monkeypatch.setattr(tilev4, "indexer_topk", fake.indexer_topk)
    monkeypatch.setattr(tilev4, "linear", fake.linear)
    ops, ref = KernelOps(batch_invariant=batch_invariant), ReferenceOps()
    b, s, di, n_c = 3, 5, 128, 30
    q = torch.randn(b, s, hi, di, generator=gen)
    w = torch.randn(b, s, hi, generator=gen)
    keys = RQ.fp4_e2m1_simulate(torch.randn(b, n_c, di, generator=gen), 32)  # as the indexer compressor stores
    positions = torch.arange(100, 100 + s).repeat(b, 1)
    rope = RopeConfig.compressed()
    got = ops.indexer(q, w, keys, positions, rope, 8)
    want = ref.indexer(q, w, keys, positions, rope, 8)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)  # the same set (the kernel orders by score)
    assert fake.calls == {"indexer_topk": 1, "linear": 1}


def test_window_stream_and_ring(gen):
    ring = torch.zeros(2, 128, 8)
    positions = torch.tensor([[300, 301, 302], [5, 6, 7]])
    old = torch.randn(2, 128, 8, generator=gen)
    ring.copy_(old)
    kv = torch.randn(2, 3, 8, generator=gen)
    stream, idx, start = read_window(ring, kv, positions, 128, torch.bfloat16)
    assert stream.dtype == torch.bfloat16 and stream.shape == (2, 130, 8)
    assert start.tolist() == [300 - 127, 5 - 127]
    # query t's window is positions t-127 … t at stream rows (p - start); positions < 0 are -1
    assert idx[0, 0].tolist() == list(range(0, 128))
    assert idx[1, 2, :120].eq(-1).all() and idx[1, 2, 120:].tolist() == list(range(127 - 5, 127 + 3))
    torch.testing.assert_close(stream[0, 126].float(), old[0, 299 % 128].bfloat16().float())
    write_window(ring, kv, positions)
    assert torch.equal(ring[0, 302 % 128], kv[0, 2]) and torch.equal(ring[1, 7], kv[1, 2])


def test_bf16_cache_and_fill_random():
    cfg = Config.small()
    cache = KVCache(cfg, 2, 1024, dtype=torch.bfloat16)
    assert cache.layers[2].window.dtype == torch.bfloat16 and cache.layers[2].compressed.dtype == torch.bfloat16
    assert cache.layers[2].index_keys.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        KVCache(cfg, 1, 8, dtype=torch.float16)
    cache.fill_random(999, seed=1)
    assert cache.lengths.tolist() == [999, 999]
    lc = cache.layers[2]  # CSA
    assert lc.compressed[:, 999 // 4 :].eq(0).all() and lc.compressed[:, : 999 // 4].abs().sum() > 0
    assert lc.compressor.num_tokens.tolist() == [999, 999]
    assert torch.isinf(lc.compressor.score[:, 999 % 4 :]).all() and torch.isfinite(lc.compressor.score[:, :3]).all()
    with pytest.raises(ValueError, match="capacity"):
        cache.fill_random(2000)


def test_model_decodes_from_a_random_cache():
    cfg = Config.tiny()
    model = Model(cfg, random_checkpoint_tensors(cfg, seed=2))
    cache = model.new_cache(2, 512)
    cache.fill_random(300, seed=3)
    logits = model.decode([1, 2], cache)
    assert torch.isfinite(logits).all() and cache.lengths.tolist() == [301, 301]


def test_model_batch_invariant_flag_on_cpu_is_the_reference():
    cfg = Config.tiny()
    m = Model(cfg, random_checkpoint_tensors(cfg, seed=1), batch_invariant=True)
    assert type(m.ops) is ReferenceOps  # the flag selects kernel variants; the CPU has none


def test_mhc_ops_validate_inputs():
    h = torch.randn(1, 2, 4, 256)
    fn, base, scale, w = torch.randn(24, 1024), torch.randn(24), torch.randn(3), torch.randn(256)
    with pytest.raises(ValueError, match="CUDA"):
        K.mhc_pre(h, fn, base, scale, w)
    with pytest.raises(TypeError, match="h must be"):
        K.mhc_pre(h.half(), fn, base, scale, w)
    with pytest.raises(ValueError, match="h must have shape"):
        K.mhc_pre(torch.randn(1, 2, 3, 256), fn, base, scale, w)
    with pytest.raises(ValueError, match="iters"):
        K.mhc_pre(h, fn, base, scale, w, iters=0)
    with pytest.raises(ValueError, match="CUDA"):
        K.mhc_post(h, torch.randn(1, 2, 256), torch.rand(1, 2, 4), torch.rand(1, 2, 4, 4))
    with pytest.raises(ValueError, match="CUDA"):
        K.mhc_head_pre(h, fn[:4], base[:4], scale[:1], w)


def test_mhc_kernels_registered_batch_invariant():
    from tilev4.kernels import get_kernel_def

    for name in ("mhc_pre", "mhc_post"):
        kdef = get_kernel_def(name)
        assert kdef.batch_invariant and {c["dim"] for c in kdef.configs} == {256, 1024, 4096}


def test_check_determinism_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the command would run")
    assert main(["check-determinism"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------
# KernelOps' calls into the public kernels, emulated on the CPU: each fake checks the dtypes, shapes and
# contiguity the real op demands and computes the op's documented semantics with the reference (attention:
# from ``positions`` / ``window_start`` / the cache rows, independently of the runtime's own index building).


def _contig(name, t, dtype):
    assert t.dtype == dtype, f"{name}: {t.dtype} != {dtype}"
    assert t.is_contiguous(), f"{name} is not contiguous"
    return t


class _FakeKernels:
    calls: dict[str, int]

    def __init__(self):
        self.calls = {}

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1

    def rmsnorm(self, x, weight, eps=1e-6, out=None):
        self._count("rmsnorm")
        _contig("x", x, torch.bfloat16)
        _contig("weight", weight, torch.float32)
        assert weight.shape == (x.shape[-1],)
        return RN.rmsnorm(x, weight, eps).bfloat16()

    def mhc_pre(self, h, fn, base, scale, norm_weight, iters=20, eps=1e-6, norm_eps=1e-6):
        self._count("mhc_pre")
        for n, t in (("h", h), ("fn", fn), ("base", base), ("scale", scale), ("norm_weight", norm_weight)):
            _contig(n, t, torch.float32)
        assert fn.shape == (24, 4 * h.shape[-1]) and scale.shape == (3,)
        return RH.mhc_pre(h, fn, base, scale, norm_weight, iters, eps, norm_eps)

    def mhc_head_pre(self, h, fn, base, scale, norm_weight, eps=1e-6, norm_eps=1e-6):
        self._count("mhc_head_pre")
        for n, t in (("h", h), ("fn", fn), ("base", base), ("scale", scale), ("norm_weight", norm_weight)):
            _contig(n, t, torch.float32)
        assert fn.shape == (4, 4 * h.shape[-1]) and scale.shape == (1,)
        mix = RH.mhc_mix(h, fn, eps)
        pre = torch.sigmoid(mix * scale[0] + base) + eps  # [b, s, 4]
        return RN.rmsnorm((pre.unsqueeze(-1) * h).sum(-2), norm_weight, norm_eps)

    def mhc_post(self, h, f_out, post, comb):
        self._count("mhc_post")
        for n, t in (("h", h), ("f_out", f_out), ("post", post), ("comb", comb)):
            _contig(n, t, torch.float32)
        return RH.mhc_post(h, f_out, post, comb)

    @staticmethod
    def _window_keys(positions, window_start, rows):
        """Stream rows of the window of each query, as the kernel's Window source (non-ring) defines it."""
        p = positions.long().unsqueeze(-1) + torch.arange(-127, 1)  # [b, s, 128] absolute positions
        start = window_start.long().view(-1, 1, 1)
        ok = (p >= start.clamp(min=0)) & (p - start < rows)
        return torch.where(ok, p - start, -1).int()

    def _attend(self, q, kv_window, positions, window_start, sink, comp_kv, comp_idx):
        b, s, h, _ = _contig("q", q, torch.bfloat16).shape
        _contig("kv_window", kv_window, torch.bfloat16)
        _contig("positions", positions, torch.int32)
        _contig("window_start", window_start, torch.int32)
        _contig("sink", sink, torch.float32)
        assert positions.shape == (b, s) and window_start.shape == (b,) and sink.shape == (h,)
        win = self._window_keys(positions, window_start, kv_window.shape[1])
        kv_all, idx = RA.concat_key_sets(kv_window.float(), comp_kv.float(), win, comp_idx)
        return RA.sparse_attention(q.float(), kv_all, sink, idx).bfloat16()

    def sparse_attention(self, q, kv, sink, indices, scale=None, *, batch_invariant=False, validate=True):
        self._count("sparse_attention")
        _contig("q", q, torch.bfloat16)
        _contig("kv", kv, torch.bfloat16)
        _contig("indices", indices, torch.int32)
        return RA.sparse_attention(q.float(), kv.float(), sink, indices).bfloat16()

    def csa_attention(self, q, kv_window, kv_compressed, indices, sink, positions, window_start=None, scale=None,
                      *, batch_invariant=False, validate=True):
        self._count("csa_attention")
        assert window_start is not None
        _contig("kv_compressed", kv_compressed, torch.bfloat16)
        _contig("indices", indices, torch.int32)
        assert int(indices.max()) < kv_compressed.shape[1]
        return self._attend(q, kv_window, positions, window_start, sink, kv_compressed, indices)

    def hca_attention(self, q, kv_window, kv_compressed, sink, positions, window_start=None, scale=None,
                      *, batch_invariant=False, validate=True):
        self._count("hca_attention")
        assert window_start is not None and kv_compressed.shape[1] >= 1
        _contig("kv_compressed", kv_compressed, torch.bfloat16)
        n = kv_compressed.shape[1]
        t = positions.long().unsqueeze(-1)
        j = torch.arange(n)
        dense = torch.where(j < (t + 1) // 128, j, -1).int()  # every visible entry, as CompressedDense
        return self._attend(q, kv_window, positions, window_start, sink, kv_compressed, dense)

    def compress_prefill(self, kv, gate, ape, norm_weight, cache, ratio, *, quant="attention", rope=None, state=None,
                         validate=True):
        self._count("compress_prefill")
        for n, t in (("kv", kv), ("gate", gate), ("ape", ape), ("norm_weight", norm_weight)):
            _contig(n, t, torch.float32)
        assert cache.is_contiguous() and cache.dtype in (torch.bfloat16, torch.float32) and state is not None
        assert bool((state.num_tokens == state.num_tokens[0]).all()), "the emulation covers a common start"
        c0 = int(state.num_tokens[0]) // ratio
        entries, new_state = RC.compressor_prefill(kv, gate, ape, norm_weight, ratio, rope, quant, state)
        cache[:, c0 : c0 + entries.shape[1]] = entries.to(cache.dtype)
        return new_state

    def compress_decode(self, kv, gate, ape, norm_weight, cache, state, ratio, *, quant="attention", rope=None,
                        validate=True):
        self._count("compress_decode")
        for n, t in (("kv", kv), ("gate", gate), ("ape", ape), ("norm_weight", norm_weight)):
            _contig(n, t, torch.float32)
        assert kv.ndim == 2 and cache.is_contiguous()
        entries, emitted, index, new = RC.compressor_decode_step(kv, gate, state, ape, norm_weight, ratio, rope, quant)
        for j in range(kv.shape[0]):
            if bool(emitted[j]):
                cache[j, int(index[j])] = entries[j].to(cache.dtype)
        for f in ("kv", "score", "prev_kv", "prev_score", "num_tokens"):  # in place, as the kernel
            if getattr(state, f) is not None:
                getattr(state, f).copy_(getattr(new, f))

    def indexer_topk(self, q8, q_scale, w, k8, k_scale, positions, top_k, *, ratio=4, k_lens=None, offset=0,
                     batch_invariant=False, return_logits=False):
        self._count("indexer_topk")
        _contig("q8", q8, torch.float8_e4m3fn)
        _contig("q_scale", q_scale, torch.float32)
        _contig("k8", k8, torch.float8_e4m3fn)
        _contig("k_scale", k_scale, torch.float32)
        assert w.dtype == torch.float32 and q8.shape[2] in (8, 16, 32, 64) and q8.shape[3] == k8.shape[2] == 128
        q = q8.float() * q_scale.unsqueeze(-1)
        k = k8.float() * k_scale.unsqueeze(-1)
        scores = R_I.indexer_scores(q, w, k, positions, ratio)
        idx = R_I.indexer_topk(scores, top_k)
        return (idx, scores) if return_logits else idx

    def linear(self, x, weight):
        self._count("linear")
        _contig("weight", weight, torch.bfloat16)
        assert x.dtype == torch.float32 and weight.ndim == 2 and x.shape[-1] == weight.shape[1]
        return (x.double() @ weight.double().T).float()

    def grouped_linear(self, x, weight):
        self._count("grouped_linear")
        _contig("weight", weight, torch.bfloat16)
        g, k = x.shape[-2:]
        assert x.dtype == torch.float32 and weight.shape[1] == k and weight.shape[0] % g == 0
        return torch.einsum("...gk,grk->...gr", x.double(), weight.double().view(g, -1, k)).float()

    def moe(self, x, gate_weight, gate_bias, w1, w2, w3, shared=None, *, top_k=6, route_scale=1.5,
            swiglu_limit=10.0, tid2eid=None, token_ids=None, weight_format="bf16", out_dtype=torch.bfloat16,
            validate=True, out=None):
        self._count("moe")
        _contig("x", x, torch.bfloat16)
        _contig("gate_weight", gate_weight, torch.float32)
        for n, t in (("w1", w1), ("w2", w2), ("w3", w3), *((f"shared[{i}]", s) for i, s in enumerate(shared))):
            _contig(n, t, torch.bfloat16)
        if tid2eid is not None:
            _contig("tid2eid", tid2eid, torch.int32)
            _contig("token_ids", token_ids, torch.int32)
            assert gate_bias is None
        weights, experts = RM.moe_gate(x, gate_weight, gate_bias, top_k, route_scale, tid2eid, token_ids)
        routed = [(w1[e], w2[e], w3[e]) for e in range(w1.shape[0])]
        return RM.moe(x, weights, experts, routed, shared, swiglu_limit).to(out_dtype)


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_kernel_ops_call_the_public_kernels_correctly(monkeypatch, batch_invariant):
    """The tiny model on KernelOps with the kernels emulated: every kernel is called with the dtypes and
    layouts it requires, the bf16 cache works, and the logits stay within the GPU test's tolerance of the
    reference (the emulation rounds exactly where the kernels do)."""
    import tilev4
    from tilev4.model.backend import LOGITS_REL_TOL

    fake = _FakeKernels()
    for name in ("rmsnorm", "mhc_pre", "mhc_head_pre", "mhc_post", "sparse_attention", "csa_attention",
                 "hca_attention", "moe", "indexer_topk", "compress_prefill", "compress_decode", "linear",
                 "grouped_linear"):
        monkeypatch.setattr(tilev4, name, getattr(fake, name))
    cfg = Config.tiny().replace(name="tiny-smooth", n_activated_experts=8, index_topk=64)
    t = random_checkpoint_tensors(cfg, seed=21)
    ref, kern = Model(cfg, t), Model(cfg, t, ops=KernelOps(batch_invariant))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (140, 40, 1)]
    for capacity, n in ((256, 140), (100, 90)):  # 100: no HCA row in the cache (the kernels get one zero row)
        cr, ck = ref.new_cache(3, capacity), kern.new_cache(3, capacity)
        assert ck.layers[1].compressed.dtype == torch.bfloat16
        lr, lk = ref.prefill([p[:n] for p in prompts], cr), kern.prefill([p[:n] for p in prompts], ck)
        errs = [((lk - lr).norm(dim=-1) / lr.norm(dim=-1)).max().item()]
        for _ in range(3):
            nxt = lr.argmax(-1)
            lr, lk = ref.decode(nxt, cr), kern.decode(nxt, ck)
            errs.append(((lk - lr).norm(dim=-1) / lr.norm(dim=-1)).max().item())
        assert max(errs) < LOGITS_REL_TOL, errs
    # every kernel the tiny model can use (its 4 indexer heads keep the indexer on torch math)
    assert set(fake.calls) == {"rmsnorm", "mhc_pre", "mhc_head_pre", "mhc_post", "sparse_attention",
                               "csa_attention", "hca_attention", "moe", "compress_prefill",
                               "compress_decode", "linear", "grouped_linear"}, fake.calls
