"""Tuning on the GPU end to end: a small rmsnorm space is tuned and stored, and a fresh process then loads the
tuned kernel from the cache without compiling anything."""

import json
import os
import subprocess
import sys

import pytest

from tilev4.autotune import store
from tilev4.autotune.space import Space
from tilev4.kernels import get_kernel_def
from tilev4.kernels.registry import clear_kernel_memo

gpu = pytest.mark.gpu

FRESH = """
import json, torch, tilev4
from tilev4 import reference as R
from tilev4.autotune import cache_stats
from tilev4.kernels.registry import resolve_config
x = (torch.randn(300, 512, device="cuda") * 3).bfloat16()
w = torch.randn(512, device="cuda")
y = tilev4.rmsnorm(x, w)
torch.cuda.synchronize()
ok = torch.allclose(y.float().cpu(), R.rmsnorm(x.cpu(), w.cpu()), rtol=2.0**-8, atol=1e-6)
res = resolve_config("rmsnorm", {"D": 512, "eps": 1e-6})
print(json.dumps({"stats": cache_stats(), "ok": bool(ok), "source": res.source, "config": dict(res.items)}))
"""


@gpu
def test_tune_small_space_then_a_fresh_process_compiles_nothing(tmp_path, monkeypatch):
    from tilev4.autotune.tuner import tune

    monkeypatch.setenv("TILEV4_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(store, "SHIPPED_DIR", tmp_path / "no-shipped-defaults")
    clear_kernel_memo()
    base = get_kernel_def("rmsnorm").space
    small = Space({"block_rows": (1, 2), "threads": (128, 256)}, base.constraints, base.smem_bytes)
    report = tune(["rmsnorm"], [{"D": 512, "N": 67}, {"D": 512, "N": 8192}, {"D": 1024, "N": 8192}],
                  workers=4, rounds=3, reps=5, space=small, log=lambda s: None)
    (rec,) = report["records"]
    assert rec["key"]["bucket"] == "D<=1536" and rec["key"]["gpu_name"]
    assert rec["config"] in small.product()
    statuses = {json.dumps(c["config"], sort_keys=True): c["status"] for c in rec["candidates"]}
    assert set(statuses.values()) == {"ok"}, statuses  # every candidate is right and batch-invariant
    assert all(len(c["samples_ms"]) == 3 * 5 for c in rec["candidates"])
    assert rec["speedup_vs_default"] > 0 and rec["winner_median_ms"] <= rec["default_median_ms"] * 1.05
    # stored under this GPU, found by the exact key
    slug = store.ResultKey.from_dict(rec["key"]).gpu.slug
    stored = json.loads((store.results_dir() / slug / "rmsnorm.json").read_text())
    assert stored["records"][0]["config"] == rec["config"]
    hit = store.lookup(store.ResultKey.from_dict(rec["key"]))
    assert hit is not None and hit.source == "tuned"

    env = {**os.environ, "TILEV4_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", FRESH], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["stats"]["compiles"] == 0 and res["stats"]["disk_hits"] >= 1, res
    assert res["source"] == "tuned" and {k: res["config"][k] for k in rec["config"]} == rec["config"]
    assert res["ok"]
    clear_kernel_memo()
