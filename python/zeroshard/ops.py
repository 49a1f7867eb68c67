"""Fused optimizer kernels and reductions on torch tensors: the public face of the core.

Each function checks dtype, device, contiguity and sizes once, then hands pointers (and, for
CUDA tensors, the current stream) to the compiled core. CPU tensors run the SIMD CPU kernels;
CUDA tensors the CUDA kernels, which never synchronise with the host: where a CPU call returns a
bool, a CUDA call returns a 0-dim bool tensor on the device (test it only when you need to).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch

from . import _core
from ._tensors import LOW_PRECISION, address, cuda_stream, dtype_code, require_tensor

__all__ = [
    "adam_step", "sgd_step", "l2_norm_sq", "all_finite", "scale_", "cast_",
    "quantize", "dequantize", "dequantize_add_", "quantized_bytes", "quantized_blocks",
    "num_threads", "set_num_threads", "default_num_threads", "simd_level", "set_simd_level",
]

F32 = (torch.float32,)
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
Flag = Union[bool, torch.Tensor]


def _check_optional_copy(param_copy, n, device):
    if param_copy is not None:
        require_tensor("param_copy", param_copy, dtypes=LOW_PRECISION, numel=n, device=device)


def _device_flag(found_inf: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    if found_inf is None:
        return torch.zeros(1, dtype=torch.int32, device=device)
    require_tensor("found_inf", found_inf, dtypes=(torch.int32,), numel=1, device=device)
    return found_inf


def adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
              exp_avg_sq: torch.Tensor, *, lr: float, betas: Tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8, weight_decay: float = 0.0, step: int, decoupled: bool = True,
              amsgrad: bool = False, max_exp_avg_sq: Optional[torch.Tensor] = None,
              maximize: bool = False, grad_scale: float = 1.0,
              param_copy: Optional[torch.Tensor] = None, check_finite: bool = True,
              found_inf: Optional[torch.Tensor] = None) -> Flag:
    """One Adam (decoupled=False) or AdamW (decoupled=True) step, in place, with torch.optim's
    semantics. `step` is the step number after increment (1 on the first step). The gradient is
    divided by `grad_scale`, and negated first when `maximize`. `amsgrad=True` needs
    `max_exp_avg_sq` (fp32, same size, zeros before the first step), torch's running maximum of
    exp_avg_sq. `param_copy` (bf16/fp16, same size) receives the updated params in the same pass.
    Returns True when a non-finite gradient made the step a no-op (always False with
    check_finite=False and no found_inf).

    CUDA: `found_inf` (int32, 1 element) may be passed to share one overflow flag between calls;
    the returned 0-dim tensor is `found_inf != 0`.
    """
    require_tensor("param", param, dtypes=F32)
    n, dev = param.numel(), param.device
    require_tensor("grad", grad, dtypes=GRAD_DTYPES, numel=n, device=dev)
    require_tensor("exp_avg", exp_avg, dtypes=F32, numel=n, device=dev)
    require_tensor("exp_avg_sq", exp_avg_sq, dtypes=F32, numel=n, device=dev)
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("amsgrad=True needs max_exp_avg_sq: pass a float32 tensor shaped "
                             "like exp_avg_sq, zeros before the first step")
        require_tensor("max_exp_avg_sq", max_exp_avg_sq, dtypes=F32, numel=n, device=dev)
    elif max_exp_avg_sq is not None:
        raise ValueError("max_exp_avg_sq was given but amsgrad=False: pass amsgrad=True to use "
                         "it, or drop it")
    _check_optional_copy(param_copy, n, dev)
    if not isinstance(step, int) or isinstance(step, bool):
        raise TypeError(f"step must be an int (the step number after increment), got {step!r}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    cfg = _core.AdamConfig()
    cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
    cfg.weight_decay, cfg.step, cfg.decoupled = float(weight_decay), step, bool(decoupled)
    cfg.amsgrad, cfg.maximize = bool(amsgrad), bool(maximize)
    cfg.grad_scale, cfg.check_finite = float(grad_scale), bool(check_finite)
    cfg.validate()
    copy_code = dtype_code(param_copy.dtype) if param_copy is not None else 0
    max_sq = address(max_exp_avg_sq) if amsgrad else 0
    if dev.type == "cpu":
        if found_inf is not None:
            raise ValueError("found_inf is for CUDA tensors; CPU calls return the flag as a bool")
        return _core.cpu.adam_step(param.data_ptr(), grad.data_ptr(), dtype_code(grad.dtype),
                                   exp_avg.data_ptr(), exp_avg_sq.data_ptr(), max_sq,
                                   address(param_copy), copy_code, n, cfg)
    flag = _device_flag(found_inf, dev) if check_finite or found_inf is not None else None
    with torch.cuda.device(dev):
        _core.gpu.adam_step(param.data_ptr(), grad.data_ptr(), dtype_code(grad.dtype),
                            exp_avg.data_ptr(), exp_avg_sq.data_ptr(), max_sq,
                            address(param_copy), copy_code, n, cfg, address(flag),
                            cuda_stream(dev))
    # Unchecked (check_finite=False, no found_inf): nothing was looked at, so no device flag is
    # allocated and filled per call; False, as the CPU path returns a bool.
    return (flag[0] != 0) if flag is not None else False


def sgd_step(param: torch.Tensor, grad: torch.Tensor,
             momentum_buffer: Optional[torch.Tensor] = None, *, lr: float, momentum: float = 0.0,
             dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
             first_step: bool = False, maximize: bool = False, grad_scale: float = 1.0,
             param_copy: Optional[torch.Tensor] = None, check_finite: bool = True,
             found_inf: Optional[torch.Tensor] = None) -> Flag:
    """One torch.optim.SGD step in place. With momentum, `momentum_buffer` (fp32, same size) is
    required; `first_step=True` initialises it to the gradient as torch does when the buffer is
    new. `maximize` negates the gradient before weight decay and momentum, as torch does.
    Returns True when a non-finite gradient made the step a no-op (see adam_step)."""
    require_tensor("param", param, dtypes=F32)
    n, dev = param.numel(), param.device
    require_tensor("grad", grad, dtypes=GRAD_DTYPES, numel=n, device=dev)
    if momentum != 0:
        if momentum_buffer is None:
            raise ValueError("momentum_buffer is required when momentum != 0")
        require_tensor("momentum_buffer", momentum_buffer, dtypes=F32, numel=n, device=dev)
    _check_optional_copy(param_copy, n, dev)
    cfg = _core.SgdConfig()
    cfg.lr, cfg.momentum, cfg.dampening = float(lr), float(momentum), float(dampening)
    cfg.weight_decay, cfg.nesterov, cfg.first_step = float(weight_decay), bool(nesterov), bool(first_step)
    cfg.maximize = bool(maximize)
    cfg.grad_scale, cfg.check_finite = float(grad_scale), bool(check_finite)
    cfg.validate()
    buf = momentum_buffer if momentum != 0 else None
    copy_code = dtype_code(param_copy.dtype) if param_copy is not None else 0
    if dev.type == "cpu":
        if found_inf is not None:
            raise ValueError("found_inf is for CUDA tensors; CPU calls return the flag as a bool")
        return _core.cpu.sgd_step(param.data_ptr(), grad.data_ptr(), dtype_code(grad.dtype),
                                  address(buf), address(param_copy), copy_code, n, cfg)
    flag = _device_flag(found_inf, dev) if check_finite or found_inf is not None else None
    with torch.cuda.device(dev):
        _core.gpu.sgd_step(param.data_ptr(), grad.data_ptr(), dtype_code(grad.dtype), address(buf),
                           address(param_copy), copy_code, n, cfg, address(flag), cuda_stream(dev))
    # Unchecked (check_finite=False, no found_inf): nothing was looked at, so no device flag is
    # allocated and filled per call; False, as the CPU path returns a bool.
    return (flag[0] != 0) if flag is not None else False


def l2_norm_sq(t: torch.Tensor, *, nonfinite: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of squares of `t` (fp32/bf16/fp16) as a 0-dim fp32 tensor on t's device; deterministic
    for a given size. If `nonfinite` (int32, 1 element, same device) is given, it is set to 1
    when some element is inf/NaN (and left alone otherwise)."""
    require_tensor("t", t, dtypes=GRAD_DTYPES)
    dev = t.device
    if nonfinite is not None:
        require_tensor("nonfinite", nonfinite, dtypes=(torch.int32,), numel=1, device=dev)
    if dev.type == "cpu":
        value, bad = _core.cpu.l2_norm_sq(t.data_ptr(), dtype_code(t.dtype), t.numel())
        if bad and nonfinite is not None:
            nonfinite.fill_(1)
        return torch.tensor(value, dtype=torch.float32)
    out = torch.empty((), dtype=torch.float32, device=dev)
    workspace = torch.empty(_core.gpu.l2_norm_workspace_bytes(), dtype=torch.uint8, device=dev)
    with torch.cuda.device(dev):
        _core.gpu.l2_norm_sq(t.data_ptr(), dtype_code(t.dtype), t.numel(), out.data_ptr(),
                             address(nonfinite), workspace.data_ptr(), cuda_stream(dev))
    return out


def all_finite(t: torch.Tensor) -> Flag:
    """True when no element of `t` is inf/NaN (CUDA: a 0-dim bool tensor, no host sync)."""
    require_tensor("t", t, dtypes=GRAD_DTYPES)
    if t.device.type == "cpu":
        return _core.cpu.all_finite(t.data_ptr(), dtype_code(t.dtype), t.numel())
    flag = torch.zeros(1, dtype=torch.int32, device=t.device)
    with torch.cuda.device(t.device):
        _core.gpu.check_finite(t.data_ptr(), dtype_code(t.dtype), t.numel(), flag.data_ptr(),
                               cuda_stream(t.device))
    return flag[0] == 0


def scale_(t: torch.Tensor, factor: float) -> torch.Tensor:
    """t *= factor in place (computed in fp32); returns t."""
    require_tensor("t", t, dtypes=GRAD_DTYPES)
    if t.device.type == "cpu":
        _core.cpu.scale(t.data_ptr(), dtype_code(t.dtype), t.numel(), float(factor))
    else:
        with torch.cuda.device(t.device):
            _core.gpu.scale(t.data_ptr(), dtype_code(t.dtype), t.numel(), float(factor),
                            cuda_stream(t.device))
    return t


def cast_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst = src converted (fp32/bf16/fp16 either way, round-to-nearest-even); returns dst."""
    require_tensor("src", src, dtypes=GRAD_DTYPES)
    require_tensor("dst", dst, dtypes=GRAD_DTYPES, numel=src.numel(), device=src.device)
    if src.device.type == "cpu":
        _core.cpu.cast(src.data_ptr(), dtype_code(src.dtype), dst.data_ptr(),
                       dtype_code(dst.dtype), src.numel())
    else:
        with torch.cuda.device(src.device):
            _core.gpu.cast(src.data_ptr(), dtype_code(src.dtype), dst.data_ptr(),
                           dtype_code(dst.dtype), src.numel(), cuda_stream(src.device))
    return dst


def quantized_bytes(numel: int, bits: int) -> int:
    """Bytes of `numel` block-quantized values: numel at 8 bits, ceil(numel / 2) at 4."""
    return _core.cpu.quantized_bytes(int(numel), int(bits))


def quantized_blocks(numel: int, block: int) -> int:
    """Scales (one fp32 per block) of `numel` values in blocks of `block`."""
    return _core.cpu.quantized_blocks(int(numel), int(block))


def quantize(x: torch.Tensor, *, bits: int = 8, block: int = 2048,
             out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-quantizes x (fp32/bf16/fp16, flattened): returns (q, scales), q int8 of
    quantized_bytes(numel, bits) bytes (4 bits: two values a byte), scales fp32, one per block
    of `block` elements. Symmetric, round half to even, the same bits on CPU and GPU (the
    core's [Note: block quantization]); a block with inf/NaN gets scale NaN. `out`: (q, scales)
    to write into."""
    require_tensor("x", x, dtypes=GRAD_DTYPES)
    n = x.numel()
    _check_quant(bits, block)
    q_bytes, blocks = quantized_bytes(n, bits), quantized_blocks(n, block)
    if out is None:
        out = (torch.empty(q_bytes, dtype=torch.int8, device=x.device),
               torch.empty(blocks, dtype=torch.float32, device=x.device))
    q, scales = out
    require_tensor("q", q, dtypes=(torch.int8,), numel=q_bytes, device=x.device)
    require_tensor("scales", scales, dtypes=F32, numel=blocks, device=x.device)
    if x.device.type == "cpu":
        _core.cpu.quantize(x.data_ptr(), dtype_code(x.dtype), n, bits, block, q.data_ptr(),
                           scales.data_ptr())
    else:
        with torch.cuda.device(x.device):
            _core.gpu.quantize(x.data_ptr(), dtype_code(x.dtype), n, bits, block, q.data_ptr(),
                               scales.data_ptr(), cuda_stream(x.device))
    return q, scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, numel: int, *, bits: int = 8,
               block: int = 2048, dtype: torch.dtype = torch.float32,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The `numel` values quantize() packed into (q, scales), as q * scale rounded once to
    `dtype` (or into `out`, flat, of numel elements)."""
    _check_quant(bits, block)
    _check_packed(q, scales, numel, bits, block)
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=q.device)
    require_tensor("out", out, dtypes=GRAD_DTYPES, numel=numel, device=q.device)
    _dequantize(q, scales, numel, bits, block, out, accumulate=False)
    return out


def dequantize_add_(acc: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, *, bits: int = 8,
                    block: int = 2048) -> torch.Tensor:
    """acc += q * scale in fp32, element by element (a quantized reduce-scatter's reduction,
    one source at a time); returns acc."""
    _check_quant(bits, block)
    require_tensor("acc", acc, dtypes=F32)
    _check_packed(q, scales, acc.numel(), bits, block)
    _dequantize(q, scales, acc.numel(), bits, block, acc, accumulate=True)
    return acc


def _check_quant(bits: int, block: int) -> None:
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if not (isinstance(block, int) and 1 <= block <= 2048) or (bits == 4 and block % 2):
        raise ValueError(f"block must be a whole number of elements in 1..2048 (even for 4 "
                         f"bits), got {block!r}")


def _check_packed(q, scales, numel: int, bits: int, block: int) -> None:
    require_tensor("q", q, dtypes=(torch.int8,), numel=quantized_bytes(numel, bits))
    require_tensor("scales", scales, dtypes=F32, numel=quantized_blocks(numel, block),
                   device=q.device)


def _dequantize(q, scales, n, bits, block, out, accumulate: bool) -> None:
    if out.device != q.device:
        raise ValueError(f"out is on {out.device}, q on {q.device}; put them together")
    if q.device.type == "cpu":
        args = (q.data_ptr(), scales.data_ptr(), n, bits, block, out.data_ptr())
        if accumulate:
            _core.cpu.dequantize_add(*args)
        else:
            _core.cpu.dequantize(*args, dtype_code(out.dtype))
    else:
        with torch.cuda.device(q.device):
            _core.gpu.dequantize(q.data_ptr(), scales.data_ptr(), n, bits, block, out.data_ptr(),
                                 dtype_code(out.dtype), accumulate, cuda_stream(q.device))


def num_threads() -> int:
    """Threads the CPU kernels use (ZEROSHARD_NUM_THREADS sets the initial value)."""
    return _core.cpu.num_threads()


_threads_chosen = False  # set_num_threads() was called: defaults no longer apply


def set_num_threads(n: int) -> None:
    global _threads_chosen
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_threads must be a positive int, got {n!r}")
    _core.cpu.set_num_threads(n)
    _threads_chosen = True


def default_num_threads() -> int:
    """The threads an offloading rank's CPU kernels should use: the physical cores this process
    may run on, shared among the ranks torchrun put on this machine (LOCAL_WORLD_SIZE) unless
    the process is already bound to a subset of the CPUs (taskset, numactl, a launcher's core
    binding), in which case the binding is this rank's share. Hyperthread siblings share a
    core's vector units and bandwidth: one thread per core is as fast and leaves the siblings
    to the data loader."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    bound = len(cpus) < (os.cpu_count() or len(cpus))
    try:
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_ranks = 1
    return max(1, len(cores) if bound else len(cores) // local_ranks)


def apply_default_num_threads() -> None:
    """Sets default_num_threads() unless ZEROSHARD_NUM_THREADS or set_num_threads() chose."""
    if not _threads_chosen and "ZEROSHARD_NUM_THREADS" not in os.environ:
        _core.cpu.set_num_threads(default_num_threads())


def simd_level() -> str:
    """The CPU SIMD path in use: 'avx512', 'avx2' or 'scalar' (ZEROSHARD_SIMD caps it)."""
    return _core.cpu.simd_level()


def set_simd_level(level: str) -> None:
    _core.cpu.set_simd_level(level)
