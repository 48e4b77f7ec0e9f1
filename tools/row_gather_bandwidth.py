"""Read-only gather bandwidth of the decode attention's rows, with nothing else in the kernel.

    python3 tools/row_gather_bandwidth.py --json $OUT/row_gather.json     # on a GPU
    python3 tools/row_gather_bandwidth.py --build-only --arch sm_90a      # no GPU: lower and compile

The V4-Flash decode benchmark reads b = 64 rows of 640 keys, each key a 1 KB row (D = 512 bf16) picked from a
128K-token cache of 32768 compressed entries per sequence. This tool times a TileLang kernel that only gathers those
bytes: each CTA sums ``--rows-per-cta`` rows named by an index list into registers (16-byte loads, the row loop
unrolled so that its loads are in flight together) and writes one fp32 row. The same kernel runs on random indices
(the decode pattern) and on consecutive ones, so the difference is the cost of the access pattern; the fraction is
of the copy bandwidth measured in the same run, as in ``tilev4 bench attention``. Each output is checked against
torch before it is timed.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

D = 512
THREADS = 128


def build(rows_per_cta: int) -> Any:
    import tilelang.language as T

    N, R, C = T.dynamic("N"), T.dynamic("R"), T.dynamic("C")

    @T.prim_func
    def row_sum(kv: T.Tensor[(N, D), T.bfloat16], idx: T.Tensor[(R,), T.int32], out: T.Tensor[(C, D), T.float32]):
        with T.Kernel(C, threads=THREADS) as bx:
            acc = T.alloc_fragment((D,), T.float32)
            T.clear(acc)
            for r in T.unroll(rows_per_cta):
                row = idx[bx * rows_per_cta + r]
                for j in T.Parallel(D):
                    acc[j] += T.cast(kv[row, j], T.float32)
            for j in T.Parallel(D):
                out[bx, j] = acc[j]

    return row_sum


def compile_kernel(rows_per_cta: int, arch: str) -> Any:
    import tilelang

    return tilelang.compile(build(rows_per_cta), target={"kind": "cuda", "arch": arch}, execution_backend="tvm_ffi")


def measure(kernel: Any, rows_per_cta: int, batch: int, entries: int, keys: int) -> dict[str, Any]:
    import torch

    from tilev4.bench import measure_peaks, time_cuda

    g = torch.Generator(device="cuda").manual_seed(0)
    res: dict[str, Any] = {"peaks": measure_peaks(), "batch": batch, "entries": entries, "keys": keys,
                           "rows_per_cta": rows_per_cta}
    kv = torch.randn(batch * entries, D, generator=g, device="cuda").bfloat16()
    rows = batch * keys
    if rows % rows_per_cta:
        raise ValueError(f"batch * keys = {rows} must be a multiple of --rows-per-cta {rows_per_cta}")
    base = entries * torch.arange(batch, device="cuda")[:, None]
    patterns = {
        "random": (torch.randint(0, entries, (batch, keys), generator=g, device="cuda") + base).view(-1).int(),
        "consecutive": torch.arange(rows, device="cuda", dtype=torch.int32),
    }
    out = torch.empty(rows // rows_per_cta, D, device="cuda")
    for name, idx in patterns.items():
        out.fill_(float("nan"))
        kernel(kv, idx, out)
        ref = kv[idx.long()].float().view(-1, rows_per_cta, D).sum(1)
        if not torch.allclose(out, ref, rtol=1e-4, atol=1e-3):
            raise RuntimeError(f"{name}: the gathered sums differ from torch's")
        ms = time_cuda(lambda idx=idx: kernel(kv, idx, out), graph=True)
        gbps = rows * D * 2 / (ms * 1e-3) / 1e9
        res[name] = {"ms": ms, "gbps": gbps, "fraction_of_copy_bw": gbps / res["peaks"]["copy_gbps"]}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows-per-cta", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--entries", type=int, default=32768, help="cache rows a sequence")
    ap.add_argument("--keys", type=int, default=640, help="rows gathered a sequence")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--arch", help="CUDA arch (default: the current GPU's; sm_90a with --build-only)")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    if args.build_only:
        compile_kernel(args.rows_per_cta, args.arch or "sm_90a")
        print("built")
        return 0
    from tilev4.kernels.registry import current_arch

    kernel = compile_kernel(args.rows_per_cta, args.arch or current_arch())
    res = measure(kernel, args.rows_per_cta, args.batch, args.entries, args.keys)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
