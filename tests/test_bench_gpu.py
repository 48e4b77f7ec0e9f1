"""The benchmark harness's back-to-back measurement on the GPU (``tilev4.bench.sustained``)."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_back_to_back_measurement_adds_the_sustained_fraction():
    """A 4096³ matmul measured back to back against the 8192³ one: positive times, the fraction the ratio of the two
    throughputs, and (nvidia-smi being there on the GPU machines) the clocks behind both."""
    from tilev4.bench.sustained import ClockSampler, add_sustained

    n = 4096
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    rec = add_sustained({"kernel": "matmul 4096"}, lambda: torch.matmul(a, b, out=c), 2.0 * n**3, seconds=0.6)
    assert rec["ms_sustained"] > 0 and rec["sustained_peak_tflops"] > 0
    assert rec["tflops_sustained"] == pytest.approx(2.0 * n**3 / rec["ms_sustained"] / 1e9)
    assert rec["fraction_of_sustained_peak"] == pytest.approx(rec["tflops_sustained"] / rec["sustained_peak_tflops"])
    assert 0.3 < rec["fraction_of_sustained_peak"] < 1.5
    with ClockSampler() as sampler:
        available = sampler.available
    if available:
        assert rec["sm_mhz_sustained"] > 0 and rec["sm_mhz_sustained_matmul"] > 0 and rec["power_w_sustained"] > 0
    assert add_sustained({}, lambda: None, 1.0, seconds=0) == {}


def test_time_cuda_runs_before_untimed_after_the_flush():
    """``time_cuda(before=...)`` launches ``before`` once per timed launch, outside the timed interval: a ~1 ms spin
    before a one-element add leaves the add's median far under the spin."""
    from tilev4.bench import time_cuda

    x = torch.ones(1, device="cuda")
    calls = []

    def spin():
        calls.append(1)
        torch.cuda._sleep(2_000_000)

    ms = time_cuda(lambda: x.add_(1), warmup=2, reps=5, graph=True, before=spin)
    assert len(calls) == 5
    assert 0 < ms < 0.2
