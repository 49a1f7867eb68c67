"""Checks on torch tensors at the boundary of zeroshard.ops, and what the core needs of them.

Owns: the dtype codes shared with the C++ core (cpp/include/zeroshard/dtype.hpp) and the error
messages for bad tensors. Knows torch; knows nothing of the kernels themselves.
"""
from __future__ import annotations

import torch

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


def require_tensor(name: str, t, *, dtypes, numel: int | None = None,
                   device: torch.device | None = None) -> torch.Tensor:
    """Validates one argument and returns it; raises TypeError/ValueError naming it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(t.dtype).replace('torch.', '')}")
    if t.is_sparse or t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous() or pass a flat buffer")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {t.device}; zeroshard serves cpu and cuda tensors")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements; expected {numel} (the size of param)")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but param is on {device}; put them together")
    if t.requires_grad and torch.is_grad_enabled() and t.is_leaf is False:
        raise ValueError(f"{name} is part of an autograd graph; pass a detached tensor")
    return t


def address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def cuda_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream
