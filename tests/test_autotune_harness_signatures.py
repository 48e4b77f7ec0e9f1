"""Every tuning harness hands its kernel arguments that match the kernel's signature (count, rank, dtype).

The tuner launches ``kernel(*case.args)`` on the GPU only; a harness that orders its tensors differently from
the kernel fails there for every candidate. Here each registry harness's case (built on the CPU) is checked
against the TileLang program's buffer parameters, without a GPU.
"""

import pytest
import torch

from tilev4.kernels import get_kernel_def, iter_registry

_TUNED = [k.name for k in iter_registry() if k.space is not None and k.harness is not None]

_DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int32": torch.int32,
    "int64": torch.int64, "uint8": torch.uint8, "int8": torch.int8, "float8_e4m3": torch.float8_e4m3fn,
    "float8_e4m3fn": torch.float8_e4m3fn, "bool": torch.bool,
}


@pytest.mark.parametrize("name", _TUNED)
def test_harness_arguments_match_the_kernel_signature(name):
    kdef = get_kernel_def(name)
    for cfg in kdef.configs:
        problem = kdef.problem(cfg)
        full = {**problem, **kdef.heuristic(problem)}
        prim = kdef.builder(**full)
        params = [prim.buffer_map.get(p) for p in prim.params]
        case = kdef.harness.make_case(problem, 8, torch.Generator().manual_seed(0), "cpu", False)
        assert len(case.args) == len(params), (name, cfg, len(case.args), len(params))
        for i, (arg, buf) in enumerate(zip(case.args, params)):
            if buf is None:  # a scalar parameter
                assert not isinstance(arg, torch.Tensor), (name, cfg, i)
                continue
            assert isinstance(arg, torch.Tensor), (name, cfg, i, buf.name)
            assert arg.dim() == len(buf.shape), (name, cfg, i, buf.name, arg.shape, buf.shape)
            want = _DTYPES.get(str(buf.dtype))
            assert want is None or arg.dtype == want, (name, cfg, i, buf.name, arg.dtype, buf.dtype)
