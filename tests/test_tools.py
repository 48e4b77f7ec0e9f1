"""The helper scripts under tools/ run (on the CPU here)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_profile_decode_reports_both_modes(tmp_path):
    out = tmp_path / "profile.json"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "profile_decode.py"), "--model", "tiny", "--context",
                          "40", "--batch", "2", "--steps", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"default", "batch-invariant"}
    for mode in report["modes"].values():
        assert mode["device_ms_per_step"] > 0 and mode["groups_ms"] and mode["top_kernels_ms"]
        assert abs(sum(mode["groups_ms"].values()) - mode["device_ms_per_step"]) < 1e-6
    assert "batch-invariant" in run.stdout or "default" in run.stdout


def test_moe_schedules_checks_its_arguments():
    """The MoE schedule comparison (a GPU tool) names a bad kernel, and says when there is no GPU to run on."""
    import pytest
    import torch

    tool = str(ROOT / "tools" / "moe_schedules.py")
    run = subprocess.run([sys.executable, tool, "--kernels", "moe_up,moe_gate"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0 and "moe_gate" in run.stderr
    if torch.cuda.is_available():
        pytest.skip("the no-GPU message is for machines without one")
    run = subprocess.run([sys.executable, tool], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "needs a CUDA GPU" in run.stderr


def test_compressor_configs_checks_its_arguments():
    """The compressor config comparison (a GPU tool) names a bad --configs, and says when there is no GPU."""
    import pytest
    import torch

    tool = str(ROOT / "tools" / "compressor_configs.py")
    for bad in ("{not json", '{"schedule": "stream"}'):
        run = subprocess.run([sys.executable, tool, "--configs", bad], capture_output=True, text=True, timeout=300)
        assert run.returncode != 0 and "--configs" in run.stderr
    if torch.cuda.is_available():
        pytest.skip("the no-GPU message is for machines without one")
    run = subprocess.run([sys.executable, tool, "--variant", "128"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "needs a CUDA GPU" in run.stderr


def test_kernel_records_name_registry_kernels():
    """tools/records/*.jsonl (builds earlier GPU rounds loaded) read as (kernel, config) jobs of this registry."""
    from tilev4.kernels.registry import load_all_kernels, recorded_jobs

    load_all_kernels()
    files = sorted((ROOT / "tools" / "records").glob("*.jsonl"))
    assert files
    for f in files:
        jobs = recorded_jobs(f)
        assert jobs, f
        assert all(isinstance(config, dict) for _, config in jobs)
