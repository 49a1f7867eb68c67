"""Block quantization (zeroshard.ops.quantize / dequantize / dequantize_add_; the core's [Note:
block quantization]) against a torch reference that follows the same rule, on every SIMD path,
with sizes that straddle vector widths, blocks and threads' tasks; error bounds per block; the
edges (zeros, inf/NaN, tiny values, odd sizes for 4 bits) and bad arguments. The CUDA kernels
are compared with the CPU's bit for bit in test_gpu_ops.py.
"""
import math

import pytest
import torch

from zeroshard import ops

SIZES = [1, 7, 31, 64, 255, 2048, 2049, 5000, 70001]
QMAX = {8: 127.0, 4: 7.0}


def reference(x: torch.Tensor, bits: int, block: int):
    """(q as int values, scales): the rule written with torch's fp32 ops (each rounded once)."""
    x = x.float().reshape(-1)
    n = x.numel()
    blocks = math.ceil(n / block)
    padded = torch.zeros(blocks * block)
    padded[:n] = x
    rows = padded.view(blocks, block)
    finite = torch.isfinite(rows).all(dim=1)
    absmax = rows.abs().nan_to_num(0.0, 0.0, 0.0).amax(dim=1)
    scales = absmax / QMAX[bits]
    scales[~finite] = float("nan")
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(rows / safe[:, None]).clamp(-QMAX[bits], QMAX[bits])
    q[~(scales > 0)] = 0
    return q.reshape(-1)[:n].to(torch.int32), scales


def unpack(q: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    if bits == 8:
        return q.to(torch.int32)
    b = q.view(torch.uint8).to(torch.int32)
    nibbles = torch.stack([b & 0x0F, b >> 4], dim=1).reshape(-1)[:n]
    return torch.where(nibbles >= 8, nibbles - 16, nibbles)


def same_floats(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits, except that any NaN equals any NaN."""
    both_nan = torch.isnan(a) & torch.isnan(b)
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | both_nan).all())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [2048, 256, 18])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_the_rule_on_every_simd_path(simd_level, bits, block, dtype):
    g = torch.Generator().manual_seed(bits * 1000 + block)
    for n in SIZES:
        x = (torch.randn(n, generator=g) * torch.logspace(-3, 3, n)).to(dtype)
        q, scales = ops.quantize(x, bits=bits, block=block)
        assert q.numel() == ops.quantized_bytes(n, bits) == (n if bits == 8 else (n + 1) // 2)
        want_q, want_scales = reference(x, bits, block)
        assert same_floats(scales, want_scales), (n, simd_level)
        assert torch.equal(unpack(q, n, bits), want_q), (n, simd_level)
        back = ops.dequantize(q, scales, n, bits=bits, block=block)
        assert same_floats(back, want_q.float() * want_scales.repeat_interleave(block)[:n])


@pytest.mark.parametrize("bits", [8, 4])
def test_error_is_at_most_half_a_step_per_block(bits):
    block = 512
    x = torch.randn(10_000) * torch.rand(10_000) * 100
    q, scales = ops.quantize(x, bits=bits, block=block)
    back = ops.dequantize(q, scales, x.numel(), bits=bits, block=block)
    step = scales.repeat_interleave(block)[:x.numel()]
    # half a step from rounding, plus the fp32 roundings of x / scale and q * scale
    assert bool(((back - x).abs() <= step * (0.5 + 1e-4)).all())
    # The rounding errors are uniform over +-step/2: their rms is step / sqrt(12)
    rms_error = (back - x).square().mean().sqrt().item()
    model = (step.square().mean() / 12).sqrt().item()
    assert 0.8 * model < rms_error < 1.2 * model, (rms_error, model)


def test_edges_zeros_nonfinite_and_tiny_blocks():
    x = torch.zeros(12)
    x[4:8] = torch.tensor([1.0, float("inf"), -2.0, 3.0])
    x[8:12] = 1e-44  # its scale underflows to 0
    q, scales = ops.quantize(x, bits=8, block=4)
    assert scales[0].item() == 0.0 and math.isnan(scales[1].item()) and scales[2].item() == 0.0
    assert q.abs().sum().item() == 0
    back = ops.dequantize(q, scales, 12, bits=8, block=4)
    assert torch.equal(back[:4], torch.zeros(4)) and bool(back[4:8].isnan().all())
    # NaN too; and the largest magnitude always maps to +-qmax exactly
    q, scales = ops.quantize(torch.tensor([float("nan"), 1.0, -5.0, 2.5]), bits=4, block=2)
    assert math.isnan(scales[0].item()) and unpack(q, 4, 4).tolist() == [0, 0, -7, 4]


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_add_sums_sources_in_fp32(simd_level, bits):
    g = torch.Generator().manual_seed(7)
    n, block = 4099, 64
    acc = torch.randn(n, generator=g)
    want = acc.clone()
    for _ in range(3):
        x = torch.randn(n, generator=g).to(torch.bfloat16)
        q, scales = ops.quantize(x, bits=bits, block=block)
        ops.dequantize_add_(acc, q, scales, bits=bits, block=block)
        want += ops.dequantize(q, scales, n, bits=bits, block=block)  # same order, same bits
    assert same_floats(acc, want)


def test_dequantize_writes_every_dtype_rounded_once():
    x = torch.randn(3000)
    q, scales = ops.quantize(x, bits=8, block=100)
    f32 = ops.dequantize(q, scales, 3000, block=100)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(ops.dequantize(q, scales, 3000, block=100, dtype=dtype), f32.to(dtype))


def test_bad_arguments_say_what_to_pass():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        ops.quantize(x, bits=2)
    with pytest.raises(ValueError, match="even for 4 bits"):
        ops.quantize(x, bits=4, block=3)
    with pytest.raises(ValueError, match="1..2048"):
        ops.quantize(x, block=4096)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.quantize(x.double())
    q, scales = ops.quantize(x, block=4)
    with pytest.raises(ValueError, match="scales has 2 elements; expected 3"):
        ops.dequantize(q, scales[:2], 10, block=4)
    with pytest.raises(TypeError, match="acc must have dtype float32"):
        ops.dequantize_add_(torch.zeros(10, dtype=torch.bfloat16), q, scales, block=4)
