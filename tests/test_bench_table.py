"""The README performance table made from benchmark reports (no GPU)."""

from tilev4.bench import L2_FLUSH, render_table


def _report(commit: str, **extra):
    return {"date": "2026-11-30", "gpu": "NVIDIA H200", "commit": commit, "torch": "2.13.0",
            "peaks": {"bf16_matmul_tflops": 800.0, "copy_gbps": 4000.0},
            "results": [{"kernel": "k", "shape": "s", "ms": 0.5, "gbps": 2000.0, "fraction_of_copy_bw": 0.5,
                         "target_fraction": 0.6}], **extra}


def test_table_names_each_reports_l2_flush():
    table = render_table([_report("aaa1111", l2_flush=L2_FLUSH), _report("bbb2222")])
    assert "| k | s | 0.5000 | 2000 | – | 0.50 of copy BW | 0.60 | NVIDIA H200 | 2026-11-30 | aaa1111 |" in table
    flush_line = next(line for line in table.splitlines() if line.startswith("L2 flush"))
    assert f"{L2_FLUSH} (aaa1111)" in flush_line
    assert "write of 256 MiB before each launch (bbb2222)" in flush_line  # older reports: the write flush


def test_table_groups_reports_with_the_same_flush():
    flush_line = next(line for line in render_table([_report("c1", l2_flush=L2_FLUSH), _report("c2", l2_flush=L2_FLUSH)]
                                                    ).splitlines() if line.startswith("L2 flush"))
    assert flush_line == f"L2 flush — {L2_FLUSH} (c1, c2)."



def test_each_benchmark_declares_its_l2_flush():
    import tilev4.bench as bench
    from tilev4.bench.model import MODEL_L2_FLUSH

    bench._load_all()
    assert set(bench.BENCH_L2_FLUSH) == set(bench.BENCHES)
    assert bench.BENCH_L2_FLUSH["model"] == MODEL_L2_FLUSH  # decode steps back to back, no flush
    assert {bench.BENCH_L2_FLUSH[n] for n in bench.BENCHES if n != "model"} == {L2_FLUSH}


def test_quantised_moe_rows_show_the_speed_up_over_the_bf16_path_and_its_target():
    rep = _report("d1")
    rep["results"] = [
        {"kernel": "fp8", "shape": "prefill", "ms": 3.0, "tflops": 700.0, "fraction_of_bf16_peak": 0.875,
         "speedup_vs_bf16": 1.6, "target_speedup_vs_bf16": 1.5},
        {"kernel": "fp8", "shape": "decode", "ms": 1.0, "gbps": 3600.0, "fraction_of_copy_bw": 0.9,
         "speedup_vs_bf16": 1.85},
    ]
    rows = render_table([rep]).splitlines()
    assert "| fp8 | prefill | 3.0000 | – | 700.0 | 0.88 of bf16 matmul, 1.60× the bf16 path | 1.5× bf16 |" in rows[2]
    assert "| fp8 | decode | 1.0000 | 3600 | – | 0.90 of copy BW, 1.85× the bf16 path | – |" in rows[3]


def test_time_in_turn_reverses_the_order_every_other_round(monkeypatch):
    import tilev4.bench as bench

    order = []
    monkeypatch.setattr(bench, "time_cuda", lambda fn, **kw: (order.append((fn, kw)), {"a": 3.0, "b": 1.0}[fn])[1])
    assert bench.time_in_turn(["a", "b"], rounds=3, graph=True) == [3.0, 1.0]
    assert [fn for fn, _ in order] == ["a", "b", "b", "a", "a", "b"] and all(kw == {"graph": True} for _, kw in order)
    order.clear()
    bench.time_in_turn(["a", "b"], rounds=2, alternate=False)
    assert [fn for fn, _ in order] == ["a", "b", "a", "b"]


def test_decode_rows_show_the_empty_launch_timed_alike():
    rep = _report("e1")
    rep["results"][0]["launch_floor_ms"] = 0.0051
    row = render_table([rep]).splitlines()[2]
    assert "| 0.50 of copy BW (an empty launch: 0.0051 ms) | 0.60 |" in row


def test_routing_stats_count_the_padding_of_partly_filled_slabs():
    import pytest
    import torch

    from tilev4.bench.moe import routing_stats

    stats = routing_stats(torch.tensor([4, 64, 130, 0, 192], dtype=torch.int32))
    assert stats == {"rows_per_expert_min": 0, "rows_per_expert_median": 64, "rows_per_expert_max": 192,
                     "experts_with_partial_slab": 2, "padding_rows_fraction": (60 + 62) / 390}
    assert routing_stats(torch.full((8,), 128))["padding_rows_fraction"] == 0.0
    assert routing_stats(torch.zeros(3, dtype=torch.int64))["padding_rows_fraction"] == 0.0
    for bad, what in ((torch.zeros(0), "non-empty"), (torch.zeros(2, 2), "1-D"), (torch.tensor([3, -1]), ">= 0")):
        with pytest.raises(ValueError, match=f"counts must be.*{what}"):
            routing_stats(bad)
    with pytest.raises(ValueError, match="slab must be >= 1, got 0"):
        routing_stats(torch.tensor([3]), slab=0)


def test_clock_samples_are_parsed_and_summarised():
    """nvidia-smi's CSV lines (what is not one is skipped), the clock-event reasons and the summary of a run's samples
    (the back-to-back measurement's clocks, ``tilev4.bench.sustained``)."""
    import pytest

    from tilev4.bench.sustained import decode_reasons, parse_sample, summarise

    s = parse_sample("2026/12/02 16:10:00.250, 1335, 3201, 688.12, 61, 0x0000000000000004")
    assert s is not None and s["sm_mhz"] == 1335.0 and s["power_w"] == 688.12 and s["reasons"] == 4
    assert s["t"] - int(s["t"]) == pytest.approx(0.25)
    for junk in ("timestamp, clocks.sm", "2026/12/02 16:10:00.250, [N/A], 3201, 688.12, 61, 0x4", "No devices"):
        assert parse_sample(junk) is None
    assert decode_reasons(0x4 | 0x80) == ["sw power cap", "hw power brake"]
    assert decode_reasons(0x1000) == ["0x1000"] and decode_reasons(0) == []
    later = parse_sample("2026/12/02 16:10:00.270, 1395, 3201, 650.0, 62, 0x0")
    summary = summarise([s, later])
    assert summary["samples"] == 2 and summary["sm_mhz"] == 1365.0 and summary["sm_mhz_min"] == 1335.0
    assert summary["reasons"] == ["sw power cap"] and summarise([]) == {"samples": 0}


def test_rows_show_their_back_to_back_fraction_and_the_sustained_peak():
    """A row measured back to back at the power cap shows that fraction and both clocks in its cell (the quantised
    MoE path also its speed-up there), and the peaks line the range of the sustained matmul's TFLOPS."""
    rep = _report("e1")
    rep["results"] = [
        {"kernel": "csa", "shape": "prefill", "ms": 0.63, "tflops": 540.0, "fraction_of_bf16_peak": 0.675,
         "target_fraction": 0.7, "fraction_of_sustained_peak": 0.709, "sustained_peak_tflops": 666.4,
         "sm_mhz_sustained": 1710.0, "sm_mhz_sustained_matmul": 1447.5},
        {"kernel": "fp8", "shape": "prefill", "ms": 3.0, "tflops": 700.0, "fraction_of_bf16_peak": 0.875,
         "speedup_vs_bf16": 1.6, "target_speedup_vs_bf16": 1.5, "fraction_of_sustained_peak": 1.02,
         "sustained_peak_tflops": 659.6, "speedup_vs_bf16_sustained": 1.52},
        {"kernel": "plain", "shape": "s", "ms": 1.0, "tflops": 500.0, "fraction_of_bf16_peak": 0.625},
    ]
    table = render_table([rep])
    rows = table.splitlines()
    assert "| 0.68 of bf16 matmul; sustained 0.71 of sustained matmul (1710 / 1448 MHz) | 0.70 |" in rows[2]
    assert "0.88 of bf16 matmul, 1.60× the bf16 path; sustained 1.02 of sustained matmul, 1.52× the bf16 path" \
        in rows[3]
    assert "| 0.62 of bf16 matmul | – |" in rows[4]
    assert "bf16 matmul 800 TFLOPS (back to back at the power cap: 660-666), copy 4000 GB/s" in table


def test_bench_names_a_negative_back_to_back_length():
    from tilev4.bench import run_benches

    try:
        run_benches(["attention"], sustained_seconds=-1.0)
    except ValueError as exc:
        assert "sustained_seconds must be >= 0, got -1.0" in str(exc)
    else:
        raise AssertionError("a negative length was accepted")


def test_clock_sampler_without_nvidia_smi_samples_nothing(monkeypatch):
    """Where nvidia-smi is missing the sampler says so (``available`` false, no samples, no CUDA call) and the
    back-to-back rows then get times only."""
    import tilev4.bench.sustained as sustained

    monkeypatch.setattr(sustained.shutil, "which", lambda name: None)
    with sustained.ClockSampler() as sampler:
        assert not sampler.available and sampler.between(0.0, 2e9) == []
