"""Compressor kernels without a GPU: registry entries, input validation, and what the generated CUDA must hold."""

import pytest
import torch

import tilev4
from tilev4.kernels import DEFAULT_AOT_ARCH, compile_kernel, get_kernel_def
from tilev4.kernels.compressor import (
    build_compressor_decode,
    build_compressor_prefill,
    compress_decode,
    compress_prefill,
)
from tilev4.reference.compressor import CompressorState
from tilev4.reference.rope import RopeConfig

SHIPPED = [{"ratio": 4, "D": 512, "quant": "attention"}, {"ratio": 128, "D": 512, "quant": "attention"},
           {"ratio": 4, "D": 128, "quant": "indexer"}]


def test_public_ops_are_exported():
    assert tilev4.compress_prefill is compress_prefill and tilev4.compress_decode is compress_decode


@pytest.mark.parametrize("name", ["compressor_prefill", "compressor_decode"])
def test_registry_entries(name):
    kdef = get_kernel_def(name)
    assert [dict(c) for c in kdef.configs] == SHIPPED
    assert kdef.batch_invariant and kdef.summary


@pytest.mark.parametrize("build", [build_compressor_prefill, build_compressor_decode])
def test_factory_rejects_bad_configs(build):
    with pytest.raises(ValueError, match="ratio must be one of"):
        build(ratio=8, D=512, quant="attention")
    with pytest.raises(ValueError, match="D must be a power of two"):
        build(ratio=4, D=384, quant="none")
    with pytest.raises(ValueError, match="quant must be one of"):
        build(ratio=4, D=512, quant="fp8")
    with pytest.raises(ValueError, match="quant='attention' needs"):
        build(ratio=4, D=64, quant="attention")
    with pytest.raises(ValueError, match="in_dtype/out_dtype"):
        build(ratio=4, D=512, quant="attention", in_dtype="float16")


def _args(b=2, n=9, ratio=4, d=128):
    c = (2 if ratio == 4 else 1) * d
    kv = torch.randn(b, n, c).bfloat16()
    gate = torch.randn(b, n, c).bfloat16()
    ape = torch.randn(ratio, c)
    weight = torch.rand(d) + 0.5
    cache = torch.zeros(b, n // ratio + 1, d, dtype=torch.bfloat16)
    return kv, gate, ape, weight, cache


def test_prefill_bad_inputs_raise_with_the_argument_named():
    kv, gate, ape, weight, cache = _args()
    with pytest.raises(ValueError, match=r"ratio must be one of \[4, 128\], got 8"):
        compress_prefill(kv, gate, ape, weight, cache, 8, quant="indexer")
    with pytest.raises(ValueError, match="quant must be 'attention', 'indexer' or None, got 'fp8'"):
        compress_prefill(kv, gate, ape, weight, cache, 4, quant="fp8")
    with pytest.raises(ValueError, match=r"quant='attention' needs .*got D=64"):
        compress_prefill(*_args(d=64), 4, quant="attention")
    with pytest.raises(TypeError, match="kv must be bfloat16 or float32, got float16"):
        compress_prefill(kv.half(), gate, ape, weight, cache, 4, quant="indexer")
    with pytest.raises(TypeError, match="gate must be bfloat16, got float32"):
        compress_prefill(kv, gate.float(), ape, weight, cache, 4, quant="indexer")
    with pytest.raises(ValueError, match=r"kv must have last dimension coff\*D=256 for ratio 4, got 128"):
        compress_prefill(kv[..., :128].contiguous(), gate, ape, weight, cache, 4, quant="indexer")
    with pytest.raises(ValueError, match=r"gate must have shape \[2, 9, 256\], got \[2, 8, 256\]"):
        compress_prefill(kv, gate[:, :8].contiguous(), ape, weight, cache, 4, quant="indexer")
    with pytest.raises(ValueError, match=r"ape must have shape \[4, 256\]"):
        compress_prefill(kv, gate, ape[:3], weight, cache, 4, quant="indexer")
    with pytest.raises(TypeError, match="norm_weight must be float32, got bfloat16"):
        compress_prefill(kv, gate, ape, weight.bfloat16(), cache, 4, quant="indexer")
    with pytest.raises(ValueError, match="D must be a power of two in \\[64, 1024\\], got D=96"):
        compress_prefill(kv, gate, ape, weight[:96], cache, 4, quant="indexer")
    with pytest.raises(ValueError, match=r"cache must have shape \[b, n_c, D=128\], got \[2, 3, 64\]"):
        compress_prefill(kv, gate, ape, weight, cache[..., :64].contiguous(), 4, quant="indexer")
    with pytest.raises(ValueError, match=r"cache must have shape \[b=2, n_c, 128\], got \[1, 3, 128\]"):
        compress_prefill(kv, gate, ape, weight, cache[:1], 4, quant="indexer")
    with pytest.raises(TypeError, match="cache must be bfloat16 or float32, got float16"):
        compress_prefill(kv, gate, ape, weight, cache.half(), 4, quant="indexer")
    with pytest.raises(ValueError, match="kv must be contiguous"):
        compress_prefill(kv.transpose(0, 1), gate, ape, weight, cache, 4, quant="indexer")
    with pytest.raises(TypeError, match="rope must be a RopeConfig"):
        compress_prefill(kv, gate, ape, weight, cache, 4, quant="indexer", rope="yarn")
    with pytest.raises(ValueError, match=r"rope\.rope_dim must be a multiple of 8"):
        compress_prefill(kv, gate, ape, weight, cache, 4, quant="indexer", rope=RopeConfig(rope_dim=12))
    with pytest.raises(ValueError, match="kv must be a CUDA tensor, got device cpu"):
        compress_prefill(kv, gate, ape, weight, cache, 4, quant="indexer")


def test_decode_bad_inputs_raise_with_the_argument_named():
    kv, gate, ape, weight, cache = _args()
    kv, gate = kv[:, 0].contiguous(), gate[:, 0].contiguous()
    state = CompressorState.empty(2, 4, 128)
    with pytest.raises(ValueError, match=r"gate must have shape \[2, 256\], got \[1, 256\]"):
        compress_decode(kv, gate[:1], ape, weight, cache, state, 4, quant="indexer")
    with pytest.raises(ValueError, match="kv must have 2 dimensions"):
        compress_decode(kv[None], gate, ape, weight, cache, state, 4, quant="indexer")
    with pytest.raises(TypeError, match="state must be a CompressorState, got NoneType"):
        compress_decode(kv, gate, ape, weight, cache, None, 4, quant="indexer")
    with pytest.raises(ValueError, match="kv must be a CUDA tensor"):
        compress_decode(kv, gate, ape, weight, cache, state, 4, quant="indexer")
    with pytest.raises(ValueError, match=r"ape must have shape \[128, 128\]"):
        compress_decode(kv, gate, ape, weight, cache, CompressorState.empty(2, 128, 128), 128, quant="indexer")


def test_misaligned_tensors_are_rejected():
    from tilev4.kernels.compressor import _check_aligned

    x = torch.zeros(2, 256)
    _check_aligned(x=x, rows=x[1:], none=None)
    with pytest.raises(ValueError, match=r"y must start at a 16-byte aligned address, got data_ptr\(\) % 16 = 4"):
        _check_aligned(y=x.view(-1)[1:])


def test_state_is_validated():
    from tilev4.kernels.compressor import _check_state

    state = CompressorState.empty(2, 4, 128)
    assert _check_state(state, 2, 4, 256, torch.device("cpu")) is state
    with pytest.raises(ValueError, match=r"state.kv must have shape \[3, 4, 256\], got \[2, 4, 256\]"):
        _check_state(state, 3, 4, 256, torch.device("cpu"))
    bad = CompressorState(state.kv, state.score, state.prev_kv, state.prev_score, state.num_tokens.int())
    with pytest.raises(TypeError, match=r"state\.num_tokens must be int64, got int32"):
        _check_state(bad, 2, 4, 256, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"state\.kv must be on cuda"):
        _check_state(state, 2, 4, 256, torch.device("cuda"))
    m128 = CompressorState.empty(2, 128, 128)
    with_prev = CompressorState(m128.kv, m128.score, m128.kv, m128.score, m128.num_tokens)
    with pytest.raises(ValueError, match="must be None for ratio 128"):
        _check_state(with_prev, 2, 128, 128, torch.device("cpu"))


@pytest.mark.compile
@pytest.mark.parametrize("name", ["compressor_prefill", "compressor_decode"])
def test_generated_cuda(name):
    """The pooling's exponentials on the MUFU (ex2.approx.ftz, the same instruction in prefill and decode) and
    no other fast math (accurate sqrtf, sincosf, no __expf), warp shuffles for the block maxima, rmsnorm
    sums, RoPE angles and Hadamard butterflies, exact RNE for FP4 (nearbyintf), an FP8 conversion, and every
    state write in the decode step."""
    attention = compile_kernel(name, SHIPPED[0], DEFAULT_AOT_ARCH).get_kernel_source()
    indexer = compile_kernel(name, SHIPPED[2], DEFAULT_AOT_ARCH).get_kernel_source()
    for src in (attention, indexer):
        assert "ex2.approx.ftz.f32" in src and "tilev4_ex2(" in src and "__expf" not in src
        assert "__shfl_xor_sync" in src and "__shfl_sync" in src and "sqrtf(" in src
        assert "rsqrtf" not in src and "sincosf(" in src and "tilev4_sincos(" in src
        assert "__cosf" not in src and "__sinf" not in src and "__sincosf" not in src
    assert "fp8_e4_t" in attention and "nearbyintf" in indexer
    if name == "compressor_decode":
        for buf in ("st_kv", "st_score", "st_pkv", "st_pscore", "num_tokens"):
            assert f"{buf}[" in indexer or f"({buf} +" in indexer, buf
