"""Where a seesaw attention CTA spends its time: per-CTA timestamps from an instrumented build of the main program.

    python3 tools/attention_timeline.py --json $OUT/attention_timeline.json          # on a GPU: all cases
    python3 tools/attention_timeline.py --case csa64 --save-raw $OUT/raw             # one case, raw stamps too
    python3 tools/attention_timeline.py --build-only --arch sm_90a                   # no GPU: lower and compile
    python3 tools/attention_timeline.py --case decode64 --split-keys 320             # the split program, 2 splits

The tool loads a copy of :mod:`tilev4.dsl.codegen` with timestamp writes added at fixed points of the seesaw
program (each insertion is anchored on a line of the current source and fails loudly when the source moved), builds
the main program of each case with the default config, and runs it once on the benchmark's inputs
(:mod:`tilev4.bench.attention`). A CTA records, into an extra ``[CTAs, 16]`` int64 argument: ``%globaltimer`` (ns)
at its start and end, its SM, and ``clock64`` (SM cycles) when it starts, when Q has landed, when its first key
block is ready, when each consumer leaves the key loop, passes the row-sum barrier, has staged its output and has
issued the output store, and when the producer starts and ends. The report gives the medians of the intervals, the
gap between consecutive CTAs on one SM, and the kernel time (CUDA-graph replays, L2 flushed) of the instrumented
build: 4-5 % above the shipped program on the H200 (stamps and their stores). The shipped program is not touched.

Cases: ``sparse64`` (index list, 512 keys), ``csa64`` / ``csa128`` (V4-Flash / V4-Pro prefill, 4096 queries),
``hca64`` (65536 queries from position 0), ``decode64`` (CSA decode, 64 sequences, ring window).

``--split-keys K`` (a multiple of 64) builds the split program instead, each CTA walking K keys of its row, and
runs it with as many splits as the case's rows need (their partials in an fp32 workspace; the combine is not run or
timed). Its CTAs write their partials from registers, so there is no staging stamp: ``stage_0`` reads 0 and
``store_0`` is the partial store (from the row-sum barrier).
"""

import argparse
import hashlib
import importlib.util
import json
import linecache
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CODEGEN = ROOT / "tilev4" / "dsl" / "codegen.py"
CASES = {"sparse64": ("sparse", 64, False), "csa64": ("csa", 64, False), "csa128": ("csa", 128, False),
         "hca64": ("hca", 64, False), "decode64": ("csa", 64, True)}
COLUMNS = ["gtime_start", "smid", "start", "q_ready", "first_block", "loop_end_0", "store_end_0", "gtime_end",
           "producer_start", "producer_end", "loop_end_1", "store_end_1", "fin_0", "fin_1", "staged_0", "staged_1"]

_TIMER_SOURCE = '''
__device__ __forceinline__ long long tv4_gtime() {
  unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return (long long)t; }
__device__ __forceinline__ long long tv4_clock() { return (long long)clock64(); }
__device__ __forceinline__ long long tv4_smid() {
  unsigned int r; asm volatile("mov.u32 %0, %%smid;" : "=r"(r)); return (long long)r; }
'''


def _stamp(col: int, tid: int, indent: int) -> str:
    pad = " " * indent
    return f"{pad}if tid == {tid}:\n{pad}    dbg[rr, {col}] = T.call_extern('int64', 'tv4_clock')\n"


# the seesaw body's pass-config lines, kept in the instrumented program
SYNCS_OFF = ("            # mbarriers order every hand-over between warpgroups; the only shared buffer a warpgroup's"
             " own threads\n            # hand to each other is its staged output (explicit syncs above)\n"
             "            T.annotate_pass_configs({\"tl.disable_thread_storage_sync\": True})\n")


def _edits() -> list[tuple[str, str, str]]:
    """(anchor, replacement, where) applied in order inside ``_build_seesaw_program``; each anchor must occur there
    exactly once. The stamps cover the program of one query a CTA (``query_tiles = 1``, the one the tool builds)."""
    c = COLUMNS.index
    row = "(b_i * S + s_i) * (NHB * NS) + bx"
    return [
        ("    RING = config.pair_stages\n",
         "    RING = config.pair_stages\n    ann = dict(ann)\n"
         "    ann['dbg'] = T.Tensor[(B * S * NHB * NS, 16), T.int64]\n    arg_names = arg_names + ['dbg']\n",
         "the dbg argument"),
        ("lse2, g0=None, j=None, next_q=None, s_prev=None, o_bf=None):\n",
         "lse2, g0=None, j=None, next_q=None, s_prev=None, o_bf=None, dbg=None, rr=None):\n",
         "the consumer's parameters"),
        ("            T.barrier_wait(q_bar, 0 if j is None else j & 1)\n",
         "            tid = T.get_thread_binding()\n            T.barrier_wait(q_bar, 0 if j is None else j & 1)\n"
         + _stamp(c("q_ready"), 0, 12),
         "the consumer's Q wait"),
        # (thread 0 is the leader's: its block of a pair is never the padding one, so the stamp sits in the real branch;
        # the issue's own wait on the barrier then passes at once)
        ("                if real:\n                    qk_issue(w, r0, ph, q_shared, kv_shared, k_ready, acc_s)\n"
         "                    qk_mask(",
         "                if real:\n                    T.barrier_wait(k_ready[(r0 + w) * 2 + w], ph)\n"
         "                    if tid == 0 and it == 0:\n"
         f"                        dbg[rr, {c('first_block')}] = T.call_extern('int64', 'tv4_clock')\n"
         "                    qk_issue(w, r0, ph, q_shared, kv_shared, k_ready, acc_s)\n                    qk_mask(",
         "the first key block"),
        ("            # the two row sums, added in the same order by both; then the epilogue factors",
         _stamp(c("loop_end_0"), 0, 12) + _stamp(c("loop_end_1"), 128, 12)
         + "            # the two row sums, added in the same order by both; then the epilogue factors",
         "the loop end"),
        ("            T.barrier_wait(fin, 0)\n",
         "            T.barrier_wait(fin, 0)\n" + _stamp(c("fin_0"), 0, 12) + _stamp(c("fin_1"), 128, 12),
         "the row-sum barrier"),
        ("                    q_shared[h, w * DH + d] = T.cast(acc_o[h, d] * alpha[h] * row_sum[h], T.bfloat16)\n",
         "                    q_shared[h, w * DH + d] = T.cast(acc_o[h, d] * alpha[h] * row_sum[h], T.bfloat16)\n"
         + _stamp(c("staged_0"), 0, 16) + _stamp(c("staged_1"), 128, 16),
         "the staged output"),
        ("                        t[\"lse\"][b_i, s_i, h0 + h] = lse2[h] * LN2\n        elif not late:\n",
         "                        t[\"lse\"][b_i, s_i, h0 + h] = lse2[h] * LN2\n" + _stamp(c("store_end_0"), 0, 12)
         + "            if tid == 0:\n"
         f"                dbg[rr, {c('gtime_end')}] = T.call_extern('int64', 'tv4_gtime')\n"
         + _stamp(c("store_end_1"), 128, 12) + "        elif not late:\n",
         "the output store"),
        ("                  lse2_0, lse2_1, src_local, row_local, pos_local, idx_cur, idx_nxt):\n",
         "                  lse2_0, lse2_1, src_local, row_local, pos_local, idx_cur, idx_nxt, dbg=None, rr=None):\n",
         "the one-query CTA's parameters"),
        ("            # ex2 / rcp / lg2 approx; the lazy rescale's test; the producer warps' votes\n"
         "            T.import_source(FAST_SOURCE + ANY_NE1_SOURCE + (WARP_ALL_SOURCE if VOTES else \"\"))\n"
         + SYNCS_OFF +
         "            q_shared = T.alloc_shared((HB, D), T.bfloat16)\n"
         "            kv_shared = T.alloc_shared((2 * RING, BI, D), T.bfloat16)\n",
         "            T.import_source(FAST_SOURCE + ANY_NE1_SOURCE + (WARP_ALL_SOURCE if VOTES else \"\")"
         " + TIMER_SOURCE)\n            dbg = t['dbg']\n"
         f"            rr = {row}\n            if T.get_thread_binding() == 0:\n"
         f"                dbg[rr, {c('gtime_start')}] = T.call_extern('int64', 'tv4_gtime')\n"
         f"                dbg[rr, {c('smid')}] = T.call_extern('int64', 'tv4_smid')\n"
         f"                dbg[rr, {c('start')}] = T.call_extern('int64', 'tv4_clock')\n" + SYNCS_OFF +
         "            q_shared = T.alloc_shared((HB, D), T.bfloat16)\n"
         "            kv_shared = T.alloc_shared((2 * RING, BI, D), T.bfloat16)\n",
         "the kernel start"),
        ("                    p_local_0, acc_o_0, m_0, m_prev_0, alpha_0, l_sum_0, row_sum_0, lse2_0)\n        elif",
         "                    p_local_0, acc_o_0, m_0, m_prev_0, alpha_0, l_sum_0, row_sum_0, lse2_0, dbg=dbg, rr=rr)\n"
         "        elif", "consumer 0's call"),
        ("                    p_local_1, acc_o_1, m_1, m_prev_1, alpha_1, l_sum_1, row_sum_1, lse2_1)\n        elif",
         "                    p_local_1, acc_o_1, m_1, m_prev_1, alpha_1, l_sum_1, row_sum_1, lse2_1, dbg=dbg, rr=rr)\n"
         "        elif", "consumer 1's call"),
        ("            produce(t, tx - 256, b_i, s_i, tq, lo, hi, n_iter, kv_shared, ok_shared, kvpos_shared, "
         "k_ready,\n                    k_free, src_local, row_local, pos_local, idx_cur, idx_nxt)\n",
         "            tid = tx\n" + _stamp(c("producer_start"), 256, 12)
         + "            produce(t, tx - 256, b_i, s_i, tq, lo, hi, n_iter, kv_shared, ok_shared, kvpos_shared, "
         "k_ready,\n                    k_free, src_local, row_local, pos_local, idx_cur, idx_nxt)\n"
         + _stamp(c("producer_end"), 256, 12),
         "the producer"),
        ("                          idx_nxt)\n", "                          idx_nxt, dbg=dbg, rr=rr)\n",
         "the one-query CTA's call"),
    ]


def instrumented_codegen() -> Any:
    """A module: :mod:`tilev4.dsl.codegen` with the seesaw program's timestamps (see the module docstring)."""
    src = CODEGEN.read_text()
    start = src.index("def _build_seesaw_program")
    end = src.index("\ndef ", start) + 1  # the next top-level function
    head, body, tail = src[:start], src[start:end], src[end:]
    for anchor, new, where in _edits():
        if body.count(anchor) != 1:
            raise RuntimeError(f"tilev4/dsl/codegen.py moved: the anchor for {where} occurs {body.count(anchor)} "
                               f"times in _build_seesaw_program (expected once); update tools/attention_timeline.py")
        body = body.replace(anchor, new)
    text = head + body + tail + f"\nTIMER_SOURCE = {_TIMER_SOURCE!r}\n"
    return module_from_source(text, "tilev4_dsl_codegen_timeline", CODEGEN)


def module_from_source(text: str, prefix: str, path: Path) -> Any:
    """``text`` (a version of a tilev4 module, ``path`` its file) run as a module of its own, named ``prefix`` and
    a hash of the text (loaded once a text). Its source is registered with :mod:`linecache`: TileLang's macro
    parser reads it."""
    name = f"{prefix}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path)
    sys.modules[name] = module
    fname = f"<tilev4 {name}>"
    linecache.cache[fname] = (len(text), None, text.splitlines(True), fname)
    exec(compile(text, fname, "exec"), module.__dict__)
    return module


def build(case: str, arch: str | None = None, split_keys: int | None = None) -> Any:
    """The instrumented main program of ``case`` (with ``split_keys``: its split program), compiled (``arch``: sm_90a
    by default, or the current GPU's)."""
    import tilelang

    from tilev4.kernels.attention import variant_spec
    from tilev4.kernels.registry import current_arch

    variant, heads, ring = CASES[case]
    cg = instrumented_codegen()
    spec = variant_spec(variant, heads, ring=ring)
    if split_keys is None:
        prog = cg.build_main_program(spec, cg.AttentionConfig(), split=False)
    else:
        prog = cg.build_main_program(spec, cg.AttentionConfig(split_keys=split_keys), split=True)
    return tilelang.compile(prog, target={"kind": "cuda", "arch": arch or current_arch()},
                            execution_backend="tvm_ffi")


def input_names(case: str, split: bool = False) -> list[str]:
    """The main (or split) program's argument names of ``case`` without the outputs: :func:`_inputs`' order."""
    from tilev4.dsl.codegen import tensor_layout
    from tilev4.kernels.attention import variant_spec

    variant, heads, ring = CASES[case]
    layout = tensor_layout(variant_spec(variant, heads, ring=ring), split=split)
    return [name for name, _ in layout if name not in ("o", "o_part", "lse_part")]


def _inputs(case: str, split: bool = False) -> list[Any]:
    """The benchmark's tensors of ``case``, in the main (or split) program's argument order (without the outputs)."""
    from tilev4.bench.attention import _csa_decode_inputs, _csa_prefill_inputs, _hca_prefill_inputs

    variant, heads, ring = CASES[case]
    if variant == "hca":
        q, kv_w, kv_c, sink, pos, start, _ = _hca_prefill_inputs(65536, heads)
        named = {"window_kv": kv_w, "window_start": start, "comp_kv": kv_c}
    elif ring:
        q, kv_w, kv_c, idx, sink, pos = _csa_decode_inputs(64, heads, 512)
        named = {"window_kv": kv_w, "sel_kv": kv_c, "sel_idx": idx}
    else:
        q, kv_w, kv_c, idx, sink, pos, start = _csa_prefill_inputs(4096, heads, 512 if heads == 64 else 1024)
        named = {"window_kv": kv_w, "window_start": start, "sel_kv": kv_c, "sel_idx": idx}
    named.update(q=q, positions=pos, sink=sink)
    return [named[name] for name in input_names(case, split)]


def _num_splits(case: str, split_keys: int, args: list[Any]) -> int:
    """Splits of ``split_keys`` keys that a row of ``case`` needs, ``args`` being its split program's inputs
    (:func:`_inputs`): each source padded to whole 64-key blocks, as the DSL's runtime counts them."""
    from tilev4.dsl.runtime import AttentionKernel
    from tilev4.kernels.attention import variant_spec

    variant, heads, ring = CASES[case]
    kernel = AttentionKernel(variant_spec(variant, heads, ring=ring))
    blocks = kernel.num_key_blocks(kernel.source_keys(dict(zip(input_names(case, split=True), args))), 64)
    return -(-blocks // (split_keys // 64))


def summarize(d: Any) -> dict[str, float]:
    """Medians (SM cycles unless named ``_ns``) of a ``[CTAs, 16]`` stamp table."""
    import torch

    col = {n: d[:, i].double() for i, n in enumerate(COLUMNS)}

    def med(x: Any) -> float:
        return float(x.median())

    out = {
        "ctas": int(d.shape[0]),
        "q_ready": med(col["q_ready"] - col["start"]),
        "first_block": med(col["first_block"] - col["start"]),
        "key_loop": med(col["loop_end_0"] - col["first_block"]),
        "fin_wait_0": med(col["fin_0"] - col["loop_end_0"]),
        "stage_0": med(col["staged_0"] - col["fin_0"]),
        "store_0": med(col["store_end_0"] - col["staged_0"]),
        "epilogue_1": med(col["store_end_1"] - col["loop_end_1"]),
        "cta": med(col["store_end_0"] - col["start"]),
        "producer": med(col["producer_end"] - col["producer_start"]),
        "cta_ns": med(col["gtime_end"] - col["gtime_start"]),
        "span_ns": float(col["gtime_end"].max() - col["gtime_start"].min()),
    }
    if bool((col["staged_0"] == 0).all()):  # a split program: no staging, the partial store follows the barrier
        out["stage_0"] = 0.0
        out["store_0"] = med(col["store_end_0"] - col["fin_0"])
    gaps = []
    for sm in d[:, 1].unique():
        rows = d[d[:, 1] == sm].double()
        rows = rows[rows[:, 0].argsort()]
        if len(rows) > 1:
            gaps.append(rows[1:, 0] - rows[:-1, 7])
    if gaps:
        out["sm_gap_ns"] = med(torch.cat(gaps))
    return out


def run(case: str, save_raw: Path | None, split_keys: int | None = None) -> dict[str, Any]:
    import torch

    from tilev4.bench import time_cuda

    kernel = build(case, split_keys=split_keys)
    args = _inputs(case, split=split_keys is not None)
    q = args[0]
    b, s, heads, d = q.shape
    ns = 1 if split_keys is None else _num_splits(case, split_keys, args)
    if split_keys is None:
        outs = [torch.full_like(q, float("nan"))]
    else:
        outs = [torch.full((b, s, ns, heads, d), float("nan"), device="cuda"),
                torch.full((b, s, ns, heads), float("nan"), device="cuda")]
    dbg = torch.zeros(b * s * (heads // 64) * ns, 16, dtype=torch.int64, device="cuda")
    ms = time_cuda(lambda: kernel(*args, *outs, dbg), reps=10, warmup=3, graph=True)
    dbg.zero_()
    kernel(*args, *outs, dbg)
    torch.cuda.synchronize()
    if bool(torch.isnan(outs[0]).any()):
        raise RuntimeError(f"{case}: the instrumented kernel left NaN in the output")
    raw = dbg.cpu()
    if save_raw is not None:
        save_raw.mkdir(parents=True, exist_ok=True)
        torch.save({"columns": COLUMNS, "stamps": raw}, save_raw / f"{case}.pt")
    return {"case": case, "split_keys": split_keys, "num_splits": ns, "ms": ms, **summarize(raw)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="cases to run (default: all)")
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--save-raw", type=Path, help="also save each case's stamp table (torch.save) in this folder")
    ap.add_argument("--build-only", action="store_true", help="lower and compile the instrumented programs only")
    ap.add_argument("--arch", default=None, help="CUDA arch for --build-only (default sm_90a)")
    ap.add_argument("--split-keys", type=int, default=None,
                    help="build and run the split program, this many keys a CTA (a multiple of 64)")
    args = ap.parse_args(argv)
    if args.split_keys is not None and (args.split_keys < 64 or args.split_keys % 64):
        ap.error(f"--split-keys must be a positive multiple of 64, got {args.split_keys}")
    cases = args.case or sorted(CASES)
    if args.build_only:
        for case in cases:
            build(case, args.arch or "sm_90a", args.split_keys)
            print(f"{case}: built", flush=True)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("attention_timeline: needs a CUDA GPU (or --build-only)", file=sys.stderr)
        return 2
    report = []
    for case in cases:
        report.append(run(case, args.save_raw, args.split_keys))
        print(json.dumps(report[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
