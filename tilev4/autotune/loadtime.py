"""Cold-load timing of cached kernels: ``python -m tilev4.autotune.loadtime [--json FILE]``.

Run it in a fresh process after ``tilev4 compile`` (or an import of a cache). It reports, in ms:
``import_tilelang`` and ``import_tilev4`` (paid once by any user of the package), ``first_load``
(the first ``compile_kernel`` call: resolution, the toolchain probe, verification and loading),
each further kernel's load, and — on a GPU — the first and second launch of ``rmsnorm`` (the
first one loads the cubin into the CUDA context). ``compiles`` must be 0 for a warm cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

__all__ = ["main", "measure"]

# run in a fresh interpreter: `python -m tilev4...` would import tilev4 (and TileLang) before timing
_CHILD = """
import sys, time, json
t0 = time.perf_counter()
import tilelang
t1 = time.perf_counter()
import tilev4
t2 = time.perf_counter()
from tilev4.autotune.loadtime import measure
print(json.dumps(measure(json.loads(sys.argv[1]), sys.argv[2] == "1", (t0, t1, t2))))
"""


def measure(kernels: list[str] | None = None, all_configs: bool = False,
            import_marks: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """Time cache loads in this process (``import_marks``: perf_counter before/after the imports)."""
    import tilev4
    from tilev4.autotune.kernel_cache import cache_stats
    from tilev4.kernels.registry import compile_kernel, get_kernel_def, iter_registry

    t0, t1, t2 = import_marks or (0.0, 0.0, 0.0)
    kdefs = [get_kernel_def(k) for k in kernels] if kernels else list(iter_registry())
    loads: list[dict[str, Any]] = []
    for kdef in kdefs:
        for cfg in kdef.configs if all_configs else kdef.configs[:1]:
            ts = time.perf_counter()
            compile_kernel(kdef.name, cfg)
            loads.append({"kernel": kdef.name, "config": dict(cfg), "ms": (time.perf_counter() - ts) * 1e3})
    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "import_tilelang_ms": (t1 - t0) * 1e3,
        "import_tilev4_ms": (t2 - t1) * 1e3,
        "first_load_ms": loads[0]["ms"] if loads else None,
        "later_load_median_ms": statistics.median(x["ms"] for x in loads[1:]) if len(loads) > 1 else None,
        "later_load_max_ms": max(x["ms"] for x in loads[1:]) if len(loads) > 1 else None,
        "loads": loads,
    }
    import torch

    if torch.cuda.is_available() and any(k.name == "rmsnorm" for k in kdefs):
        x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
        w = torch.ones(4096, device="cuda")
        torch.cuda.synchronize()
        launches = []
        for _ in range(2):
            ts = time.perf_counter()
            tilev4.rmsnorm(x, w)
            torch.cuda.synchronize()
            launches.append((time.perf_counter() - ts) * 1e3)
        out["rmsnorm_first_call_ms"], out["rmsnorm_second_call_ms"] = launches
    out["stats"] = cache_stats()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tilev4.autotune.loadtime", description=__doc__)
    p.add_argument("--kernel", action="append", help="only this kernel (repeatable)")
    p.add_argument("--all-configs", action="store_true", help="every shipped config, not just the default")
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args.kernel), "1" if args.all_configs else "0"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stdout + res.stderr, file=sys.stderr)
        return res.returncode
    out = json.loads(res.stdout.strip().splitlines()[-1])
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if out["stats"]["compiles"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
