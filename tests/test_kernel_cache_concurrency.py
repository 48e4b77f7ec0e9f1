"""Eight processes compiling the same kernels into one fresh cache at once lose nothing and load correct libraries."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tilev4.autotune.kernel_cache import list_entries

NUM_PROCS = 8
JOBS = [("rmsnorm", {"D": 512}), ("fp8_quantize", {"K": 1024})]  # the two smallest kernels

WORKER = """
import hashlib, json, os, sys, time
from pathlib import Path
go, jobs = Path(sys.argv[1]), json.loads(sys.argv[2])
import tilev4
from tilev4.autotune import cache_stats
from tilev4.kernels import compile_kernel
(go.parent / f"ready-{os.getpid()}").touch()
while not go.exists():  # start together
    time.sleep(0.005)
out = {}
for name, cfg in jobs:
    k = compile_kernel(name, cfg, "sm_90a")
    lib = Path(k.tilev4_cache_entry) / "executable.so"
    out[name] = {
        "entry": k.tilev4_cache_entry,
        "lib_sha256": hashlib.sha256(lib.read_bytes()).hexdigest(),
        "has_global": "__global__" in k.get_kernel_source(),
        "params": [f"{p.dtype}{list(p.shape)}" for p in k.params],
    }
print(json.dumps({"stats": cache_stats(), "kernels": out}))
"""


@pytest.mark.compile
def test_eight_processes_share_one_fresh_cache(tmp_path):
    cache = tmp_path / "cache"
    sync = tmp_path / "sync"
    sync.mkdir()
    go = sync / "go"
    # a fresh TileLang directory too, so every compile runs nvcc and the race window is real
    env = {**os.environ, "TILEV4_CACHE_DIR": str(cache), "TILELANG_CACHE_DIR": str(tmp_path / "tilelang")}
    procs = []
    for i in range(NUM_PROCS):
        jobs = JOBS if i % 2 == 0 else JOBS[::-1]  # half start with each kernel
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(go), json.dumps(jobs)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 300
    while len(list(sync.glob("ready-*"))) < NUM_PROCS and time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))

    # exactly one compile per key across all processes; nobody rebuilt anything
    assert sum(r["stats"]["compiles"] for r in results) == len(JOBS)
    assert sum(r["stats"]["rebuilds"] for r in results) == 0
    assert sum(r["stats"]["disk_hits"] for r in results) == NUM_PROCS * len(JOBS) - len(JOBS)
    # exactly one entry per key, every manifest verifies, nothing left in staging
    entries = list_entries(cache, verify=True)
    assert sorted(e.kernel for e in entries) == sorted(name for name, _ in JOBS)
    assert all(e.problem is None for e in entries), [e.problem for e in entries]
    staging = cache / "kernels" / ".staging"
    assert not staging.exists() or not list(staging.iterdir())
    # every process got a working kernel object backed by the published library
    by_kernel = {e.kernel: e for e in entries}
    expected_params = {
        "rmsnorm": ["bfloat16[N, 512]", "float32[512]", "bfloat16[N, 512]"],
        "fp8_quantize": ["bfloat16[N, 1024]", "float8_e4m3fn[N, 1024]", "float32[N, 8]"],
    }
    for r in results:
        for name, k in r["kernels"].items():
            e = by_kernel[name]
            manifest = json.loads((e.path / "manifest.json").read_text())
            assert Path(k["entry"]) == e.path
            assert k["lib_sha256"] == manifest["files"]["executable.so"]["sha256"]
            assert k["lib_sha256"] == hashlib.sha256((e.path / "executable.so").read_bytes()).hexdigest()
            assert k["has_global"] and k["params"] == expected_params[name]
