"""Argument validation shared by the reference ops and the kernel wrappers.

Every public op validates its inputs with these helpers so that bad input raises a
``TypeError`` (wrong type or dtype) or a ``ValueError`` (wrong shape, device, stride or
value) that names the argument and the value seen, instead of failing inside a kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "capturing",
    "check_aligned",
    "check_dtype",
    "check_int",
    "check_same_device",
    "check_shape",
    "check_tensor",
]


def capturing() -> bool:
    """True while the current CUDA stream records a graph. Checks that read tensor VALUES (a host sync:
    ``int(t.min())``, ``t.any()``) are skipped then: a sync is not allowed during capture, and the graph's
    inputs are produced on the device by the runtime itself (its values were checked when the first,
    eager step ran)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_tensor(
    name: str,
    t: object,
    *,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    contiguous: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor with the given properties and return it.

    ``shape`` entries that are ``None`` are free; the others must match exactly.
    ``contiguous=True`` requires a row-major dense layout (what the kernels index).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        check_dtype(name, t, dtype)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        check_shape(name, t, shape)
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} must be on {torch.device(device)}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    return t


def check_aligned(name: str, t: torch.Tensor | None, alignment: int = 16) -> None:
    """``t`` (if given) starts at a multiple of ``alignment`` bytes: what 16-byte vector loads and TMA need."""
    if t is not None and t.data_ptr() % alignment:
        raise ValueError(f"{name} must start at a {alignment}-byte aligned address, "
                         f"got data_ptr() % {alignment} = {t.data_ptr() % alignment}")


def check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype | Sequence[torch.dtype]) -> None:
    allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
    if t.dtype not in allowed:
        want = " or ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must be {want}, got {str(t.dtype).replace('torch.', '')}")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int | None]) -> None:
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        seen = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {seen}")


def check_int(name: str, value: object, *, min_value: int | None = None, choices: Sequence[int] | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")
    if choices is not None and value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value}")
    return value
