"""The helper scripts under tools/ run (on the CPU here)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _assert_needs_gpu(script):
    """Without a GPU, ``script`` run with its defaults exits non-zero saying it needs one (skipped on a GPU machine)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the no-GPU message is for machines without one")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "needs a CUDA GPU" in run.stderr


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

    tool = str(ROOT / "tools" / "moe_schedules.py")
    run = subprocess.run([sys.executable, tool, "--kernels", "moe_up,moe_gate"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0 and "moe_gate" in run.stderr
    _assert_needs_gpu(tool)


def test_compressor_configs_checks_its_arguments():
    """The compressor config comparison (a GPU tool) names a bad --configs, and says when there is no GPU."""
    import torch

    tool = str(ROOT / "tools" / "compressor_configs.py")
    for bad in ("{not json", '{"schedule": "stream"}'):
        run = subprocess.run([sys.executable, tool, "--configs", bad], capture_output=True, text=True, timeout=300)
        assert run.returncode != 0 and "--configs" in run.stderr
    if torch.cuda.is_available():
        pytest.skip("the no-GPU message is for machines without one")
    run = subprocess.run([sys.executable, tool, "--variant", "128"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "needs a CUDA GPU" in run.stderr


def test_attention_walks_checks_its_arguments():
    """The attention walk A/B (a GPU tool) reads qtN / qtNo / pcN / pcsms walks, names a bad one, and says when there
    is no GPU to run on."""
    tool = _tool("attention_walks")
    assert tool.parse_walks("qt1, qt4,qt4o,pc132,pcsms", 114) == [
        ("qt1", {"query_tiles": 1}), ("qt4", {"query_tiles": 4}),
        ("qt4o", {"query_tiles": 4, "overlap_epilogue": True}), ("pc132", {"persistent_ctas": 132}),
        ("pcsms", {"persistent_ctas": 114})]
    for bad in ("qt0", "pc", "tiles4", "qt2,qt2", "pcsms", "qt16", "qt1o", "pc4o", "qto"):
        with pytest.raises(ValueError, match="--walks"):
            tool.parse_walks(bad, None)
    script = str(ROOT / "tools" / "attention_walks.py")
    run = subprocess.run([sys.executable, script, "--walks", "qt1,pcx"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "pcx" in run.stderr
    run = subprocess.run([sys.executable, script, "--queries", "0"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "--queries" in run.stderr
    _assert_needs_gpu(script)


def test_decode_splits_checks_its_arguments():
    """The decode split-size comparison (a GPU tool) names a bad --split-keys / --batches / --topk / --queries and a
    --shared-keys without two csa queries a sequence, counts a row's key blocks as the benchmark's inputs have them,
    and says when there is no GPU to run on."""

    tool = _tool("decode_splits")
    assert tool.key_blocks("csa", 512) == 10 and tool.key_blocks("hca", 512) == 18
    script = str(ROOT / "tools" / "decode_splits.py")
    for flag, bad in (("--split-keys", "96"), ("--split-keys", "32"), ("--batches", "0"), ("--topk", "100"),
                      ("--queries", "3")):
        run = subprocess.run([sys.executable, script, flag, bad], capture_output=True, text=True, timeout=300)
        assert run.returncode != 0 and flag in run.stderr, run.stderr
    run = subprocess.run([sys.executable, script, "--shared-keys"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "--shared-keys needs --variant csa and --queries 2" in run.stderr, run.stderr
    _assert_needs_gpu(script)


def test_decode_cold_code_checks_its_arguments():
    """The cold-code probe of the decode program (a GPU tool) names a bad --batches / --topk / --rounds and says
    when there is no GPU to run on."""
    script = str(ROOT / "tools" / "decode_cold_code.py")
    for flag, bad in (("--batches", "0"), ("--topk", "100"), ("--rounds", "0")):
        run = subprocess.run([sys.executable, script, flag, bad], capture_output=True, text=True, timeout=300)
        assert run.returncode != 0 and flag in run.stderr, run.stderr
    _assert_needs_gpu(script)


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


def _tool(name):
    """tools/<name>.py as a module (the tool directory is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timeline_tool():
    return _tool("attention_timeline")


def test_attention_timeline_instruments_the_seesaw_program():
    """The timeline tool's copy of the codegen takes a [CTAs, 16] int64 stamp argument and writes every column of
    it (its anchors still match tilev4/dsl/codegen.py); the registry's program is unchanged (no stamp argument)."""
    from tilev4.dsl.codegen import AttentionConfig, build_main_program
    from tilev4.kernels.attention import variant_spec

    tool = _timeline_tool()
    cg = tool.instrumented_codegen()
    prog = cg.build_main_program(variant_spec("csa", 64), cg.AttentionConfig(), split=False)
    assert prog.buffer_map[prog.params[-1]].name == "dbg"
    written = set(re.findall(r"dbg\[rr, (\d+)\] = T\.call_extern", prog.script()))
    assert written == {str(i) for i in range(16)}
    plain = build_main_program(variant_spec("csa", 64), AttentionConfig(), split=False)
    assert "tv4_clock" not in plain.script() and "dbg" not in [plain.buffer_map[p].name for p in plain.params]


def test_attention_timeline_instruments_the_split_program():
    """``--split-keys``: the split program gets the stamp argument too (every column but the two staging stamps: a
    split CTA stores its fp32 partial from registers), and a decode row of 128 + 512 keys (10 blocks) needs 2 splits
    of 320 keys and 3 of 256."""
    import torch

    from tilev4.kernels.attention import variant_spec

    tool = _timeline_tool()
    cg = tool.instrumented_codegen()
    spec = variant_spec("csa", 64, ring=True)
    prog = cg.build_main_program(spec, cg.AttentionConfig(split_keys=320), split=True)
    assert prog.buffer_map[prog.params[-1]].name == "dbg"
    written = set(re.findall(r"dbg\[rr, (\d+)\] = T\.call_extern", prog.script()))
    staged = {str(tool.COLUMNS.index(n)) for n in ("staged_0", "staged_1")}
    assert written == {str(i) for i in range(16)} - staged
    # the decode inputs' shapes (q, positions, sink, window ring, compressed cache, indices), on the CPU
    args = [torch.empty(64, 1, 64, 512), torch.empty(64, 1, dtype=torch.int32), torch.empty(64),
            torch.empty(64, 128, 512), torch.empty(64, 32768, 512, dtype=torch.bfloat16),
            torch.empty(64, 1, 512, dtype=torch.int32)]
    assert tool._num_splits("decode64", 320, args) == 2
    assert tool._num_splits("decode64", 256, args) == 3
    args[-1] = torch.empty(64, 1, 1024, dtype=torch.int32)  # 18 blocks: read from the index list, not the cache
    assert tool._num_splits("decode64", 320, args) == 4


def test_attention_timeline_fails_loudly_when_the_codegen_moved(tmp_path, monkeypatch):
    tool = _timeline_tool()
    moved = tmp_path / "codegen.py"
    fin = "            T.barrier_wait(fin, 0)\n"
    moved.write_text(tool.CODEGEN.read_text().replace(fin, fin.rstrip() + "  # moved\n"))
    monkeypatch.setattr(tool, "CODEGEN", moved)
    with pytest.raises(RuntimeError, match="row-sum barrier"):
        tool.instrumented_codegen()


def test_attention_timeline_summarizes_a_stamp_table():
    """The medians of the intervals and the gap between two CTAs on one SM, on a hand-made stamp table."""
    import torch

    tool = _timeline_tool()
    rows = []
    for k in range(2):  # two CTAs on SM 3, one after the other (globaltimer ns: 0..1000, then 1300..2300)
        r = [0] * 16
        c = {n: i for i, n in enumerate(tool.COLUMNS)}
        r[c["gtime_start"]], r[c["gtime_end"]], r[c["smid"]] = 1300 * k, 1300 * k + 1000, 3
        for name, cyc in (("start", 0), ("q_ready", 100), ("first_block", 150), ("loop_end_0", 1150),
                          ("fin_0", 1170), ("staged_0", 1270), ("store_end_0", 1400), ("loop_end_1", 1160),
                          ("store_end_1", 1390), ("producer_start", 20), ("producer_end", 1000)):
            r[c[name]] = 5000 * k + cyc
        rows.append(r)
    s = tool.summarize(torch.tensor(rows, dtype=torch.int64))
    assert s["ctas"] == 2 and s["q_ready"] == 100 and s["first_block"] == 150 and s["key_loop"] == 1000
    assert s["fin_wait_0"] == 20 and s["stage_0"] == 100 and s["store_0"] == 130 and s["epilogue_1"] == 230
    assert s["cta"] == 1400 and s["producer"] == 980 and s["cta_ns"] == 1000 and s["span_ns"] == 2300
    assert s["sm_gap_ns"] == 300


def _merge_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("merge_tune_report", ROOT / "tools" / "merge_tune_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_merge_tune_report_replaces_only_the_retuned_kernels(tmp_path):
    gpu = {"name": "NVIDIA H200", "sm_count": 132}
    rec = lambda k, h: {"key": {"kernel": k, "source_hash": h}, "winner_median_ms": 1.0}  # noqa: E731
    base = {"gpu": gpu, "records": [rec("a", "old"), rec("a", "older"), rec("b", "x")],
            "kernels": {"a": [{"bucket": "1"}], "b": [{"bucket": "2"}]}, "retuned": []}
    new = {"gpu": gpu, "records": [rec("a", "new")], "kernels": {"a": [{"bucket": "1", "tuned": True}]},
           "compile": {"configs": 1}, "date": "2026-11-30", "seconds": {"total": 1.0}}
    path, new_path = tmp_path / "base.json", tmp_path / "new.json"
    path.write_text(json.dumps(base))
    new_path.write_text(json.dumps(new))
    assert _merge_tool().main([str(path), str(new_path), "--commit", "c", "--reason", "r"]) == 0
    out = json.loads(path.read_text())
    assert [(r["key"]["kernel"], r["key"]["source_hash"]) for r in out["records"]] == [("b", "x"), ("a", "new")]
    assert out["kernels"] == {"a": [{"bucket": "1", "tuned": True}], "b": [{"bucket": "2"}]}
    assert out["retuned"][-1]["kernels"] == ["a"] and out["retuned"][-1]["commit"] == "c"
    try:
        _merge_tool().merge(out, dict(new, gpu={"name": "other"}), "c", "r")
    except ValueError as e:
        assert "different GPUs" in str(e)
    else:
        raise AssertionError("reports of two GPUs were merged")


def _ab_tool():
    return _tool("attention_ab")


def test_attention_ab_loads_a_base_codegen_as_its_own_module(tmp_path):
    """A copy of the codegen loads as a separate module and builds the same program as the package's; an edited
    copy builds a different one."""
    from tilelang import tvm

    import tilev4.dsl.codegen as current
    from tilev4.kernels.attention import variant_spec

    tool = _ab_tool()
    spec = variant_spec("hca", 64)
    base = tmp_path / "codegen.py"
    base.write_text((ROOT / "tilev4" / "dsl" / "codegen.py").read_text())
    cg = tool.load_codegen(base)
    assert cg is not current and cg.__name__ != current.__name__
    same = cg.build_main_program(spec, cg.AttentionConfig(), split=False)
    ref = current.build_main_program(spec, current.AttentionConfig(), split=False)
    assert tvm.ir.structural_equal(same, ref, map_free_vars=True)
    edited = tmp_path / "codegen_edited.py"
    edited.write_text(base.read_text().replace("NEG_BIG = -1.0e30", "NEG_BIG = -2.0e30"))
    other = tool.load_codegen(edited).build_main_program(spec, cg.AttentionConfig(), split=False)
    assert not tvm.ir.structural_equal(other, ref, map_free_vars=True)


def test_attention_ab_rejects_a_missing_base(tmp_path):
    tool = _ab_tool()
    with pytest.raises(SystemExit):
        tool.main(["--base", str(tmp_path / "nope.py"), "--build-only"])


def test_attention_ab_new_config_is_parsed_and_checked():
    tool = _ab_tool()
    assert tool.parse_config("block_kv=32,pair_stages=2") == {"block_kv": 32, "pair_stages": 2}
    assert tool.parse_config("schedule=ws") == {"schedule": "ws"}
    assert tool.parse_config("query_tiles=8,overlap_epilogue=true") == {"query_tiles": 8, "overlap_epilogue": True}
    for text, msg in (("block_kv", "not KEY=VALUE"), ("foo=1", "'foo' is not an AttentionConfig field"),
                      ("block_kv=33", "multiple of 16"), ("pair_stages=3", "pair_stages must be 1 or 2"),
                      ("overlap_epilogue=True", "needs query_tiles > 1")):
        with pytest.raises(ValueError, match=msg):
            tool.parse_config(text)


def test_attention_ab_rejects_a_bad_new_config_or_spread_outside_decode(tmp_path, capsys):
    tool = _ab_tool()
    base = tmp_path / "codegen.py"
    base.write_text((ROOT / "tilev4" / "dsl" / "codegen.py").read_text())
    for argv, msg in ((["--new-config", "block_kv=33", "--case", "decode64"], "--new-config: block_kv"),
                      (["--spread-positions", "--case", "csa64"], "--spread-positions: only the decode case")):
        with pytest.raises(SystemExit):
            tool.main(["--base", str(base), "--build-only", *argv])
        assert msg in capsys.readouterr().err


def test_attention_ab_spread_positions_covers_every_ring_phase():
    import torch

    tool = _ab_tool()
    pos = torch.full((64, 1), 131071, dtype=torch.int32)
    out = tool.spread_positions(pos)
    assert out is pos and out.dtype == torch.int32
    assert out[0, 0] == 131071 and out[1, 0] == 131071 - 37 and out[4, 0] == 131071 - (4 * 37) % 128
    phases = {int(p) % 128 for p in out[:, 0]}
    assert len(phases) == 64  # 37 is odd: 64 sequences take 64 distinct phases of the 128-row ring


def test_attention_ab_rejects_a_bad_walk(tmp_path, capsys):
    tool = _ab_tool()
    base = tmp_path / "codegen.py"
    base.write_text((ROOT / "tilev4" / "dsl" / "codegen.py").read_text())
    for walk in ("qt0", "xy4", "qt2,qt4"):
        with pytest.raises(SystemExit):
            tool.main(["--base", str(base), "--walk", walk, "--build-only"])
        err = capsys.readouterr().err
        assert "--walk: " in err and repr(walk) in err


def test_attention_ab_walks_per_case_and_variant_labels(tmp_path, capsys):
    tool = _ab_tool()
    cases = ["csa64", "csa128", "hca64"]
    assert tool.parse_case_walks("qt2", cases) == {c: {"query_tiles": 2} for c in cases}
    assert tool.parse_case_walks("csa64=qt2, hca64=pc132, decode64=qt4", cases) == {
        "csa64": {"query_tiles": 2}, "csa128": {}, "hca64": {"persistent_ctas": 132}}
    for text, msg in (("csa64=qt2,foo=qt4", "'foo=qt4' is not CASE=WALK"), ("csa64=qt0", "'qt0' is not qtN"),
                      ("csa64=qt2,qt4", "'qt4' is not CASE=WALK")):
        with pytest.raises(ValueError, match=msg):
            tool.parse_case_walks(text, cases)
    assert tool.variant_labels([None]) == ["new"]
    assert tool.variant_labels(["/a/vA.py", "/b/vB.py", "/c/vA.py", "/d/base.py"]) == ["vA", "vB", "vA_2", "base_3"]
    base = tmp_path / "codegen.py"
    base.write_text((ROOT / "tilev4" / "dsl" / "codegen.py").read_text())
    with pytest.raises(SystemExit):
        tool.main(["--base", str(base), "--new", str(base), "--new", str(tmp_path / "nope.py"), "--build-only"])
    assert "--new: no such file" in capsys.readouterr().err


def test_attention_ptxas_parses_resources_advisories_and_sass():
    tool = _tool("attention_ptxas")
    text = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
            "ptxas /tmp/k.ptx, line 812; warning : Potential Performance Loss: wgmma.mma_async instructions are "
            "serialized due to ... (C7515)\n"
            "ptxas info    : Function properties for k\n"
            "    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
            "ptxas info    : Used 168 registers, used 10 barriers, 1024 bytes smem\n")
    rep = tool.parse_ptxas(text)
    assert (rep["registers"], rep["stack_frame"], rep["spill_stores"], rep["spill_loads"]) == (168, 8, 8, 4)
    assert len(rep["advisories"]) == 1 and "C7515" in rep["advisories"][0]
    with pytest.raises(ValueError, match="no ptxas resource line"):
        tool.parse_ptxas("nvcc: nothing compiled\n")
    sass = ("        /*0a10*/   HGMMA.64x64x16.F32.BF16 R152, gdesc[UR8], RZ, !UPT ;\n"
            "        /*0a20*/   HGMMA.64x256x16.F32.BF16 R24, R184, gdesc[UR4].tnspB, R24 ;\n"
            "        /*0a30*/   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;\n"
            "        /*0a40*/   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;\n"
            "        /*0a50*/   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;\n")
    assert tool.sass_counts(sass) == {"hgmma_64x256x16": 1, "hgmma_64x64x16": 1, "wgmma_wait_0": 2,
                                      "wgmma_wait_1": 1}


@pytest.mark.parametrize("case,walk", [("csa64", "qt2"), ("csa128", None), ("hca64", "qt8"), ("decode64", None)])
def test_attention_ptxas_the_shipped_seesaw_programs_neither_spill_nor_serialise(case, walk, capsys):
    """The benchmark rows' programs at the walks the ops launch for them (V4-Flash and V4-Pro CSA prefill, HCA
    prefill, V4-Flash decode), compiled by nvcc for sm_90a: no spill and no wgmma advisory (ptxas serialises every
    wgmma of a program it warns about, silently slowing it down)."""
    tool = _tool("attention_ptxas")
    rc = tool.main(["--case", case] + (["--walk", walk] if walk else []))
    rep = json.loads(capsys.readouterr().out)
    assert rep["registers"] <= 168
    assert (rep["spill_stores"], rep["spill_loads"], rep["advisories"]) == (0, 0, [])
    assert rc == 0


def test_moe_ab_cases_and_versions(tmp_path):
    """The MoE GEMM A/B parses its cases, rejects bad ones and missing files, and builds the same ws programs from a
    copy of the module as from the package (an edited copy: different ones)."""
    from tilelang import tvm

    tool = _tool("moe_ab")
    assert tool.parse_case("skewed8192") == ("skewed", 8192)
    assert tool.parse_case("balanced192") == ("balanced", 192)
    for bad in ("balanced100", "skewed0", "uniform64", "skewed"):
        with pytest.raises(ValueError, match="case"):
            tool.parse_case(bad)
    with pytest.raises(SystemExit):
        tool.main(["--base", str(tmp_path / "nope.py"), "--build-only"])
    with pytest.raises(SystemExit):
        tool.main(["--base", str(ROOT / "tilev4" / "kernels" / "moe_ws.py"), "--case", "balanced100", "--build-only"])
    base = tmp_path / "moe_ws.py"
    base.write_text((ROOT / "tilev4" / "kernels" / "moe_ws.py").read_text())
    for table in (128, 192):
        ref, copy = tool.programs(None, table), tool.programs(str(base), table)
        for a, b in zip(ref, copy):
            assert tvm.ir.structural_equal(a, b, map_free_vars=True)
    edited = tmp_path / "edited.py"
    edited.write_text(base.read_text().replace("PART_ROWS = 8 ", "PART_ROWS = 16 "))
    up_ref, _ = tool.programs(None, 192)
    up_edit, _ = tool.programs(str(edited), 192)
    assert not tvm.ir.structural_equal(up_edit, up_ref, map_free_vars=True)
    # --format fp8: a copy of moe_fp8.py loads beside the package's (its registrations skipped) and builds the FP8
    # path's programs as the package does
    fp8 = tmp_path / "moe_fp8.py"
    fp8.write_text((ROOT / "tilev4" / "kernels" / "moe_fp8.py").read_text())
    for a, b in zip(tool.programs(None, 128, "fp8"), tool.programs(str(fp8), 128, "fp8")):
        assert tvm.ir.structural_equal(a, b, map_free_vars=True)
    with pytest.raises(SystemExit):
        tool.main(["--base", str(fp8), "--format", "fp4", "--build-only"])


def test_moe_pad_probe_aligns_each_expert_to_whole_slabs():
    """The padding probe's one-slot routing: every expert's rows rounded up to a multiple of 64 with padding rows
    (zeros and weight 0, or random), the pairs first in (token, slot) order."""
    import torch

    probe = _tool("moe_pad_probe")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16).bfloat16()
    experts = torch.tensor([[0, 2], [2, 3], [0, 2], [3, 0], [2, 0]], dtype=torch.int32)
    weights = torch.rand(5, 2)
    xs, ws, es, pairs = probe.aligned_inputs(x, weights, experts, 4, True, g)
    counts = torch.bincount(es.view(-1).long(), minlength=4)
    assert counts.tolist() == [64, 0, 64, 64]
    assert torch.equal(xs[:10], x.repeat_interleave(2, dim=0)) and not xs[10:].any()
    assert torch.equal(ws[:10, 0], weights.view(-1)) and not ws[10:].any()
    assert torch.equal(es[:10, 0], experts.view(-1)) and torch.equal(pairs, torch.arange(10))
    xr, wr, _, _ = probe.aligned_inputs(x, weights, experts, 4, False, g)
    assert xr[10:].abs().sum() > 0 and (wr[10:] > 0).all()


def test_moe_skew_checks_its_bias_scales():
    """The routing-skew sweep (a GPU tool) names a bad scale list, and says when there is no GPU to run on."""
    tool = str(ROOT / "tools" / "moe_skew.py")
    for bad in ("0,x", "-1", "inf", ","):
        run = subprocess.run([sys.executable, tool, "--bias-scales", bad], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 2 and "--bias-scales must" in run.stderr and repr(bad) in run.stderr
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from moe_skew import parse_rows, parse_scales
    finally:
        sys.path.pop(0)
    assert parse_scales("0, 0.5,1") == [0.0, 0.5, 1.0]
    for bad in ("129,x", "0", "128"):  # 128 rows an expert: 128·256/6 is not a whole number of tokens
        run = subprocess.run([sys.executable, tool, "--balanced-rows", bad], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 2 and "--balanced-rows must" in run.stderr and repr(bad) in run.stderr
    assert parse_rows("129, 192") == [129, 192]
    _assert_needs_gpu(tool)


def test_moe_swap_probe_checks_its_rows_and_builds_for_sm90a(tmp_path, monkeypatch):
    """The swapped up-projection probe (a GPU tool) names bad rows, rounds an expert's rows up to 16 for the wgmma's
    N, lowers and compiles its program for sm_90a here (two N), and says when there is no GPU to run on."""
    tool = str(ROOT / "tools" / "moe_swap_probe.py")
    for bad in ("150,x", "0", "193", "151"):
        run = subprocess.run([sys.executable, tool, "--rows", bad], capture_output=True, text=True, timeout=300)
        assert run.returncode == 2 and "--rows must" in run.stderr and repr(bad) in run.stderr
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from moe_swap_probe import parse_rows, swap_n
    finally:
        sys.path.pop(0)
    assert parse_rows("150, 192") == [150, 192]
    assert [swap_n(r) for r in (3, 16, 17, 150, 192)] == [16, 16, 32, 160, 192]
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path))
    run = subprocess.run([sys.executable, tool, "--rows", "96,192", "--build-only", "--arch", "sm_90a"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "built N=96" in run.stdout and "built N=192" in run.stdout
    _assert_needs_gpu(tool)


def test_clock_probe_names_bad_workloads():
    """The clock probe (a GPU tool) names an unknown workload or a bad duration, and says when there is no GPU to run
    on (its sampling and parsing are :mod:`tilev4.bench.sustained`'s, tested in ``test_bench_table.py``)."""
    tool = str(ROOT / "tools" / "clock_probe.py")
    for bad in ("matmul,foo", ",", "MoE"):
        run = subprocess.run([sys.executable, tool, "--workloads", bad], capture_output=True, text=True, timeout=300)
        assert run.returncode == 2 and "--workloads must" in run.stderr and repr(bad) in run.stderr
    run = subprocess.run([sys.executable, tool, "--seconds", "0"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--seconds must be > 0" in run.stderr
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from clock_probe import parse_workloads
    finally:
        sys.path.pop(0)
    assert parse_workloads("matmul, moe,matmul") == ["matmul", "moe", "matmul"]
    _assert_needs_gpu(tool)


def test_fp4_layout_ab_checks_its_arguments():
    script = ROOT / "tools" / "fp4_layout_ab.py"
    bad_args = ((["--tokens", "64,x"], "--tokens"), (["--tokens", "0"], "--tokens"), (["--rounds", "0"], "--rounds"))
    for bad, flag in bad_args:
        run = subprocess.run([sys.executable, str(script), *bad], capture_output=True, text=True, timeout=300)
        assert run.returncode == 2 and flag in run.stderr, run.stderr
    _assert_needs_gpu(script)


def test_wip_patches_apply_to_the_tree():
    """Every measured-but-not-applied program under tools/wip/ is a patch that still applies to this tree (a refactor
    of the files it touches must regenerate it)."""
    patches = sorted((ROOT / "tools" / "wip").glob("*/*.patch"))
    assert patches
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for p in patches:
        run = subprocess.run(["git", "apply", "--check", str(p)], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, f"{p.relative_to(ROOT)}: {run.stderr}"
