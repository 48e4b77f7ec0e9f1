"""Tuning of the registry attention kernels (``sparse_attention``, ``csa_attention``, ``hca_attention``):
their space, shape buckets and harness.

**Space** — the DSL's (:func:`tilev4.dsl.tuning.config_space`): ``block_kv`` 64/32/16 and
``schedule`` ws/seesaw for the main and split programs of every 64- and 128-head kernel (6
candidates per bucket), ``block_kv`` and ``threads`` 256/128 where the simple schedule runs (other
head counts), ``combine_threads`` 128/256/64 for the combine (3 candidates). The default comes first.

**Buckets** — compile-time keys only, never the batch or the number of queries::

    H=64,prefill,main    the one-pass program and the batch-invariant split (split_keys=2048) of the
                         stream layout: one config for both, because in batch-invariant mode the split
                         of a long row runs the one-pass program's config (same bits either way)
    H=64,decode,main     the same for the decode ring
    H=64,prefill,split   the other splits (256- and 128-key pieces for small batches, ``num_splits``)
    H=64,decode,split
    H=64,combine         the combine (layout-free)

``sparse_attention`` has no window, hence no layout: ``H=64,main``, ``H=64,split``, ``H=64,combine``.
``return_lse`` shares the bucket of its program.

**Harness** — the run-time size ``Q`` is the number of queries (32 and 256 by default: small, because
the fp32 reference runs on the CPU): the decode ring has ``Q`` rows of one query; the stream layout
and sparse attention have rows of :data:`ROW_QUERIES` consecutive queries. Batch slices are
contiguous rows.
Inputs are random (bf16 ``N(0, 1)`` queries and keys, a random sink), one row near the start of its
sequence (partly empty window, few or no compressed entries), the others deep into it; the CSA
indices are the top-k of random scores among the visible entries (−1 past them), the sparse
indices random rows with unused and duplicated slots; HCA compressed rows no query may see are NaN.
The expected outputs are :func:`tilev4.reference.attention.sparse_attention` over the same key
sets (for a split program, over each split's keys: the normalised partial and its log-sum-exp;
for the combine, the partials are the reference's and the result is the full attention;
timing-only combine cases take random partials), computed in fp32 on the CPU. Tolerances are
those of ``tests/test_attention_gpu.py``. Every source's key count is a multiple of 64 and every
candidate ``block_kv`` divides 64, so the split boundaries in keys — and the workspace of a case —
are the same for every candidate.
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tilev4._fastmath import LN2, LOG2E
from tilev4.autotune.harness import TuningCase, TuningHarness
from tilev4.dsl.runtime import BATCH_INVARIANT_SPLIT_KEYS, OCCUPANCY_SPLIT_KEYS
from tilev4.dsl.tuning import config_space

__all__ = [
    "LSE_TOL",
    "O_TOL",
    "ROW_QUERIES",
    "AttentionCase",
    "bucket_fn",
    "check",
    "harness",
    "space",
]

O_TOL = {"atol": 1e-2, "rtol": 1e-2}  # bf16 P before P·V and a bf16 output (tests/test_attention_gpu.py)
LSE_TOL = {"atol": 1e-3, "rtol": 1e-4}
ROW_QUERIES = 16  # consecutive queries per row of a stream (prefill) or sparse case
TOPK = 512  # index slots per query (CSA, sparse)
SPARSE_ROWS = 1024  # rows of the sparse kv
RING = 256  # decode ring rows (>= window + queries - 1)


def _spec(variant: str, c: Mapping[str, Any]) -> Any:
    from tilev4.kernels.attention import variant_spec

    return variant_spec(variant, c["heads"], bool(c.get("ring", False)), bool(c.get("return_lse", False)))


def space(variant: str) -> Any:
    """The tuning space of ``{variant}_attention``."""
    return config_space(lambda c: _spec(variant, c))


def bucket_fn(variant: str) -> Callable[[Mapping[str, Any]], str]:
    """The shape bucket of a problem of ``{variant}_attention`` (see the module docstring)."""

    def bucket(problem: Mapping[str, Any]) -> str:
        head = f"H={problem['heads']}"
        if problem["kind"] == "combine":
            return f"{head},combine"
        layout = "" if variant == "sparse" else (",decode" if problem["ring"] else ",prefill")
        one_config = problem["kind"] == "main" or problem["split_keys"] == BATCH_INVARIANT_SPLIT_KEYS
        return f"{head}{layout},{'main' if one_config else 'split'}"

    return bucket


@dataclass
class AttentionCase(TuningCase):
    """A :class:`TuningCase` that knows its argument names (``sink`` is the one not batched)."""

    names: tuple[str, ...] = ()


def _layout(variant: str, problem: Mapping[str, Any]) -> str:
    """``ring``, ``stream`` or ``sparse``: how the inputs of a case are laid out."""
    if variant == "sparse":
        return "sparse"
    return "ring" if problem["kind"] == "combine" or problem.get("ring") else "stream"


def _rows(layout: str, n: int) -> tuple[int, int]:
    """(rows b, queries per row s) for ``n`` queries."""
    if layout == "ring":
        return max(1, n), 1
    s = max(1, min(n, ROW_QUERIES))
    return max(1, n // s), s


def _round64(n: int) -> int:
    return max(64, -(-n // 64) * 64)


def _inputs(variant: str, layout: str, b: int, s: int, heads: int, g: torch.Generator,
            device: str) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Random source tensors (by name, with ``q``, ``positions``, ``sink``) and each source's key count."""
    d = 512

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device).bfloat16()

    t: dict[str, torch.Tensor] = {"q": randn(b, s, heads, d)}
    t["sink"] = torch.randn(heads, generator=g, device=device)
    if variant == "sparse":
        t["positions"] = torch.zeros(b, s, dtype=torch.int32, device=device)
        t["sel_kv"] = randn(b, SPARSE_ROWS, d)
        idx = torch.randint(0, SPARSE_ROWS, (b, s, TOPK), generator=g, device=device, dtype=torch.int32)
        idx[:, :, ::3] = -1  # scattered unused slots
        idx[:, :, 10:20] = idx[:, :, 1:2]  # a duplicated row counts ten more times
        idx[0, 0, 64:128] = -1  # a whole unused block
        t["sel_idx"] = idx
        return t, [TOPK]
    ratio = 4 if variant == "csa" else 128
    lo, hi = (2048, 3072) if variant == "csa" else (16384, 49152)  # CSA: >= 512 visible entries
    first = torch.randint(lo, hi, (b,), generator=g, device=device, dtype=torch.int32)
    first[0] = 40  # a sequence that has just started: partial window, few (CSA) or no (HCA) entries
    pos = (first.view(-1, 1) + torch.arange(s, device=device, dtype=torch.int32)).contiguous()
    t["positions"] = pos
    if layout == "ring":
        t["window_kv"] = randn(b, RING, d)
    else:
        t["window_kv"] = randn(b, s + 127, d)
        t["window_start"] = (first - 127).clamp(min=0).contiguous()
    visible = (pos.long() + 1) // ratio  # [b, s]
    n_c = _round64(int(visible.max()))
    kv_c = randn(b, n_c, d)
    if variant == "csa":
        scores = torch.rand(b, s, n_c, generator=g, device=device)
        scores = scores.masked_fill(torch.arange(n_c, device=device) >= visible.unsqueeze(-1), -math.inf)
        top = scores.topk(min(TOPK, n_c), dim=-1)
        idx = torch.full((b, s, TOPK), -1, dtype=torch.int32, device=device)
        idx[..., : top.indices.shape[-1]] = torch.where(torch.isfinite(top.values), top.indices, -1).to(torch.int32)
        t["sel_kv"], t["sel_idx"] = kv_c, idx
        return t, [128, TOPK]
    # HCA: entries no query of the row can see must never be read
    seen = visible.amax(dim=1)  # [b]
    kv_c[torch.arange(n_c, device=device) >= seen.view(-1, 1)] = float("nan")
    t["comp_kv"] = kv_c
    return t, [128, n_c]


def _key_sets(variant: str, t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's key set as the reference sees it: (kv fp32 [b, n, D], indices [b, s, keys]) on
    the CPU, slot ``j`` of the indices being key ``j`` of the kernel's global key sequence."""
    from tilev4.reference import attention as RA

    c = {k: v.cpu() for k, v in t.items()}
    if variant == "sparse":
        return c["sel_kv"].float(), c["sel_idx"]
    win = RA.window_indices(c["positions"])  # token positions or -1, [b, s, 128]
    if "window_start" in c:
        st = c["window_start"].view(-1, 1, 1)
        win_rows = torch.where(win >= st, win - st, -1).to(torch.int32)
    else:
        win_rows = torch.where(win >= 0, win % c["window_kv"].shape[1], -1).to(torch.int32)
    if variant == "csa":
        return RA.concat_key_sets(c["window_kv"], c["sel_kv"], win_rows, c["sel_idx"])
    comp = RA.compressed_indices(c["positions"], 128, max_entries=c["comp_kv"].shape[1])
    return RA.concat_key_sets(c["window_kv"], c["comp_kv"].nan_to_num(), win_rows, comp)


def _split_reference(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, split_keys: int,
                     num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per split of ``split_keys`` keys: the normalised attention without sink and its natural lse.

    Returns o [b, s, NS, H, D] (0 for an empty split) and lse [b, s, NS, H] (−inf for an empty split).
    """
    from tilev4.reference import attention as RA

    outs, lses = [], []
    for sp in range(num_splits):  # slot j of idx is key j of the global sequence
        o, lse = RA.sparse_attention(q, kv, None, idx[..., sp * split_keys : (sp + 1) * split_keys].contiguous(),
                                     return_lse=True)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs, dim=2), torch.stack(lses, dim=2)


def _make_case(variant: str) -> Callable[..., AttentionCase]:
    from tilev4.dsl.codegen import tensor_layout

    def make_case(problem: Mapping[str, Any], n: int, gen: torch.Generator, device: str,
                  reference: bool) -> AttentionCase:
        from tilev4.reference import attention as RA

        spec = _spec(variant, problem)
        kind, heads, lse_out = problem["kind"], problem["heads"], bool(problem.get("return_lse", False))
        layout = _layout(variant, problem)
        b, s = _rows(layout, n)
        g = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        t, source_keys = _inputs(variant, layout, b, s, heads, g, device)
        expected: tuple[torch.Tensor, ...] | None = None
        kv_ref, idx_ref = _key_sets(variant, t) if reference else (None, None)
        q_ref = t["q"].cpu().float()
        if kind == "combine":
            ns = -(-sum(source_keys) // OCCUPANCY_SPLIT_KEYS)
            if reference:
                o_p, lse_p = _split_reference(q_ref, kv_ref, idx_ref, OCCUPANCY_SPLIT_KEYS, ns)
                t["o_part"], t["lse_part"] = o_p.to(device), (lse_p * LOG2E).to(device)  # the split writes base 2
            else:  # timing only: any finite partials
                t["o_part"] = torch.randn(b, s, ns, heads, 512, generator=g, device=device)
                t["lse_part"] = 4 * torch.randn(b, s, ns, heads, generator=g, device=device)
            names = ["sink", "o_part", "lse_part", "o"] + (["lse"] if lse_out else [])
        else:
            names = [nm for nm, _ in tensor_layout(spec, split=kind == "split")]
        if kind == "split":
            ns = -(-sum(source_keys) // problem["split_keys"])
            t["o_part"] = torch.empty(b, s, ns, heads, 512, device=device)
            t["lse_part"] = torch.empty(b, s, ns, heads, device=device)
            if reference:
                o_p, lse_p = _split_reference(q_ref, kv_ref, idx_ref, problem["split_keys"], ns)
                expected = (o_p.to(device), lse_p.to(device))
        else:
            t["o"] = torch.empty(b, s, heads, 512, dtype=torch.bfloat16, device=device)
            if lse_out:
                t["lse"] = torch.empty(b, s, heads, device=device)
            if reference:
                ref = RA.sparse_attention(q_ref, kv_ref, t["sink"].cpu(), idx_ref, return_lse=lse_out)
                expected = tuple(x.to(device) for x in (ref if lse_out else (ref,)))
        outputs = tuple(i for i, nm in enumerate(names) if nm in ("o", "lse") or (kind == "split" and "part" in nm))
        return AttentionCase(tuple(t[nm] for nm in names), outputs, expected, b, names=tuple(names))

    return make_case


def _excess(got: torch.Tensor, ref: torch.Tensor, tol: Mapping[str, float]) -> float:
    """How far ``|got − ref|`` exceeds ``atol + rtol·|ref|`` at worst (≤ 0 passes)."""
    return float(((got.float() - ref.float()).abs() - (tol["atol"] + tol["rtol"] * ref.float().abs())).max())


def check(outputs: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> str | None:
    """Outputs against the reference: ``o`` (main/combine, bf16) or the partials (split: o_part fp32
    [b, s, NS, H, D] and its base-2 lse_part), and the lse when there is one. NaN never passes."""
    split = outputs[0].dim() == 5
    o = outputs[0]
    if torch.isnan(o).any():
        return "NaN in the partial output" if split else "NaN in the output"
    excess = _excess(o, expected[0], O_TOL)
    if not excess <= 0:
        return f"|o - ref| exceeds atol {O_TOL['atol']} + rtol {O_TOL['rtol']}·|ref| by {excess:.3g}"
    if len(outputs) < 2:
        return None
    lse = outputs[1] * LN2 if split else outputs[1]
    ref = expected[1]
    if torch.isnan(lse).any():
        return "NaN in the lse"
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(lse), finite) or not torch.equal(lse[~finite], ref[~finite]):
        return "the lse is not -inf exactly where the reference's is (empty key sets)"
    excess = _excess(lse[finite], ref[finite], LSE_TOL) if bool(finite.any()) else 0.0
    if not excess <= 0:
        return f"|lse - ref| exceeds atol {LSE_TOL['atol']} + rtol {LSE_TOL['rtol']}·|ref| by {excess:.3g}"
    return None


def batch_slice(case: TuningCase, start: int, stop: int) -> AttentionCase:
    """Rows ``[start, stop)`` of every batched input (all but the sink), fresh outputs, no expected."""
    assert isinstance(case, AttentionCase)
    args = []
    for i, (nm, a) in enumerate(zip(case.names, case.args)):
        if i in case.outputs:
            args.append(torch.empty_like(a[start:stop]))
        elif nm == "sink":
            args.append(a)
        else:
            args.append(a[start:stop].contiguous())
    return AttentionCase(tuple(args), case.outputs, None, stop - start, names=case.names)


def harness(variant: str) -> TuningHarness:
    """The tuning harness of ``{variant}_attention`` (sizes: 32 and 256 queries)."""
    return TuningHarness(_make_case(variant), check, sizes=(32, 256), size_name="Q", batch_slice=batch_slice)
