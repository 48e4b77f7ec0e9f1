"""The DSL variants in examples/custom_attention.py against their torch references (GPU)."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
O_TOL = {"atol": 1e-2, "rtol": 1e-2}  # bf16 P before P·V and bf16 output: see test_attention_gpu.py


def _example():
    path = Path(__file__).resolve().parent.parent / "examples" / "custom_attention.py"
    spec = importlib.util.spec_from_file_location("custom_attention", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("heads", [16, 64])
def test_alibi_window(heads):
    ex = _example()
    g = torch.Generator(device="cuda").manual_seed(heads)
    b, s, d, n, w = 2, 40, 512, 300, 128
    q = torch.randn(b, s, heads, d, generator=g, device="cuda").bfloat16()
    kv = torch.randn(b, n, d, generator=g, device="cuda").bfloat16()
    start = torch.tensor([0, 100], dtype=torch.int32, device="cuda")
    positions = start.view(-1, 1) + 150 + torch.arange(s, device="cuda", dtype=torch.int32)
    positions[0, :5] = torch.arange(5, device="cuda")  # queries whose window is cut by the stream start
    out = torch.full_like(q, float("nan"))
    o = ex.alibi_window_attention(heads, w)(q, positions.contiguous(), window_kv=kv, window_start=start, out=out)
    ref = ex.alibi_window_reference(q.cpu(), kv.cpu(), positions.cpu(), start.cpu(), w)
    assert not torch.isnan(o).any()
    torch.testing.assert_close(o.float().cpu(), ref, **O_TOL)


@pytest.mark.parametrize("heads", [16, 64])
def test_selected_blocks(heads):
    ex = _example()
    g = torch.Generator(device="cuda").manual_seed(100 + heads)
    b, s, d, n = 2, 24, 512, 1024
    q = torch.randn(b, s, heads, d, generator=g, device="cuda").bfloat16()
    kv = torch.randn(b, n, d, generator=g, device="cuda").bfloat16()
    positions = torch.randint(0, n, (b, s), generator=g, device="cuda", dtype=torch.int32)
    sel = torch.randint(-1, n // 64, (b, s, 5), generator=g, device="cuda", dtype=torch.int32)
    sel[:, :, 0] = positions // 64  # the query's own block: its future half is masked
    sink = torch.randn(heads, generator=g, device="cuda")
    out = torch.full_like(q, float("nan"))
    o = ex.selected_block_attention(heads)(q, positions, sink, blocks_kv=kv, blocks_idx=sel, out=out)
    ref = ex.selected_block_reference(q.cpu(), kv.cpu(), sel.cpu(), positions.cpu(), sink.cpu())
    assert not torch.isnan(o).any()
    torch.testing.assert_close(o.float().cpu(), ref, **O_TOL)
