"""The CUDA kernels (zeroshard.ops on CUDA tensors) against torch.optim, torch ops and the CPU
kernels. The step kernels do the CPU kernels' arithmetic operation for operation, so those are
compared bit for bit; torch.optim and torch ops are the semantic oracle. Skips without a GPU.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import zeroshard
from zeroshard import _core, ops

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _core.gpu.built_with_cuda()
         and _core.gpu.device_count() > 0),
    reason="needs the CUDA variant of zeroshard and a CUDA GPU")

DEV = "cuda"
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
COPY_DTYPES = [None, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _scalar_cpu_reference():
    # The CPU side is the bitwise reference: pin its scalar path, restore afterwards.
    before = ops.simd_level()
    ops.set_simd_level("scalar")
    yield
    ops.set_simd_level(before)


def at_offset(values: torch.Tensor, offset: int, device=DEV) -> torch.Tensor:
    """A copy of `values` starting `offset` elements into a larger buffer (unaligned view)."""
    base = torch.zeros(values.numel() + offset + 8, dtype=values.dtype, device=device)
    view = base[offset:offset + values.numel()]
    view.copy_(values)
    return view


def grad_values(n: int, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 3).to(dtype)


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str):
    a, e = actual.detach().cpu(), expected.detach().cpu()
    assert a.dtype == e.dtype and a.shape == e.shape, what
    if not torch.equal(a, e):
        diff = (a.float() - e.float()).abs()
        i = int(diff.argmax())
        raise AssertionError(f"{what}: {int((a != e).sum())} elements differ, worst at {i}: "
                             f"{a[i].item()} vs {e[i].item()}")


# ---- Adam / AdamW -----------------------------------------------------------------------------

@pytest.mark.parametrize("grad_dtype,copy_dtype", list(itertools.product(GRAD_DTYPES, COPY_DTYPES)))
@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("n,offset", [(1, 0), (9, 1), (1003, 3), (65537, 0), (65536, 1)])
def test_adam_matches_cpu_kernel_and_torch(grad_dtype, copy_dtype, decoupled, n, offset):
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, decoupled=decoupled)
    param0 = grad_values(n, torch.float32, 1)
    scale = 4.0
    grads = [grad_values(n, grad_dtype, 10 + s) for s in range(2)]

    cpu = [param0.clone(), torch.zeros(n), torch.zeros(n)]
    gpu = [at_offset(t, offset) for t in cpu]
    cpu_copy = torch.empty(n, dtype=copy_dtype) if copy_dtype else None
    gpu_copy = at_offset(torch.zeros(n, dtype=copy_dtype), offset) if copy_dtype else None
    torch_param = param0.clone().requires_grad_(True)
    opt_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = opt_cls([torch_param], lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                  weight_decay=hp["weight_decay"], foreach=False)
    for step, g in enumerate(grads, start=1):
        skipped_cpu = ops.adam_step(cpu[0], g, cpu[1], cpu[2], step=step, grad_scale=scale,
                                    param_copy=cpu_copy, **hp)
        skipped_gpu = ops.adam_step(gpu[0], at_offset(g, offset), gpu[1], gpu[2], step=step,
                                    grad_scale=scale, param_copy=gpu_copy, **hp)
        assert skipped_cpu is False and bool(skipped_gpu) is False
        torch_param.grad = g.float() / scale
        opt.step()
    for name, c, d in zip(["param", "exp_avg", "exp_avg_sq"], cpu, gpu):
        assert_bitwise(d, c, name)
    if copy_dtype:
        assert_bitwise(gpu_copy, cpu_copy, "param_copy")
        assert_bitwise(gpu_copy, gpu[0].to(copy_dtype), "param_copy vs rounded param")
    torch.testing.assert_close(gpu[0].cpu(), torch_param.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu[1].cpu(), opt.state[torch_param]["exp_avg"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("n,where", [(1003, 0), (1003, 1002), (4096, 2049), (5, 4)])
def test_adam_skips_nonfinite_and_touches_nothing(grad_dtype, bad, n, where):
    g = grad_values(n, grad_dtype, 3)
    g[where] = bad
    param, m, v = (at_offset(grad_values(n, torch.float32, s), 1) for s in (4, 5, 6))
    v.abs_()
    copy = torch.full((n,), 7.0, dtype=torch.bfloat16, device=DEV)
    before = [t.clone() for t in (param, m, v, copy)]
    skipped = ops.adam_step(param, g.to(DEV), m, v, lr=1e-3, step=3, param_copy=copy)
    assert bool(skipped) is True
    for t, b in zip((param, m, v, copy), before):
        assert_bitwise(t, b, "buffer after a skipped step")


def test_shared_flag_guards_every_buffer():
    # Check all gradients into one flag first, then step: a clean buffer is skipped too.
    n = 777
    found_inf = torch.zeros(1, dtype=torch.int32, device=DEV)
    clean, dirty = grad_values(n, torch.bfloat16, 1).to(DEV), grad_values(n, torch.bfloat16, 2).to(DEV)
    dirty[100] = float("nan")
    assert bool(ops.all_finite(clean)) and not bool(ops.all_finite(dirty))
    _core.gpu.check_finite(clean.data_ptr(), 1, n, found_inf.data_ptr(), torch.cuda.current_stream().cuda_stream)
    assert int(found_inf) == 0
    _core.gpu.check_finite(dirty.data_ptr(), 1, n, found_inf.data_ptr(), torch.cuda.current_stream().cuda_stream)
    assert int(found_inf) == 1
    param, m, v = (torch.ones(n, device=DEV) for _ in range(3))
    skipped = ops.adam_step(param, clean, m, v, lr=1e-3, step=1, check_finite=False,
                            found_inf=found_inf)
    assert bool(skipped) and torch.equal(param, torch.ones(n, device=DEV))
    found_inf.zero_()
    skipped = ops.adam_step(param, clean, m, v, lr=1e-3, step=1, check_finite=False,
                            found_inf=found_inf)
    assert not bool(skipped) and not torch.equal(param, torch.ones(n, device=DEV))


def test_unchecked_step_allocates_no_flag():
    """check_finite=False without found_inf (the optimizers' call): nothing checked, so no
    device flag is allocated and filled per call, and the answer is a plain False."""
    n = 4096
    param, grad, m, v = (torch.ones(n, device=DEV) for _ in range(4))
    ops.adam_step(param, grad, m, v, lr=1e-3, step=1, check_finite=False)  # warm the allocator
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats(DEV)["allocation.all.allocated"]
    skipped = ops.adam_step(param, grad, m, v, lr=1e-3, step=2, check_finite=False)
    assert skipped is False
    assert torch.cuda.memory_stats(DEV)["allocation.all.allocated"] == before


def test_check_finite_requires_flag():
    n = 16
    p, g, m, v = (torch.zeros(n, device=DEV) for _ in range(4))
    cfg = _core.AdamConfig()
    cfg.check_finite = True
    with pytest.raises(ValueError, match="found_inf"):
        _core.gpu.adam_step(p.data_ptr(), g.data_ptr(), 0, m.data_ptr(), v.data_ptr(), 0, 0, 0,
                            n, cfg, 0, torch.cuda.current_stream().cuda_stream)


# ---- SGD --------------------------------------------------------------------------------------

SGD_CASES = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
    dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.01),
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0),
    dict(momentum=0.5, dampening=0.3, nesterov=False, weight_decay=0.1),
]


@pytest.mark.parametrize("grad_dtype,copy_dtype", list(itertools.product(GRAD_DTYPES, COPY_DTYPES)))
@pytest.mark.parametrize("case", SGD_CASES)
@pytest.mark.parametrize("n,offset", [(7, 1), (1003, 0), (65537, 3)])
def test_sgd_matches_cpu_kernel_and_torch(grad_dtype, copy_dtype, case, n, offset):
    lr, scale = 0.05, 2.0
    param0 = grad_values(n, torch.float32, 1)
    grads = [grad_values(n, grad_dtype, 20 + s) for s in range(3)]
    cpu_p, cpu_buf = param0.clone(), torch.zeros(n)
    gpu_p, gpu_buf = at_offset(param0, offset), at_offset(torch.full((n,), 123.0), offset)
    cpu_copy = torch.empty(n, dtype=copy_dtype) if copy_dtype else None
    gpu_copy = at_offset(torch.zeros(n, dtype=copy_dtype), offset) if copy_dtype else None
    torch_param = param0.clone().requires_grad_(True)
    opt = torch.optim.SGD([torch_param], lr=lr, foreach=False, **case)
    for step, g in enumerate(grads):
        kw = dict(lr=lr, first_step=step == 0, grad_scale=scale, **case)
        ops.sgd_step(cpu_p, g, cpu_buf, param_copy=cpu_copy, **kw)
        ops.sgd_step(gpu_p, at_offset(g, offset), gpu_buf, param_copy=gpu_copy, **kw)
        torch_param.grad = g.float() / scale
        opt.step()
    assert_bitwise(gpu_p, cpu_p, "param")
    if case["momentum"]:
        assert_bitwise(gpu_buf, cpu_buf, "momentum_buffer")
    if copy_dtype:
        assert_bitwise(gpu_copy, cpu_copy, "param_copy")
    torch.testing.assert_close(gpu_p.cpu(), torch_param.detach(), rtol=1e-5, atol=1e-6)


def test_sgd_skips_nonfinite():
    n = 1001
    g = grad_values(n, torch.float16, 1).to(DEV)
    g[-1] = float("inf")
    p, buf = torch.ones(n, device=DEV), torch.full((n,), 2.0, device=DEV)
    skipped = ops.sgd_step(p, g, buf, lr=0.1, momentum=0.9)
    assert bool(skipped)
    assert torch.equal(p, torch.ones(n, device=DEV)) and torch.equal(buf, torch.full((n,), 2.0, device=DEV))


# ---- norm, finiteness, scale, cast ------------------------------------------------------------

# Sizes: empty, shorter than one chunk, tail only, one block's worth minus one, 2^20 + 3 (not
# a multiple of anything), and sizes that run the unrolled loop several times (8 loads per thread
# over a one-wave grid: 8 * 132 * 4 * 256 chunks per step on 132 SMs) with a tail.
NORM_BIG = 26_000_005
NORM_SIZES = [0, 1, 7, 1023, 1003, (1 << 20) + 3, 2_000_003, NORM_BIG]
# Offsets in elements: 0 keeps the 16-byte vector loads, the others force the scalar path.
NORM_OFFSETS = (0, 1, 3, 5)


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("n", NORM_SIZES)
def test_l2_norm_sq_is_accurate_and_deterministic(dtype, n):
    x = grad_values(n, dtype, 5)
    expected = float(torch.linalg.vector_norm(x.double()) ** 2)  # torch in float64
    results = [ops.l2_norm_sq(at_offset(x, off)) for off in NORM_OFFSETS]
    results.append(ops.l2_norm_sq(at_offset(x, 0)))  # a second run on fresh memory
    assert results[0].dtype == torch.float32 and results[0].device.type == "cuda"
    for off, r in zip(NORM_OFFSETS + (0,), results):  # same bits whatever the alignment and the run
        assert_bitwise(r, results[0], f"norm at offset {off} vs offset 0")
    # fp32 chunk sums of 8 squares, added in double: a few fp32 roundings relative, no more.
    assert float(results[0]) == pytest.approx(expected, rel=1e-6, abs=1e-30)


def test_l2_norm_sq_same_bits_on_another_stream():
    x = grad_values((1 << 20) + 3, torch.bfloat16, 11).to(DEV)
    first = ops.l2_norm_sq(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        second = ops.l2_norm_sq(x)
    torch.cuda.current_stream().wait_stream(side)
    assert_bitwise(second, first, "norm on a side stream")


# ---- the documented summation order, emulated on the CPU ----------------------------------------
# [Note: norm determinism] in cuda/norm_kernel.cu: G = min(SMs * 4, ceil(chunks / 256)) blocks
# of 256 threads; logical thread t sums chunks t, t + 256 G, ...; each chunk's 8 squares in fp32
# by fused multiply-add; chunk sums into a double in order; block 0 thread 0 adds the tail chunk;
# fixed trees over each block and over the partials. Emulating it gives the exact expected bits.

NORM_BLOCKS_PER_SM, NORM_THREADS, NORM_CHUNK, NORM_MAX_BLOCKS = 4, 256, 8, 4096


def _fma_f32(a, b, c):
    """fp32 fused multiply-add of float32 numpy arrays, rounded once (as __fmaf_rn)."""
    import numpy as np
    product = a.astype(np.float64) * b.astype(np.float64)  # exact: 24 + 24 bits < 53
    addend = c.astype(np.float64)
    d = product + addend
    back = d - product  # TwoSum: d + err is the exact sum
    err = (product - (d - back)) + (addend - back)
    out = d.astype(np.float32)
    # Rounding through double errs only where d is exactly a float32 midpoint and inexact: the
    # exact sum then lies on err's side of the midpoint.
    midpoint = (d.view(np.uint64) & np.uint64(0x1FFFFFFF)) == np.uint64(0x10000000)
    up, down = midpoint & (err > 0), midpoint & (err < 0)
    ref = np.float64(0) + d  # the midpoint itself; out holds one of its two neighbours
    out[up & (out < ref)] = np.nextafter(out[up & (out < ref)], np.float32(np.inf))
    out[down & (out > ref)] = np.nextafter(out[down & (out > ref)], np.float32(-np.inf))
    return out


def _tree(lanes):
    """The kernels' block_sum over the last axis (256 doubles), width halving each round."""
    lanes = lanes.copy()
    width = lanes.shape[-1] // 2
    while width:
        lanes[..., :width] += lanes[..., width:2 * width]
        width //= 2
    return lanes[..., 0]


def emulated_l2_norm_sq(x: torch.Tensor, sms: int):
    import numpy as np
    v = x.float().numpy()
    n = v.size
    full = n // NORM_CHUNK
    blocks = max(1, min(-(-full // NORM_THREADS), min(sms * NORM_BLOCKS_PER_SM, NORM_MAX_BLOCKS)))
    threads = blocks * NORM_THREADS
    chunks = v[:full * NORM_CHUNK].reshape(full, NORM_CHUNK)
    chunk_sums = np.zeros(full, dtype=np.float32)
    for k in range(NORM_CHUNK):
        chunk_sums = _fma_f32(chunks[:, k], chunks[:, k], chunk_sums)
    rows = -(-full // threads)
    padded = np.zeros(rows * threads)  # + 0.0 leaves a double sum unchanged
    padded[:full] = chunk_sums
    per_thread = np.zeros(threads)
    for row in padded.reshape(rows, threads):  # each thread's chunks in index order
        per_thread += row
    tail = np.zeros(1, dtype=np.float32)
    for value in v[full * NORM_CHUNK:]:
        tail = _fma_f32(np.array([value]), np.array([value]), tail)
    per_thread[0] += np.float64(tail[0])
    partials = _tree(per_thread.reshape(blocks, NORM_THREADS))
    final_rows = -(-blocks // NORM_THREADS)
    padded = np.zeros(final_rows * NORM_THREADS)
    padded[:blocks] = partials
    lanes = np.zeros(NORM_THREADS)
    for row in padded.reshape(final_rows, NORM_THREADS):  # thread t: partials t, t + 256, ...
        lanes += row
    return np.float32(_tree(lanes))


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("n", [1, 7, 1023, (1 << 20) + 3, NORM_BIG])
def test_l2_norm_sq_bits_follow_the_documented_order(dtype, n):
    x = grad_values(n, dtype, 12)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    got = ops.l2_norm_sq(at_offset(x, 1 if n > 1 else 0))
    expected = emulated_l2_norm_sq(x, sms)
    assert float(got) == float(expected), (
        f"GPU {float(got)!r} vs the documented order {float(expected)!r} ({sms} SMs): the kernel's "
        "order and [Note: norm determinism] disagree")


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("n,where", [(5000, 4999), (5000, 0), ((1 << 20) + 3, (1 << 20) + 2),
                                     (NORM_BIG, NORM_BIG // 2)])
@pytest.mark.parametrize("offset", [0, 1])
def test_l2_norm_sq_flags_nonfinite(dtype, n, where, offset):
    x = at_offset(grad_values(n, dtype, 6), offset)
    flag = torch.zeros(1, dtype=torch.int32, device=DEV)
    ops.l2_norm_sq(x, nonfinite=flag)
    assert int(flag) == 0
    x[where] = float("nan")
    ops.l2_norm_sq(x, nonfinite=flag)
    assert int(flag) == 1
    x[where] = 0.0
    ops.l2_norm_sq(x, nonfinite=flag)
    assert int(flag) == 1, "the flag is never reset to 0"
    flag.zero_()
    x[where] = float("-inf")
    assert torch.isinf(ops.l2_norm_sq(x, nonfinite=flag)) and int(flag) == 1


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("n,offset", [(1, 0), (9, 1), (65537, 3)])
def test_all_finite(dtype, n, offset):
    x = at_offset(grad_values(n, dtype, 7), offset)
    assert bool(ops.all_finite(x))
    x[n // 2] = float("-inf")
    assert not bool(ops.all_finite(x))


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("n,offset", [(1, 0), (1003, 1), (65537, 0)])
def test_scale_matches_torch(dtype, n, offset):
    x = grad_values(n, dtype, 8)
    y = at_offset(x, offset)
    ops.scale_(y, 0.37)
    assert_bitwise(y, (x.float() * 0.37).to(dtype), "scale")


SPECIALS = [0.0, -0.0, 1e-8, 6e-8, 3e-5, 65504.0, 65520.0, 70000.0, 3.0e38, 1.0 + 2 ** -9,
            float("inf"), float("-inf")]


@pytest.mark.parametrize("src,dst", [(s, d) for s in GRAD_DTYPES for d in GRAD_DTYPES])
@pytest.mark.parametrize("n,offset", [(5, 1), (65537, 0), (1003, 3)])
def test_cast_matches_torch(src, dst, n, offset):
    x = grad_values(n, torch.float32, 9)
    x[: min(n, len(SPECIALS))] = torch.tensor(SPECIALS[: min(n, len(SPECIALS))])
    x = x.to(src)
    out = at_offset(torch.zeros(n, dtype=dst), offset)
    ops.cast_(out, at_offset(x, offset))
    assert_bitwise(out, x.to(dst), f"cast {src} -> {dst}")


def test_cast_keeps_nan():
    x = torch.tensor([float("nan")] * 9, device=DEV)
    for dst in (torch.bfloat16, torch.float16):
        out = torch.zeros(9, dtype=dst, device=DEV)
        ops.cast_(out, x)
        assert torch.isnan(out.float()).all()


def test_64bit_indexing_path():
    # 2^31 + 17 bf16 elements (4 GiB): past what 32-bit indices can address.
    n = 2 ** 31 + 17
    try:
        x = torch.ones(n, dtype=torch.bfloat16, device=DEV)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for the 64-bit indexing test")
    x[-1] = 3.0
    ops.scale_(x, 2.0)
    assert float(x[-1]) == 6.0 and float(x[0]) == 2.0 and float(x[n // 2]) == 2.0
    assert bool(ops.all_finite(x))
    x[-1] = float("inf")
    assert not bool(ops.all_finite(x))
    del x
    torch.cuda.empty_cache()


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="n must be >= 0"):
        _core.gpu.scale(0, 0, -1, 1.0, 0)
    with pytest.raises(ValueError, match="x is null"):
        _core.gpu.scale(0, 0, 10, 1.0, 0)
    assert isinstance(zeroshard.CoreError("x"), RuntimeError)


def test_device_queries():
    assert _core.gpu.device_count() == torch.cuda.device_count()
    assert _core.gpu.device_name(0) == torch.cuda.get_device_name(0)
    with pytest.raises(ValueError, match="does not exist"):
        _core.gpu.device_name(_core.gpu.device_count())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_block_quantization_is_the_cpus_bit_for_bit(bits, dtype):
    """The CUDA quantize / dequantize / dequantize_add_ give the CPU kernels' bits, edges
    included (an inf block, a zero block, odd sizes, a block smaller than a warp)."""
    g = torch.Generator().manual_seed(bits)
    for n, block in ((1, 2), (31, 18), (70001, 2048), (5000, 256)):
        x = (torch.randn(n, generator=g) * torch.logspace(-3, 3, n)).to(dtype)
        if n > 40:
            x[block:2 * block] = 0.0
            x[3] = float("inf")
        q_cpu, s_cpu = ops.quantize(x, bits=bits, block=block)
        q_gpu, s_gpu = ops.quantize(x.to(DEV), bits=bits, block=block)
        assert torch.equal(q_gpu.cpu(), q_cpu)
        nan = torch.isnan(s_cpu)
        assert torch.equal(torch.isnan(s_gpu.cpu()), nan)
        assert torch.equal(s_gpu.cpu()[~nan].view(torch.int32), s_cpu[~nan].view(torch.int32))
        back = ops.dequantize(q_gpu, s_gpu, n, bits=bits, block=block, dtype=dtype).cpu()
        want = ops.dequantize(q_cpu, s_cpu, n, bits=bits, block=block, dtype=dtype)
        assert torch.equal(back.isnan(), want.isnan())
        assert torch.equal(back[~want.isnan()], want[~want.isnan()])
        acc = torch.randn(n, generator=g)
        acc_gpu = ops.dequantize_add_(acc.to(DEV), q_gpu, s_gpu, bits=bits, block=block).cpu()
        ops.dequantize_add_(acc, q_cpu, s_cpu, bits=bits, block=block)
        ok = ~acc.isnan()
        assert torch.equal(acc_gpu.isnan(), acc.isnan()) and torch.equal(acc_gpu[ok], acc[ok])
