"""Manifold-constrained hyper-connections (mHC, n = 4 streams): the "pre" and "post" kernels.

Semantics (spec section "mHC", reference :mod:`tilev4.reference.mhc`). Around every sub-layer F:

* ``mix = (flat(h) @ fnᵀ) · rsqrt(mean(flat(h)²) + eps)`` [N, 24] (``flat(h)`` [N, 4·dim]);
* ``pre_i = sigmoid(mix_i·scale0 + base_i) + eps``, ``post_i = 2·sigmoid(mix_{4+i}·scale1 + base_{4+i})``,
  ``comb = sinkhorn(mix_{8+4j+k}·scale2 + base_{8+4j+k})`` (softmax over k, + eps, column divide, then 19
  rounds of row and column divides, every divisor ``sum + eps``);
* ``x = rmsnorm(Σ_i pre_i·h_i, norm_weight)``;
* after F: ``h'_k = post_k·F(x) + Σ_j comb[j,k]·h_j``.

The head uses the same "pre" kernel with ``head=True``: ``fn`` [4, 4·dim], ``pre = sigmoid(mix·scale0 +
base) + eps``, then the final rmsnorm (the vocabulary projection is a GEMM, not part of this module).

Kernels:

* ``mhc_pre`` — one CTA per token (``threads`` threads): the mix GEMV, the coefficients with the 20-round
  Sinkhorn and the collapse + rmsnorm, fused. Thread ``tx`` owns the flat elements ``i·threads + tx`` of
  its token; it accumulates the 24 dot products and the sum of squares in registers over its elements in
  increasing ``i``; the per-thread partials are added in a fixed two-level order (``threads/32`` groups of
  32 consecutive threads, then the groups in order). Thread 0 computes the coefficients (4×4 Sinkhorn in
  registers). The collapse re-reads ``h`` by hidden index (L1/L2 hits) and reduces ``Σ x²`` the same way.
  Outputs: ``x`` [N, dim], ``mix`` [N, M] (for tests), ``post`` [N, 4], ``comb`` [N, 4, 4].
* ``mhc_post`` — grid (N, ⌈dim/block_d⌉), one thread per hidden index: ``post_k·f + (((c0k·h0 + c1k·h1) +
  c2k·h2) + c3k·h3)`` for the 4 target streams.

Batch invariance: every token is computed by its own CTA with a reduction order that depends only on
``dim`` and ``threads`` (compile-time), never on N: bitwise batch-invariant by construction.

Accuracy: fp32 throughout. Against the fp32 reference the sums run in another order and the Sinkhorn
divides by multiplying with the reciprocal of ``sum + eps`` (one rounding more), so results agree to a few
fp32 ulps of the mix (tests/test_mhc_gpu.py: mix 1e-5 relative, post / comb 2e-5 absolute, x 1e-4).

Dimension glossary: N tokens (dynamic), dim hidden size, K = 4·dim flat stream width, M mix width
(24 for a sub-layer, 4 for the head), D the hidden index.

Tuning: ``mhc_pre`` tunes ``threads`` (:data:`MHC_PRE_SPACE`; default 128 up to dim 1024, 256 above: 64
flat elements per thread at dim 4096), one bucket per (head, dim); ``mhc_post`` tunes ``block_d``
(:data:`MHC_POST_SPACE`). ``threads`` sets the reduction order, but it is fixed per bucket and never
depends on N, so the tuned kernel is as batch-invariant as the default one. The fn matrix (24 × 4·dim
fp32, 1.5 MB at dim 4096) is read once per token and stays in L2; tiling several tokens per CTA to reuse
it from shared memory is the next step for long prefills.
"""

from collections.abc import Mapping
from typing import Any

import tilelang.language as T
import torch

from tilev4._checks import check_same_device, check_tensor
from tilev4.autotune.harness import TuningCase, TuningHarness
from tilev4.autotune.space import Space
from tilev4.kernels.registry import compile_kernel, register

__all__ = ["MHC_POST_SPACE", "MHC_PRE_SPACE", "MIX_WIDTH", "NUM_STREAMS", "build_mhc_post", "build_mhc_pre",
           "mhc_head_pre", "mhc_post", "mhc_pre"]

NUM_STREAMS = 4
MIX_WIDTH = 24
HEAD_MIX_WIDTH = 4
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


MAX_LOCAL_FLOATS = 160  # mhc_pre's per-thread fp32 arrays (h, x, M + 1 partial sums): past ~200 registers, spills


def _default_threads(dim: int) -> int:
    return 128 if dim <= 1024 else 256


def _pre_threads_fit(c: Mapping[str, Any]) -> str | None:
    """Whole warps that split the flat row and the hidden dim evenly, and per-thread arrays that fit in registers."""
    th, dim = c["threads"] or _default_threads(c["dim"]), c["dim"]
    if th % 32 or dim % th:
        return f"threads={th} must be a multiple of 32 that divides dim={dim}"
    local = NUM_STREAMS * dim // th + dim // th + (HEAD_MIX_WIDTH if c["head"] else MIX_WIDTH) + 1
    if local > MAX_LOCAL_FLOATS:
        return f"{local} fp32 values per thread in registers > {MAX_LOCAL_FLOATS}"
    return None


def _pre_smem(c: Mapping[str, Any]) -> int:
    th = c["threads"] or _default_threads(c["dim"])
    r = (HEAD_MIX_WIDTH if c["head"] else MIX_WIDTH) + 1
    return 4 * (r * th + r * (th // 32) + r + NUM_STREAMS)  # per-thread partials, group sums, totals, pre


MHC_PRE_SPACE = Space(
    params={"threads": (32, 64, 128, 256, 512, 1024)},
    constraints=(_pre_threads_fit,),
    smem_bytes=_pre_smem,
    heuristic=lambda p: {"threads": _default_threads(p["dim"])},
)


def _mhc_pre_bucket(problem: Mapping[str, Any]) -> str:
    return f"{'head' if problem['head'] else 'pre'},dim={problem['dim']}"


def _mhc_pre_case(problem: Mapping[str, Any], n: int, gen: torch.Generator, device: str,
                  reference: bool) -> TuningCase:
    """Random streams and mHC parameters at the scales of tests/test_mhc_gpu.py; the reference on the CPU."""
    from tilev4.reference import mhc as R
    from tilev4.reference.norm import rmsnorm

    dim, head, n_s = problem["dim"], problem["head"], NUM_STREAMS
    m, n_scale = (HEAD_MIX_WIDTH, 1) if head else (MIX_WIDTH, 3)
    g = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    h = (torch.randn(n, n_s * dim, generator=g, device=device) * 2 + 0.3).to(_DTYPES[problem["h_dtype"]])
    fn = torch.randn(m, n_s * dim, generator=g, device=device) * (n_s * dim) ** -0.5
    base = torch.randn(m, generator=g, device=device) * 0.5
    scale = torch.rand(n_scale, generator=g, device=device) * 0.9 + 0.1
    w = torch.randn(dim, generator=g, device=device) * 0.2 + 1
    x = torch.empty(n, dim, device=device, dtype=_DTYPES[problem["x_dtype"]])
    mix = torch.empty(n, m, device=device)
    outs: tuple[torch.Tensor, ...] = (x, mix)
    if not head:
        outs += (torch.empty(n, n_s, device=device), torch.empty(n, n_s * n_s, device=device))
    expected = None
    if reference:
        eps, norm_eps = problem["eps"], problem["norm_eps"]
        hc, fnc, basec, scalec, wc = (t.cpu() for t in (h, fn, base, scale, w))
        h4 = hc.view(1, n, n_s, dim)
        mix_ref = R.mhc_mix(h4, fnc, eps)  # [1, n, M]
        if head:
            pre = torch.sigmoid(mix_ref * scalec[0] + basec) + eps
            x_ref = rmsnorm((pre.unsqueeze(-1) * h4.float()).sum(-2), wc, norm_eps)
            refs: tuple[torch.Tensor, ...] = (x_ref[0], mix_ref[0])
        else:
            x_ref, post_ref, comb_ref = R.mhc_pre(h4, fnc, basec, scalec, wc, problem["iters"], eps, norm_eps)
            refs = (x_ref[0], mix_ref[0], post_ref[0], comb_ref[0].reshape(n, n_s * n_s))
        expected = tuple(t.to(device) for t in refs)
    args = (h, fn, base, scale, w, *outs)
    return TuningCase(args, outputs=tuple(range(5, len(args))), expected=expected, rows=n)


def _excess(got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> float:
    """How far ``|got - ref|`` exceeds ``atol + rtol·|ref|`` at worst (> 0: out of tolerance), as ``assert_close``."""
    got, ref = got.float(), ref.float()
    return ((got - ref).abs() - (atol + rtol * ref.abs())).max().item()


def _mhc_pre_check(outputs: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> str | None:
    """The tolerances of tests/test_mhc_gpu.py (see the module docstring): mix 1e-5 relative + 1e-5 of its
    rms, post / comb 2e-5 absolute, x 1e-4 relative + 1e-4 of its rms (one bf16 rounding more: 2^-7)."""
    for name, t in zip(("x", "mix", "post", "comb"), outputs):
        if torch.isnan(t).any():
            return f"NaN in {name}"
    rms = [float(e.float().square().mean().sqrt()) for e in expected[:2]]
    x_rtol = 2.0**-7 if outputs[0].dtype == torch.bfloat16 else 1e-4
    tolerances = [(x_rtol, 1e-4 * rms[0] + 1e-30), (1e-5, 1e-5 * rms[1] + 1e-30), (0.0, 2e-5), (0.0, 2e-5)]
    for name, got, ref, (rtol, atol) in zip(("x", "mix", "post", "comb"), outputs, expected, tolerances):
        excess = _excess(got, ref, rtol, atol)
        if excess > 0:
            return f"{name} exceeds its tolerance by {excess:.3g}"
    return None


def _mhc_pre_slice(case: TuningCase, start: int, stop: int) -> TuningCase:
    h, fn, base, scale, w, *outs = case.args
    args = (h[start:stop].contiguous(), fn, base, scale, w, *(torch.empty_like(t[start:stop]) for t in outs))
    return TuningCase(args, outputs=case.outputs, expected=None, rows=stop - start)


@register(
    "mhc_pre",
    configs=[{"dim": 4096}, {"dim": 1024}, {"dim": 256}, {"dim": 1024, "head": True}, {"dim": 256, "head": True}],
    tags=("mhc", "batch_invariant"),
    space=MHC_PRE_SPACE,
    bucket=_mhc_pre_bucket,
    harness=TuningHarness(_mhc_pre_case, _mhc_pre_check, sizes=(64, 4096), batch_slice=_mhc_pre_slice),
)
def build_mhc_pre(dim: int, head: bool = False, h_dtype: str = "float32", x_dtype: str = "float32",
                  iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6, threads: int = 0):
    """mHC pre: mix GEMV, pre/post/comb (Sinkhorn) and rmsnorm(Σ pre_i·h_i), one CTA per token.

    ``threads`` (tunable; 0: the default for ``dim``) must be a multiple of 32 that divides ``dim``.
    """
    if h_dtype not in _DTYPES or x_dtype not in _DTYPES:
        raise ValueError(f"h_dtype / x_dtype must be one of {sorted(_DTYPES)}, got {h_dtype!r} / {x_dtype!r}")
    TH = threads or _default_threads(dim)
    n = NUM_STREAMS
    K = n * dim
    M = HEAD_MIX_WIDTH if head else MIX_WIDTH
    if TH % 32 or K % TH or dim % TH or (M + 1) * (TH // 32) > TH:
        raise ValueError(f"dim={dim}: threads (got {TH}) must be a multiple of 32 that divides dim")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    EPT = K // TH  # flat elements per thread
    DPT = dim // TH  # hidden indices per thread in the collapse
    G = TH // 32  # reduction groups of 32 consecutive threads
    R = M + 1  # reduced quantities: M dot products and Σ h²
    N = T.dynamic("N")
    h_t = T.float32 if h_dtype == "float32" else T.bfloat16
    x_t = T.float32 if x_dtype == "float32" else T.bfloat16

    @T.macro
    def reduce_rows(part_shared, grp_shared, tot_shared, rows, tx):
        """tot[r] = Σ_g (Σ_{t in group g} part[r, t]): 32 consecutive threads, then the groups, in order."""
        if tx < rows * G:
            r = tx // G
            g = tx % G
            s = T.alloc_var(T.float32)
            s = 0.0
            for j in T.serial(32):
                s = s + part_shared[r, g * 32 + j]
            grp_shared[r, g] = s
        T.sync_threads()
        if tx < rows:
            s2 = T.alloc_var(T.float32)
            s2 = 0.0
            for g2 in T.serial(G):
                s2 = s2 + grp_shared[tx, g2]
            tot_shared[tx] = s2
        T.sync_threads()

    @T.macro
    def body(h, fn, base, scale, norm_weight, x, mix, post, comb):
        with T.Kernel(N, threads=TH) as t:
            tx = T.get_thread_binding()
            part_shared = T.alloc_shared((R, TH), T.float32)
            grp_shared = T.alloc_shared((R, G), T.float32)
            tot_shared = T.alloc_shared((R,), T.float32)
            pre_shared = T.alloc_shared((n,), T.float32)
            acc = T.alloc_local((R,), T.float32)
            hv = T.alloc_local((EPT,), T.float32)
            xv = T.alloc_local((DPT,), T.float32)
            for m in T.unroll(R):
                acc[m] = 0.0
            for i in T.unroll(EPT):
                hv[i] = T.cast(h[t, i * TH + tx], T.float32)
            # mix partials: acc[m] = Σ_i h[i·TH + tx] · fn[m, i·TH + tx]; acc[M] = Σ_i h²
            for i in T.unroll(EPT):
                acc[M] = acc[M] + hv[i] * hv[i]
                for m in T.unroll(M):
                    acc[m] = acc[m] + hv[i] * fn[m, i * TH + tx]
            for m in T.unroll(R):
                part_shared[m, tx] = acc[m]
            T.sync_threads()
            reduce_rows(part_shared, grp_shared, tot_shared, R, tx)
            if tx == 0:
                rinv = T.alloc_var(T.float32)
                rinv = T.rsqrt(tot_shared[M] / K + eps)  # rsqrt(mean(flat(h)²) + eps)
                mv = T.alloc_local((M,), T.float32)
                for m in T.unroll(M):
                    mv[m] = tot_shared[m] * rinv  # mix = (flat(h) @ fnᵀ) · rsqrt(...)
                    mix[t, m] = mv[m]
                for i in T.unroll(n):  # pre = sigmoid(mix·scale0 + base) + eps
                    pre_shared[i] = 1.0 / (1.0 + T.exp(-(mv[i] * scale[0] + base[i]))) + eps
                if not head:
                    for i in T.unroll(n):  # post = 2·sigmoid(mix·scale1 + base)
                        post[t, i] = 2.0 / (1.0 + T.exp(-(mv[n + i] * scale[1] + base[n + i])))
                    c = T.alloc_local((n * n,), T.float32)
                    rs = T.alloc_local((n,), T.float32)
                    mx = T.alloc_var(T.float32)
                    for e in T.unroll(n * n):
                        c[e] = mv[2 * n + e] * scale[2] + base[2 * n + e]  # comb logits, row j = e // 4
                    for j in T.unroll(n):  # softmax over k, + eps
                        mx = T.max(T.max(c[j * n], c[j * n + 1]), T.max(c[j * n + 2], c[j * n + 3]))
                        for k in T.unroll(n):
                            c[j * n + k] = T.exp(c[j * n + k] - mx)
                        rs[j] = 1.0 / (((c[j * n] + c[j * n + 1]) + c[j * n + 2]) + c[j * n + 3])
                        for k in T.unroll(n):
                            c[j * n + k] = c[j * n + k] * rs[j] + eps
                    for k in T.unroll(n):  # comb /= column sum + eps
                        rs[k] = 1.0 / ((((c[k] + c[n + k]) + c[2 * n + k]) + c[3 * n + k]) + eps)
                    for e in T.unroll(n * n):
                        c[e] = c[e] * rs[e % n]
                    for _ in T.serial(iters - 1):
                        for j in T.unroll(n):  # comb /= row sum + eps
                            rs[j] = 1.0 / ((((c[j * n] + c[j * n + 1]) + c[j * n + 2]) + c[j * n + 3]) + eps)
                        for e in T.unroll(n * n):
                            c[e] = c[e] * rs[e // n]
                        for k in T.unroll(n):  # comb /= column sum + eps
                            rs[k] = 1.0 / ((((c[k] + c[n + k]) + c[2 * n + k]) + c[3 * n + k]) + eps)
                        for e in T.unroll(n * n):
                            c[e] = c[e] * rs[e % n]
                    for e in T.unroll(n * n):
                        comb[t, e] = c[e]
            T.sync_threads()
            # collapse: x_d = Σ_i pre_i·h[i, d]; Σ x² for the rmsnorm
            acc[0] = 0.0
            for q in T.unroll(DPT):
                d = q * TH + tx
                xv[q] = (((pre_shared[0] * T.cast(h[t, d], T.float32)
                           + pre_shared[1] * T.cast(h[t, dim + d], T.float32))
                          + pre_shared[2] * T.cast(h[t, 2 * dim + d], T.float32))
                         + pre_shared[3] * T.cast(h[t, 3 * dim + d], T.float32))
                acc[0] = acc[0] + xv[q] * xv[q]
            part_shared[0, tx] = acc[0]
            T.sync_threads()
            reduce_rows(part_shared, grp_shared, tot_shared, 1, tx)
            for q in T.unroll(DPT):
                d = q * TH + tx
                x[t, d] = T.cast(xv[q] * T.rsqrt(tot_shared[0] / dim + norm_eps) * norm_weight[d], x_t)

    if head:

        @T.prim_func
        def mhc_head_pre_kernel(
            h: T.Tensor[(N, K), h_t],
            fn: T.Tensor[(M, K), T.float32],
            base: T.Tensor[(M,), T.float32],
            scale: T.Tensor[(1,), T.float32],
            norm_weight: T.Tensor[(dim,), T.float32],
            x: T.Tensor[(N, dim), x_t],
            mix: T.Tensor[(N, M), T.float32],
        ):
            body(h, fn, base, scale, norm_weight, x, mix, None, None)

        return mhc_head_pre_kernel

    @T.prim_func
    def mhc_pre_kernel(
        h: T.Tensor[(N, K), h_t],
        fn: T.Tensor[(M, K), T.float32],
        base: T.Tensor[(M,), T.float32],
        scale: T.Tensor[(3,), T.float32],
        norm_weight: T.Tensor[(dim,), T.float32],
        x: T.Tensor[(N, dim), x_t],
        mix: T.Tensor[(N, M), T.float32],
        post: T.Tensor[(N, n), T.float32],
        comb: T.Tensor[(N, n * n), T.float32],
    ):
        body(h, fn, base, scale, norm_weight, x, mix, post, comb)

    return mhc_pre_kernel


MHC_POST_SPACE = Space(params={"block_d": (64, 128, 256, 512)})  # elementwise: any block is exact


def _mhc_post_bucket(problem) -> str:
    return "dim<=1024" if problem["dim"] <= 1024 else "dim>1024"


def _mhc_post_case(problem, n: int, gen: torch.Generator, device: str, reference: bool) -> TuningCase:
    from tilev4.reference import mhc as R

    dim, n_s = problem["dim"], NUM_STREAMS
    g = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    h = torch.randn(n, n_s, dim, generator=g, device=device).to(_DTYPES[problem["h_dtype"]])
    f = torch.randn(n, dim, generator=g, device=device).to(_DTYPES[problem["f_dtype"]])
    post = 2 * torch.rand(n, n_s, generator=g, device=device)  # 2·sigmoid(·) is in (0, 2)
    comb = torch.rand(n, n_s * n_s, generator=g, device=device)
    out = torch.empty(n, n_s, dim, device=device, dtype=_DTYPES[problem["out_dtype"]])
    expected = None
    if reference:
        ref = R.mhc_post(h.cpu()[None], f.cpu()[None], post.cpu()[None], comb.cpu().view(1, n, n_s, n_s))[0]
        expected = (ref.to(device),)
    return TuningCase((h, f, post, comb, out), outputs=(4,), expected=expected, rows=n)


def _mhc_post_check(outputs, expected) -> str | None:
    y, ref = outputs[0].float(), expected[0].float()
    if torch.isnan(y).any():
        return "NaN in the output"
    # the reference's fp32 products summed over j in the same order; an fp32 (or one bf16) rounding apart
    rel = 2.0**-8 if outputs[0].dtype == torch.bfloat16 else 1e-5
    excess = ((y - ref).abs() - (rel * ref.abs() + 1e-5)).max().item()
    return f"|h' - ref| exceeds the tolerance by {excess:.3g}" if excess > 0 else None


def _mhc_post_slice(case: TuningCase, start: int, stop: int) -> TuningCase:
    h, f, post, comb, out = case.args
    sub = tuple(t[start:stop].contiguous() for t in (h, f, post, comb))
    return TuningCase((*sub, torch.empty_like(out[start:stop])), outputs=(4,), expected=None, rows=stop - start)


@register(
    "mhc_post",
    configs=[{"dim": 4096}, {"dim": 1024}, {"dim": 256}],
    tags=("mhc", "batch_invariant"),
    space=MHC_POST_SPACE,
    bucket=_mhc_post_bucket,
    harness=TuningHarness(_mhc_post_case, _mhc_post_check, sizes=(64, 16384), batch_slice=_mhc_post_slice),
)
def build_mhc_post(dim: int, h_dtype: str = "float32", f_dtype: str = "float32", out_dtype: str = "float32",
                   block_d: int = 128):
    """mHC post: h'_k = post_k·f + Σ_j comb[j,k]·h_j (fixed order), one thread per hidden index."""
    for name, v in (("h_dtype", h_dtype), ("f_dtype", f_dtype), ("out_dtype", out_dtype)):
        if v not in _DTYPES:
            raise ValueError(f"{name} must be one of {sorted(_DTYPES)}, got {v!r}")
    n = NUM_STREAMS
    N = T.dynamic("N")
    h_t = T.float32 if h_dtype == "float32" else T.bfloat16
    f_t = T.float32 if f_dtype == "float32" else T.bfloat16
    o_t = T.float32 if out_dtype == "float32" else T.bfloat16

    @T.prim_func
    def mhc_post_kernel(
        h: T.Tensor[(N, n, dim), h_t],
        f: T.Tensor[(N, dim), f_t],
        post: T.Tensor[(N, n), T.float32],
        comb: T.Tensor[(N, n * n), T.float32],
        out: T.Tensor[(N, n, dim), o_t],
    ):
        with T.Kernel(N, T.ceildiv(dim, block_d), threads=block_d) as (t, bd):
            tx = T.get_thread_binding()
            c = T.alloc_local((n * n,), T.float32)
            p = T.alloc_local((n,), T.float32)
            hv = T.alloc_local((n,), T.float32)
            for e in T.unroll(n * n):
                c[e] = comb[t, e]
            for k in T.unroll(n):
                p[k] = post[t, k]
            d = bd * block_d + tx
            if d < dim:
                fv = T.alloc_var(T.float32)
                fv = T.cast(f[t, d], T.float32)
                for j in T.unroll(n):
                    hv[j] = T.cast(h[t, j, d], T.float32)
                for k in T.unroll(n):  # h'_k = post_k·f + (((c0k·h0 + c1k·h1) + c2k·h2) + c3k·h3)
                    out[t, k, d] = T.cast(
                        p[k] * fv + (((c[k] * hv[0] + c[n + k] * hv[1]) + c[2 * n + k] * hv[2]) + c[3 * n + k] * hv[3]),
                        o_t)

    return mhc_post_kernel


# ------------------------------------------------------------------------------------------------ public ops

_POISON_OUTPUTS = False  # tests set it: outputs start as NaN, so that an element the kernel misses shows


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if _POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)


def _dtype_key(name: str, t: torch.Tensor) -> str:
    for k, v in _DTYPES.items():
        if t.dtype == v:
            return k
    raise TypeError(f"{name} must be float32 or bfloat16, got {t.dtype}")


def _check_h(h: object) -> torch.Tensor:
    check_tensor("h", h, dtype=(torch.float32, torch.bfloat16), ndim=4, contiguous=True)
    check_tensor("h", h, shape=(None, None, NUM_STREAMS, None))
    if h.device.type != "cuda":
        raise ValueError(f"h must be a CUDA tensor, got device {h.device}")
    dim = h.shape[-1]
    threads = _default_threads(dim)
    if dim % threads:
        raise ValueError(f"h: dim={dim} must be a multiple of {threads} for the mHC kernels")
    return h


def _pre_common(h, fn, base, scale, norm_weight, m, n_scale, out_dtype):
    _check_h(h)
    b, s, n, dim = h.shape
    dev = h.device
    check_tensor("fn", fn, dtype=torch.float32, shape=(m, n * dim), contiguous=True, device=dev)
    check_tensor("base", base, dtype=torch.float32, shape=(m,), contiguous=True, device=dev)
    check_tensor("scale", scale, dtype=torch.float32, shape=(n_scale,), contiguous=True, device=dev)
    check_tensor("norm_weight", norm_weight, dtype=torch.float32, shape=(dim,), contiguous=True, device=dev)
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    check_same_device(h=h, fn=fn)
    x = _empty(b, s, dim, dtype=out_dtype, device=dev)
    mix = _empty(b, s, m, dtype=torch.float32, device=dev)
    return b, s, dim, x, mix


def mhc_pre(
    h: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    norm_weight: torch.Tensor,
    iters: int = 20,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
    *,
    out_dtype: torch.dtype = torch.float32,
    return_mix: bool = False,
) -> tuple[torch.Tensor, ...]:
    """mHC before a sub-layer: collapse the 4 streams into its input, and its post / comb coefficients.

    Args:
        h: [b, s, 4, dim] fp32 or bf16 residual streams, contiguous, CUDA (dim a multiple of 128, or of 256
            above 1024).
        fn: fp32 [24, 4·dim]; base: fp32 [24]; scale: fp32 [3] — the sub-layer's mHC parameters.
        norm_weight: fp32 [dim], the sub-layer's input rmsnorm weight.
        iters: Sinkhorn iterations (>= 1); eps: the mHC epsilon; norm_eps: the rmsnorm epsilon.
        out_dtype: dtype of ``x`` (fp32 or bf16).
        return_mix: also return ``mix`` fp32 [b, s, 24].

    Returns:
        ``(x, post, comb)`` (``+ (mix,)``): x [b, s, dim] ``rmsnorm(Σ_i pre_i·h_i)``, post fp32 [b, s, 4],
        comb fp32 [b, s, 4, 4] (row j = source stream, column k = target), as
        :func:`tilev4.reference.mhc_pre` (see the module docstring for the tolerance). Batch-invariant.
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    b, s, dim, x, mix = _pre_common(h, fn, base, scale, norm_weight, MIX_WIDTH, 3, out_dtype)
    post = _empty(b, s, NUM_STREAMS, dtype=torch.float32, device=h.device)
    comb = _empty(b, s, NUM_STREAMS, NUM_STREAMS, dtype=torch.float32, device=h.device)
    if b * s:
        kernel = compile_kernel("mhc_pre", {
            "dim": dim, "h_dtype": _dtype_key("h", h), "x_dtype": _dtype_key("out_dtype", x), "iters": iters,
            "eps": float(eps), "norm_eps": float(norm_eps)})
        kernel(h.view(b * s, -1), fn, base, scale, norm_weight, x.view(b * s, dim), mix.view(b * s, -1),
               post.view(b * s, -1), comb.view(b * s, -1))
    return (x, post, comb, mix) if return_mix else (x, post, comb)


def mhc_head_pre(
    h: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
    *,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The head's collapse and final norm: ``rmsnorm(Σ_i pre_i·h_i)`` with ``pre = sigmoid(mix·scale + base) + eps``.

    Args:
        h: [b, s, 4, dim] fp32 / bf16, contiguous, CUDA. fn: fp32 [4, 4·dim]; base: fp32 [4]; scale: fp32 [1].
        norm_weight: fp32 [dim] final rmsnorm weight. eps, norm_eps, out_dtype: as :func:`mhc_pre`.

    Returns:
        x [b, s, dim], for every position (the vocabulary projection ``x @ head_weightᵀ`` is left to the
        caller; :func:`tilev4.reference.mhc_head` takes the last position). Batch-invariant.
    """
    b, s, dim, x, mix = _pre_common(h, fn, base, scale, norm_weight, HEAD_MIX_WIDTH, 1, out_dtype)
    if b * s:
        kernel = compile_kernel("mhc_pre", {
            "dim": dim, "head": True, "h_dtype": _dtype_key("h", h), "x_dtype": _dtype_key("out_dtype", x),
            "eps": float(eps), "norm_eps": float(norm_eps)})
        kernel(h.view(b * s, -1), fn, base, scale, norm_weight, x.view(b * s, dim), mix.view(b * s, -1))
    return x


def mhc_post(
    h: torch.Tensor, f_out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, *,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """mHC after a sub-layer: ``h'_k = post_k·f_out + Σ_j comb[j, k]·h_j``.

    Args:
        h: [b, s, 4, dim] fp32 / bf16, contiguous, CUDA (the sub-layer's input state).
        f_out: [b, s, dim] fp32 / bf16 sub-layer output. post: fp32 [b, s, 4]; comb: fp32 [b, s, 4, 4]
            (from :func:`mhc_pre`).
        out_dtype: fp32 (default) or bf16.

    Returns:
        [b, s, 4, dim] ``out_dtype``, as :func:`tilev4.reference.mhc_post` (fp32: the same products,
        summed over j in increasing order). Batch-invariant.
    """
    _check_h(h)
    b, s, n, dim = h.shape
    dev = h.device
    check_tensor("f_out", f_out, dtype=(torch.float32, torch.bfloat16), shape=(b, s, dim), contiguous=True,
                 device=dev)
    check_tensor("post", post, dtype=torch.float32, shape=(b, s, n), contiguous=True, device=dev)
    check_tensor("comb", comb, dtype=torch.float32, shape=(b, s, n, n), contiguous=True, device=dev)
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    out = _empty(b, s, n, dim, dtype=out_dtype, device=dev)
    if b * s:
        kernel = compile_kernel("mhc_post", {"dim": dim, "h_dtype": _dtype_key("h", h),
                                             "f_dtype": _dtype_key("f_out", f_out),
                                             "out_dtype": _dtype_key("out_dtype", out)})
        kernel(h.view(b * s, n, dim), f_out.view(b * s, dim), post.view(b * s, n), comb.view(b * s, n * n),
               out.view(b * s, n, dim))
    return out
