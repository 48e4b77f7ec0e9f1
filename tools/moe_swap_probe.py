"""Probe: the bf16 up-projection with the operands swapped for whole experts — tokens as the wgmma's N.

The shipped expert GEMMs run an expert's rows as 64-row slabs (the wgmma's M), so an expert of R rows computes
``64·⌈R/64⌉`` rows; on balanced routings the time follows the slab count, not R (``tools/moe_skew.py
--balanced-rows``), and a natural routing pays ~17 % of padding rows. With ``hᵀ = silu(W1 xᵀ) · (W3 xᵀ)`` the weight
rows are the M (64 a consumer) and the expert's rows the N, which only has to be a multiple of 8: an expert of R rows
costs ``N = ⌈R/16⌉·16`` of them.

This probe builds that program for one N (a CTA: one expert, 128 features of W1 and of W3, two consumer warpgroups of
64 features each, a TMA producer warpgroup; the output staged transposed in the stages' token buffers) and runs it
against the shipped up-projection (:func:`tilev4.kernels.moe.moe_up`, the default table) on balanced routings (every
expert exactly R rows, :func:`tilev4.bench.moe.balanced_routing`): h's rows compared bit for bit, then both timed
in turn (CUDA-graph replays, L2 flushed, the order reversed every other round). An expert with more than N rows is
not handled (the probe checks the routing). Not a shipped kernel.

    python3 tools/moe_swap_probe.py --rows 150,171,192 --build-only --arch sm_90a    # no GPU: compile
    python3 tools/moe_swap_probe.py --rows 150,171,192 --json $OUT/moe_swap_probe.json
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # moe_ab, a sibling script (tools/ is not a package)

HALF = 64  # features of one consumer warpgroup (the wgmma's M)


def swap_n(rows: int) -> int:
    """The wgmma N of an expert of ``rows`` rows: rows rounded up to 16."""
    return -(-rows // 16) * 16


def _consumer_macro(KT: int, S: int, epilogue: str = "staged") -> Any:
    """Consumer ``w`` of both programs: ``KT`` K steps of ``hᵀ``'s gate and up products for its 64 features and the
    tile's ``nb`` rows (the wgmma's N) from ``S`` stages, then the epilogue: SwiGLU with the clamp and the routing
    weight (``moe_ws``'s helpers: the shipped up-projection's arithmetic), staged transposed in its token buffer (both
    consumers are past their last wgmma), 16-byte stores of the tile's rows (``epilogue="staged"``). Ablations:
    ``"none"``, the K loop alone (one value a thread stored, so that nothing is dead code); ``"direct"``, the epilogue
    without the staging (each value stored from its register to global memory)."""
    import tilelang.language as T

    from tilev4.kernels.moe_ws import cap_keep_nan, clamp_keep_nan, silu

    @T.macro
    def consumer(w, nb, wts, h, limit, x_s, g_s, u_s, w_s, acc_g, acc_u, full, empty, r0, rows, f0, tx):
        prev = T.alloc_var(T.int32, init=0)
        for ki in T.serial(KT):
            slot = ki % S
            T.barrier_wait(full[slot], (ki // S) & 1)
            T.wgmma_gemm(g_s[slot, w * HALF:(w + 1) * HALF, :], x_s[slot, 0:nb, :], acc_g, transpose_B=True,
                         clear_accum=ki == 0)
            T.wgmma_gemm(u_s[slot, w * HALF:(w + 1) * HALF, :], x_s[slot, 0:nb, :], acc_u, transpose_B=True,
                         clear_accum=ki == 0)
            if ki > 0:
                T.wait_wgmma(2)
                if tx % 32 == 0:
                    T.barrier_arrive(empty[prev])
            prev = slot
        T.wait_wgmma(0)
        if epilogue == "none":
            for m, n in T.Parallel(HALF, nb):
                if m == 0 and n == 0:
                    h[r0, f0 + w * HALF] = T.cast(acc_g[m, n] + acc_u[m, n], T.bfloat16)
        elif epilogue == "direct":  # (an ablation: no staging, each value stored from its register)
            for n in T.Parallel(nb):
                w_s[n] = T.if_then_else(n < rows, wts[r0 + n], 0.0)
            T.sync_threads(barrier_id=2 + w, arrive_count=128)
            for m, n in T.Parallel(HALF, nb):
                if n < rows:
                    h[r0 + n, f0 + w * HALF + m] = T.cast(
                        silu(cap_keep_nan(acc_g[m, n], limit)) * clamp_keep_nan(acc_u[m, n], limit) * w_s[n],
                        T.bfloat16)
        else:
            for n in T.Parallel(nb):  # the tile's routing weights (0 past its rows), once
                w_s[n] = T.if_then_else(n < rows, wts[r0 + n], 0.0)
            T.sync_threads(barrier_id=1, arrive_count=256)  # both consumers are past their last read of the stages
            for m, n in T.Parallel(HALF, nb):  # hᵀ of this consumer's 64 features, staged as rows
                g = cap_keep_nan(acc_g[m, n], limit)
                u = clamp_keep_nan(acc_u[m, n], limit)
                x_s[w, n, m] = T.cast(silu(g) * u * w_s[n], T.bfloat16)
            T.sync_threads(barrier_id=2 + w, arrive_count=128)
            T.assume(h.shape[1] % 8 == 0)  # F: whole 16-byte vectors
            T.assume(f0 % 8 == 0)
            for n, mv in T.Parallel(nb, HALF // 8):
                if n < rows:
                    for v in T.vectorized(8):
                        h[r0 + n, f0 + w * HALF + mv * 8 + v] = x_s[w, n, mv * 8 + v]

    return consumer


def build_swap_up(K: int, N: int, block_k: int = 64, stages: int = 4, epilogue: str = "staged") -> Any:
    """The "rows" program: one CTA an expert and 128 features, N fixed (every expert at most N rows)."""
    import tilelang.language as T
    from tilelang.layout import make_swizzled_layout

    from tilev4._fastmath import FAST_SOURCE

    BF, BK, S = 2 * HALF, block_k, stages
    KT = K // BK
    NR, F, E = T.dynamic("NR"), T.dynamic("F"), T.dynamic("E")
    consumer = _consumer_macro(KT, S, epilogue)

    @T.prim_func
    def moe_up_swap(
        x: T.Tensor[(NR, K), T.bfloat16],
        wts: T.Tensor[(NR,), T.float32],
        w1: T.Tensor[(E, F, K), T.bfloat16],
        w3: T.Tensor[(E, F, K), T.bfloat16],
        offsets: T.Tensor[(E + 1,), T.int32],
        h: T.Tensor[(NR, F), T.bfloat16],
        limit: T.float32,
    ):
        with T.Kernel(E * T.ceildiv(F, BF), threads=384) as bx:
            T.import_source(FAST_SOURCE)
            T.annotate_pass_configs({"tl.disable_thread_storage_sync": True})  # every sync is written out
            x_s = T.alloc_shared((S, N, BK), T.bfloat16)
            g_s = T.alloc_shared((S, BF, BK), T.bfloat16)
            u_s = T.alloc_shared((S, BF, BK), T.bfloat16)
            acc_g0 = T.alloc_fragment((HALF, N), T.float32)
            acc_u0 = T.alloc_fragment((HALF, N), T.float32)
            acc_g1 = T.alloc_fragment((HALF, N), T.float32)
            acc_u1 = T.alloc_fragment((HALF, N), T.float32)
            w0_s = T.alloc_shared((N,), T.float32)
            w1_s = T.alloc_shared((N,), T.float32)
            full = T.alloc_barrier([128] * S)
            empty = T.alloc_barrier([8] * S)  # lane 0 of each consumer warp
            T.annotate_layout({b: make_swizzled_layout(b) for b in (x_s, g_s, u_s)})
            nfb = T.ceildiv(F, BF)
            e = bx // nfb
            f0 = T.alloc_var(T.int32, init=(bx % nfb) * BF)  # (variables: computed once, not in every store)
            r0 = T.alloc_var(T.int32, init=offsets[e])
            rows = T.alloc_var(T.int32, init=offsets[e + 1] - offsets[e])
            tx = T.get_thread_binding()
            if rows > 0:
                if tx >= 256:
                    T.set_max_nreg(40, 0)
                    for ki in T.serial(KT):
                        slot = ki % S
                        T.barrier_wait(empty[slot], ((ki // S) & 1) ^ 1)
                        T.tma_copy(x[r0:r0 + N, ki * BK:(ki + 1) * BK], x_s[slot, :, :], barrier=full[slot])
                        T.tma_copy(w1[e, f0:f0 + BF, ki * BK:(ki + 1) * BK], g_s[slot, :, :], barrier=full[slot])
                        T.tma_copy(w3[e, f0:f0 + BF, ki * BK:(ki + 1) * BK], u_s[slot, :, :], barrier=full[slot])
                        T.barrier_arrive(full[slot])
                elif tx < 128:
                    T.set_max_nreg(232, 1)
                    consumer(0, N, wts, h, limit, x_s, g_s, u_s, w0_s, acc_g0, acc_u0, full, empty, r0, rows, f0, tx)
                else:
                    T.set_max_nreg(232, 1)
                    consumer(1, N, wts, h, limit, x_s, g_s, u_s, w1_s, acc_g1, acc_u1, full, empty, r0, rows, f0, tx)

    return moe_up_swap


def build_swap_up_table(K: int, step: int = 32, block_k: int = 64, stages: int = 4) -> Any:
    """The probe's program on the 192-row tile table of :func:`tilev4.kernels.moe.moe_permute` (same arguments as
    the shipped ``moe_up`` ws program): a CTA takes one M tile (up to 192 rows of one expert) and 128 features; its
    rows, rounded up to ``step``, are the wgmma's N — one code path per multiple of ``step`` up to 192."""
    import tilelang.language as T
    from tilelang.layout import make_swizzled_layout

    from tilev4._fastmath import FAST_SOURCE
    from tilev4.kernels.moe_ws import _grouped_record

    BF, BK, S, NMAX = 2 * HALF, block_k, stages, 192
    KT = K // BK
    BUCKETS = list(range(step, NMAX + 1, step))
    NR, F, E, MT = T.dynamic("NR"), T.dynamic("F"), T.dynamic("E"), T.dynamic("MT")
    consumer = _consumer_macro(KT, S)

    @T.prim_func
    def moe_up_swap_table(
        x: T.Tensor[(NR, K), T.bfloat16],
        wts: T.Tensor[(NR,), T.float32],
        w1: T.Tensor[(E, F, K), T.bfloat16],
        w3: T.Tensor[(E, F, K), T.bfloat16],
        offsets: T.Tensor[(E + 1,), T.int32],
        tile_offsets: T.Tensor[(E + 1,), T.int32],
        tile_info: T.Tensor[(MT, 4), T.int32],
        h: T.Tensor[(NR, F), T.bfloat16],
        limit: T.float32,
    ):
        with T.Kernel(MT * T.ceildiv(F, BF), threads=384) as bx:
            T.import_source(FAST_SOURCE)
            T.annotate_pass_configs({"tl.disable_thread_storage_sync": True})
            x_s = T.alloc_shared((S, NMAX, BK), T.bfloat16)
            g_s = T.alloc_shared((S, BF, BK), T.bfloat16)
            u_s = T.alloc_shared((S, BF, BK), T.bfloat16)
            accs = [[T.alloc_fragment((HALF, nb), T.float32) for _ in range(4)] for nb in BUCKETS]
            w0_s = T.alloc_shared((NMAX,), T.float32)
            w1_s = T.alloc_shared((NMAX,), T.float32)
            full = T.alloc_barrier([128] * S)
            empty = T.alloc_barrier([8] * S)
            T.annotate_layout({b: make_swizzled_layout(b) for b in (x_s, g_s, u_s)})
            e = T.alloc_var(T.int32, init=0)
            row0 = T.alloc_var(T.int32, init=0)
            rows = T.alloc_var(T.int32, init=0)
            f0 = T.alloc_var(T.int32, init=0)
            live = T.alloc_var(T.bool)
            _grouped_record(bx, T.ceildiv(F, BF), tile_info, e, row0, rows, f0, live, BF, NMAX)
            tx = T.get_thread_binding()
            bucket = T.ceildiv(rows, step)
            if live:
                if tx >= 256:
                    T.set_max_nreg(40, 0)
                    for ki in T.serial(KT):
                        slot = ki % S
                        T.barrier_wait(empty[slot], ((ki // S) & 1) ^ 1)
                        for i, nb in enumerate(BUCKETS):
                            if bucket == i + 1:
                                T.tma_copy(x[row0:row0 + nb, ki * BK:(ki + 1) * BK], x_s[slot, 0:nb, :],
                                           barrier=full[slot])
                        T.tma_copy(w1[e, f0:f0 + BF, ki * BK:(ki + 1) * BK], g_s[slot, :, :], barrier=full[slot])
                        T.tma_copy(w3[e, f0:f0 + BF, ki * BK:(ki + 1) * BK], u_s[slot, :, :], barrier=full[slot])
                        T.barrier_arrive(full[slot])
                elif tx < 128:
                    T.set_max_nreg(232, 1)
                    for i, nb in enumerate(BUCKETS):
                        if bucket == i + 1:
                            consumer(0, nb, wts, h, limit, x_s, g_s, u_s, w0_s, accs[i][0], accs[i][1], full, empty,
                                     row0, rows, f0, tx)
                else:
                    T.set_max_nreg(232, 1)
                    for i, nb in enumerate(BUCKETS):
                        if bucket == i + 1:
                            consumer(1, nb, wts, h, limit, x_s, g_s, u_s, w1_s, accs[i][2], accs[i][3], full, empty,
                                     row0, rows, f0, tx)

    return moe_up_swap_table


def parse_rows(text: str) -> list[int]:
    """``"150,192"`` → ``[150, 192]``: rows an expert, multiples of 3 from 3 to 192 (256 experts × R / 6 slots
    whole; one token tile of at most 192 rows an expert)."""
    try:
        rows = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--rows must be comma-separated integers, got {text!r}") from None
    if not rows or any(r < 3 or r > 192 or r % 3 for r in rows):
        raise ValueError(f"--rows must list multiples of 3 from 3 to 192, got {text!r}")
    return rows


def compile_table_program(step: int, arch: str = "sm_90a") -> Any:
    """:func:`build_swap_up_table` for the V4-Flash dim, built for ``arch``."""
    import tilelang

    from tilev4.bench.moe import DIM

    return tilelang.compile(build_swap_up_table(DIM, step), target={"kind": "cuda", "arch": arch},
                            execution_backend="tvm_ffi")


def parse_cases(text: str) -> list[tuple[str, str]]:
    """``"skewed,natural,balanced150"``: table cases — ``skewed`` (the benchmark's routing, 8192 tokens),
    ``natural`` (the same gate with a zero bias) or ``balanced<R>`` (R rows an expert, a multiple of 3) — as
    ``(name, moe_ab case)`` pairs (``skewed8192``, ``natural8192``, ``balanced<R>``): the probe runs moe_ab's
    routings."""
    from moe_ab import parse_case

    cases = [c.strip() for c in text.split(",") if c.strip()]
    out = [f"{c}8192" if c in ("skewed", "natural") else c for c in cases]
    try:
        ok = bool(out) and all(c.startswith("balanced") for c in cases if c not in ("skewed", "natural"))
        for c in out:
            parse_case(c)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"--cases must list skewed, natural or balanced<R> (R a multiple of 3), got {text!r}")
    return list(zip(cases, out))


def compile_program(rows: int, arch: str = "sm_90a", epilogue: str = "staged") -> Any:
    """The probe's program for experts of ``rows`` rows, built for ``arch`` (the H200's, also on the GPU: a cache
    filled here with ``--build-only`` is then a hit there)."""
    import tilelang

    from tilev4.bench.moe import DIM

    return tilelang.compile(build_swap_up(DIM, swap_n(rows), epilogue=epilogue), target={"kind": "cuda", "arch": arch},
                            execution_backend="tvm_ffi")


def _compare(K: Any, perm: Any, kernel: Any, args_new: tuple, w1: Any, w3: Any, rounds: int) -> dict[str, Any]:
    """The shipped up-projection on ``perm`` against the probe's ``kernel(*args_new, h, limit)``: NaN-poisoned
    outputs, bits compared, then both timed in turn (CUDA-graph replays)."""
    import torch

    from tilev4.bench import moe as bm
    from tilev4.bench import time_in_turn

    n = perm.x_sorted.shape[0]
    h_cur = torch.full((n, bm.INTER), float("nan"), device="cuda", dtype=torch.bfloat16)
    h_new = torch.full_like(h_cur, float("nan"))

    def cur() -> None:
        K.moe_up(perm, w1, w3, bm.LIMIT, out=h_cur)

    def new() -> None:
        kernel(*args_new, h_new, bm.LIMIT)

    cur()
    new()
    torch.cuda.synchronize()
    equal = bool(torch.equal(h_cur.view(torch.int16), h_new.view(torch.int16)))
    diff = (h_cur.float() - h_new.float()).abs().max().item()
    ms_cur, ms_new = time_in_turn([cur, new], rounds=rounds, graph=True)
    return {"up_block_m": perm.up_tiles[0] if perm.up_tiles else K.BLOCK_M, "ms_shipped": ms_cur, "ms_swap": ms_new,
            "ratio": ms_new / ms_cur, "bits_equal": equal, "max_abs_diff": diff,
            "has_nan": bool(torch.isnan(h_new).any())}


def _epilogue(args: Any) -> str:
    """The rows programs' epilogue from the ablation flags."""
    return "none" if args.no_epilogue else "direct" if args.direct_epilogue else "staged"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="132,150,171,192", help="rows an expert of the balanced routings")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--cases", help="the table program instead, on these routings: skewed,natural,balanced<R>")
    ap.add_argument("--step", type=int, default=32, help="the table program's N granularity (16 or 32)")
    ap.add_argument("--no-epilogue", action="store_true", help="an ablation: the rows programs without their "
                    "epilogue (wrong output, timing only)")
    ap.add_argument("--direct-epilogue", action="store_true", help="an ablation: the rows programs store each "
                    "value from its register (no staging)")
    ap.add_argument("--build-only", action="store_true", help="compile the programs (no GPU needed)")
    ap.add_argument("--arch", help="with --build-only: the arch to build for (e.g. sm_90a)")
    ap.add_argument("--json", help="write the report here too")
    args = ap.parse_args(argv)
    try:
        rows_list = parse_rows(args.rows)
        cases = parse_cases(args.cases) if args.cases else None
    except ValueError as exc:
        ap.error(str(exc))
    if args.step not in (16, 32):
        ap.error(f"--step must be 16 or 32, got {args.step}")
    if args.build_only and cases:
        compile_table_program(args.step, args.arch or "sm_90a")
        print(f"built the table program, step {args.step}")
        return 0
    if args.build_only:
        for r in sorted({swap_n(r) for r in rows_list}):
            compile_program(r, args.arch or "sm_90a", _epilogue(args))
            print(f"built N={r}")
        return 0

    import importlib

    import torch

    if not torch.cuda.is_available():
        print("moe_swap_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    from moe_ab import routing

    from tilev4.bench import moe as bm

    K = importlib.import_module("tilev4.kernels.moe")
    gen = torch.Generator(device="cuda").manual_seed(0)
    layer = bm._layer(gen)
    w1, w3 = layer["w1"], layer["w3"]
    report = []
    if cases:
        kernel = compile_table_program(args.step)
        for case, ab_case in cases:
            x, weights, experts = routing(ab_case, gen, layer)
            perm = K.moe_permute(x, weights, experts, bm.NUM_EXPERTS)  # the op's default table
            perm192 = K.moe_permute(x, weights, experts, bm.NUM_EXPERTS, up_block_m=192)
            _, tile_offsets, tile_info = K._bf16_tiles(perm192)
            args_new = (perm192.x_sorted, perm192.w_sorted, w1, w3, perm192.offsets, tile_offsets, tile_info)
            row = {"case": case, "step": args.step, "tokens": x.shape[0], **bm.routing_stats(perm.counts),
                   **_compare(K, perm, kernel, args_new, w1, w3, args.rounds)}
            print(json.dumps(row), flush=True)
            report.append(row)
    for rows in ([] if cases else rows_list):
        tokens = rows * bm.NUM_EXPERTS // bm.TOP_K
        x = torch.randn(tokens, bm.DIM, generator=gen, device="cuda").bfloat16()
        weights, experts = bm.balanced_routing(tokens, bm.NUM_EXPERTS, bm.TOP_K, gen)
        perm = K.moe_permute(x, weights, experts, bm.NUM_EXPERTS)
        assert int(perm.counts.max()) <= swap_n(rows)
        kernel = compile_program(rows, epilogue=_epilogue(args))
        args_new = (perm.x_sorted, perm.w_sorted, w1, w3, perm.offsets)
        row = {"rows_per_expert": rows, "tokens": tokens, "swap_n": swap_n(rows),
               **_compare(K, perm, kernel, args_new, w1, w3, args.rounds)}
        print(json.dumps(row), flush=True)
        report.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
