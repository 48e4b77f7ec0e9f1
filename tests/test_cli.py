"""The command line works on a machine without a GPU."""

import subprocess
import sys

import torch

from tilev4.cli import info_rows, main


def test_info_rows_report_the_toolchain():
    rows = dict(info_rows())
    for key in ("GPU", "nvcc", "torch", "tilelang", "cache directory", "kernel arch", "registered kernels"):
        assert rows.get(key)
    if not torch.cuda.is_available():
        assert rows["GPU"].startswith("none")
    assert "rmsnorm" in rows["registered kernels"]


def test_info_says_when_the_kernel_arch_is_not_the_tested_one(monkeypatch):
    monkeypatch.setenv("TILEV4_ARCH", "sm_80")
    assert dict(info_rows())["kernel arch"].startswith("sm_80 (the kernels are written for and tested on sm_90a")
    monkeypatch.setenv("TILEV4_ARCH", "sm_90a")
    assert dict(info_rows())["kernel arch"] == "sm_90a"


def test_python_dash_m_info():
    out = subprocess.run([sys.executable, "-m", "tilev4", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "tilelang" in out.stdout and "cache directory" in out.stdout


def test_compile_one_kernel_cli():
    assert main(["compile", "--arch", "sm_90a", "--kernel", "rmsnorm", "--default-only", "--jobs", "1"]) == 0


def test_bad_input_is_a_message_and_exit_status_2(capsys, monkeypatch):
    """A ValueError of bad input (here an unknown kernel, a malformed $TILEV4_ARCH) ends the command with its message
    on stderr and status 2, not a traceback."""
    assert main(["compile", "--kernel", "nope"]) == 2
    assert "tilev4 compile: unknown kernel 'nope'; registered: " in capsys.readouterr().err
    monkeypatch.setenv("TILEV4_ARCH", "sm90")
    assert main(["info"]) == 2
    assert "tilev4 info: $TILEV4_ARCH must be a CUDA SM arch such as 'sm_90a'" in capsys.readouterr().err


def test_demo_runs_the_model_on_the_reference(capsys):
    assert main(["demo", "--skip-compile", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "tokens generated for 3 ragged prompts" in out
    assert "1,048,576" in out  # the KV-cache table


def test_recorded_kernels_compile_from_the_record(tmp_path, monkeypatch, capsys):
    """A run with TILEV4_RECORD_KERNELS lists what it compiled; ``compile --configs`` builds exactly that list."""
    from tilev4.kernels.registry import clear_kernel_memo, compile_kernel, recorded_jobs

    record = tmp_path / "kernels.jsonl"
    monkeypatch.setenv("TILEV4_RECORD_KERNELS", str(record))
    clear_kernel_memo()
    compile_kernel("rmsnorm", {"D": 512}, arch="sm_90a")
    compile_kernel("rmsnorm", {"D": 512}, arch="sm_90a")  # memo hit: recorded once
    compile_kernel("rmsnorm", {"D": 1024}, arch="sm_90a")
    monkeypatch.delenv("TILEV4_RECORD_KERNELS")
    assert recorded_jobs(record) == [("rmsnorm", {"D": 512}), ("rmsnorm", {"D": 1024})]
    assert main(["compile", "--arch", "sm_90a", "--configs", str(record), "--jobs", "1"]) == 0
    assert "2/2 ready for sm_90a" in capsys.readouterr().out
    record.write_text('{"kernel": "nope", "config": {}}\n')
    assert main(["compile", "--configs", str(record)]) == 2
    assert "unknown kernel 'nope'" in capsys.readouterr().out


def test_demo_builds_the_registry_before_generating(monkeypatch, capsys):
    """The README's main command: the demo's ahead-of-time step hands the whole registry to the compiler (the
    builds themselves are covered by the compile tests; here they are answered from a stand-in)."""
    from tilev4.autotune import tuner

    seen = []

    def fake_compile_jobs(jobs, arch, workers=2, on_done=None, timeout=0):
        outs = [tuner.CompileOutcome(n, dict(c), arch, "cached", 0.0, "") for n, c in jobs]
        seen.extend(jobs)
        for o in outs:
            if on_done:
                on_done(o)
        return outs

    monkeypatch.setattr(tuner, "compile_jobs", fake_compile_jobs)
    assert main(["demo", "--new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    from tilev4.kernels import iter_registry

    assert {n for n, _ in seen} == {k.name for k in iter_registry()}
    assert "ready for sm_90a" in out and "tokens generated for 3 ragged prompts" in out


def test_a_malformed_arch_is_a_usage_error(capsys):
    """``--arch`` is checked before anything is built or removed: argparse's usage error (exit 2) names it."""
    import pytest

    for argv in (["compile", "--arch", "sm_9x"], ["tune", "--compile-only", "--arch", "sm_9x"],
                 ["cache", "clear", "--arch", "sm_9x"], ["cache", "export", "x.tar.gz", "--arch", "sm_9x"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert "--arch must be a CUDA SM arch such as 'sm_90a' or 'sm_80', got 'sm_9x'" in capsys.readouterr().err
