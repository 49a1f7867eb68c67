"""Tests of zeroshard.ops on CPU tensors: the fused optimizer steps against stock torch.optim,
the reductions, scale and casts against torch, argument checking, and agreement between SIMD
paths. Every kernel test runs once per SIMD path this CPU/build has (conftest.simd_level).

Oracle: torch.optim (foreach=False) run on float64 copies of the same inputs. Tolerances are
derived next to the helper that applies them.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from conftest import available_simd_levels
from zeroshard import ops

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COPY_DTYPES = (None, torch.bfloat16, torch.float16)
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
U24 = 2.0 ** -24  # unit roundoff of float32
STEPS = 3
DTYPE_ID = {None: "none", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def dtype_id(d):
    return DTYPE_ID[d]


# ---- helpers ---------------------------------------------------------------------------------

def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_VIEW[t.dtype])


def assert_bitwise(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, what
    diff = (bits(ours) != bits(ref)).nonzero()
    assert diff.numel() == 0, (f"{what}: {diff.numel()} elements differ bitwise, first at "
                               f"{diff[0].item()}: {ours[diff[0]].item()} vs {ref[diff[0]].item()}")


def assert_bitwise_or_both_nan(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Bitwise equal except that any NaN may stand for any NaN: torch itself has no single NaN
    encoding (float32 NaN .to(bfloat16) gives 0xffff, float16 NaN .to(bfloat16) gives 0x7fc0)."""
    both_nan = ours.isnan() & ref.isnan()
    assert (ours.isnan() == ref.isnan()).all(), f"{what}: NaN positions differ"
    differ = (bits(ours) != bits(ref)) & ~both_nan
    idx = differ.nonzero()
    assert idx.numel() == 0, (f"{what}: {idx.numel()} elements differ, first at {idx[0].item()}: "
                              f"{ours[idx[0]].item()!r} vs {ref[idx[0]].item()!r}")


def make_grads(n, dtype, steps=STEPS, scale=1.0, seed=0):
    """Per-step gradients in `dtype`, multiplied by `scale` (a loss scale) before the cast."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype)
            for _ in range(steps)]


def adam_reference(p0, grads, *, lr, betas, eps, weight_decay, decoupled, grad_scale,
                   amsgrad=False, maximize=False):
    """torch.optim.Adam/AdamW on float64 copies; returns (param, exp_avg, exp_avg_sq,
    max_exp_avg_sq or None)."""
    p = p0.double().clone()
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([p], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
              maximize=maximize, foreach=False)
    for g in grads:
        p.grad = g.double() / grad_scale
        opt.step()
    state = opt.state[p] if len(p) else {k: p.clone() for k in ("exp_avg", "exp_avg_sq",
                                                                 "max_exp_avg_sq")}
    return p, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq")


def sgd_reference(p0, grads, *, lr, momentum, dampening, weight_decay, nesterov, grad_scale,
                  maximize=False):
    p = p0.double().clone()
    opt = torch.optim.SGD([p], lr=lr, momentum=momentum, dampening=dampening,
                          weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                          foreach=False)
    for g in grads:
        p.grad = g.double() / grad_scale
        opt.step()
    buf = opt.state[p].get("momentum_buffer") if len(p) else None
    return p, buf


def assert_param_close(ours, ref, *, steps, lr, what="param"):
    """Per fp32 step, p is rounded at most twice (decoupled decay, then the update; 2^-24 |p|
    each), (1 - lr*wd) is held in fp32 (another 2^-24 |p|), and the update, of size <= ~3*lr
    (|m_hat/sqrt(v_hat)| is O(1) for Gaussian gradients; SGD's lr*d likewise), is evaluated in
    fp32 from fp32 hyper-parameters: a few 1e-7 of it. We allow 4|p|*2^-24 + 1e-5*lr per step,
    summed over the steps; torch's own fp32 Adam/AdamW uses about half of that against the same
    float64 oracle. A wrong formula (bias correction, beta, decay) moves p by >= ~1e-3*lr."""
    ref = ref.to(torch.float64)
    err = (ours.double() - ref).abs()
    tol = steps * (4 * U24 * ref.abs() + 1e-5 * lr)
    bad = (err > tol).nonzero()
    assert bad.numel() == 0, (f"{what}: {bad.numel()} elements off, worst err "
                              f"{err.max().item():.3g} (tol there {tol[err.argmax()].item():.3g})")


def assert_moment_close(ours, ref, *, rtol, atol, what):
    torch.testing.assert_close(ours.double(), ref.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def run_adam(p0, grads, *, copy_dtype=None, grad_scale=1.0, max_out=None, **hp):
    """With amsgrad=True in hp, `max_out` (a list) receives the max_exp_avg_sq tensor."""
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    v_max = torch.zeros_like(p0) if hp.get("amsgrad") else None
    copy = None if copy_dtype is None else torch.empty(p0.numel(), dtype=copy_dtype)
    for step, g in enumerate(grads, start=1):
        skipped = ops.adam_step(p, g, m, v, step=step, grad_scale=grad_scale, param_copy=copy,
                                max_exp_avg_sq=v_max, **hp)
        assert skipped is False
    if max_out is not None:
        max_out.append(v_max)
    return p, m, v, copy


ADAM_HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def check_adam(p, m, v, copy, p0, grads, *, decoupled, grad_scale=1.0, hp=ADAM_HP):
    ref_p, ref_m, ref_v, _ = adam_reference(p0, grads, decoupled=decoupled, grad_scale=grad_scale,
                                            **hp)
    steps = len(grads)
    assert_param_close(p, ref_p, steps=steps, lr=hp["lr"])
    gmax = max((g.double().abs().max().item() / grad_scale for g in grads if g.numel()), default=0)
    # m: lerp with an fp32 beta1 (relative error 2^-24), a few roundings per step.
    assert_moment_close(m, ref_m, rtol=8 * steps * U24, atol=8 * steps * U24 * gmax, what="exp_avg")
    # v: 1 - beta2 is formed in double from the Python float (a float32 beta2 would be off by
    # 1.3e-5 relative), then a few fp32 roundings per step.
    assert_moment_close(v, ref_v, rtol=8 * steps * U24, atol=0.0, what="exp_avg_sq")
    if copy is not None:
        assert_bitwise(copy, p.to(copy.dtype), "param_copy vs param.to()")


# ---- Adam / AdamW ----------------------------------------------------------------------------

@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("copy_dtype", COPY_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=dtype_id)
def test_adam_matches_torch_for_every_dtype(simd_level, grad_dtype, copy_dtype, decoupled):
    n = 1021  # prime: every vector width leaves a tail
    grad_scale = 1024.0 if grad_dtype == torch.float16 else 1.0
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(1))
    grads = make_grads(n, grad_dtype, scale=grad_scale)
    p, m, v, copy = run_adam(p0, grads, copy_dtype=copy_dtype, grad_scale=grad_scale,
                             decoupled=decoupled, **ADAM_HP)
    check_adam(p, m, v, copy, p0, grads, decoupled=decoupled, grad_scale=grad_scale)


def test_adam_and_adamw_differ_with_weight_decay(simd_level):
    p0 = torch.randn(257, generator=torch.Generator().manual_seed(2)) * 10
    grads = make_grads(257, torch.float32)
    adam = run_adam(p0, grads, decoupled=False, **ADAM_HP)[0]
    adamw = run_adam(p0, grads, decoupled=True, **ADAM_HP)[0]
    assert (adam - adamw).abs().max() > 1e-4  # the flag is honoured, not ignored


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 15, 17, 31, 33, 127, 1000, 8191, 65537, 1000003])
def test_adam_sizes(simd_level, n):
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(n))
    grads = make_grads(n, torch.bfloat16, seed=n)
    p, m, v, copy = run_adam(p0, grads, copy_dtype=torch.bfloat16, decoupled=True, **ADAM_HP)
    check_adam(p, m, v, copy, p0, grads, decoupled=True)


@pytest.mark.parametrize("grad_scale", [0.5, 3.0, 65536.0])
def test_adam_grad_scale(simd_level, grad_scale):
    n = 999
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(3))
    grads = make_grads(n, torch.float32, scale=grad_scale)
    hp = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0)
    p, m, v, copy = run_adam(p0, grads, grad_scale=grad_scale, decoupled=True, **hp)
    check_adam(p, m, v, copy, p0, grads, decoupled=True, grad_scale=grad_scale, hp=hp)


@pytest.mark.parametrize("offset", [1, 3])
def test_adam_unaligned_views(simd_level, offset):
    """Views starting mid-buffer: same result as aligned buffers, and no write outside them."""
    n = 1037
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(4))
    grads = make_grads(n, torch.float16, scale=8.0)
    aligned = run_adam(p0, grads, copy_dtype=torch.float16, grad_scale=8.0, decoupled=True, **ADAM_HP)

    def canary_buffer(dtype):
        return torch.full((n + 8,), 7.0, dtype=dtype)
    store = {k: canary_buffer(torch.float32) for k in ("p", "m", "v")}
    store["g"], store["copy"] = canary_buffer(torch.float16), canary_buffer(torch.float16)
    view = {k: b[offset:offset + n] for k, b in store.items()}
    view["p"].copy_(p0)
    view["m"].zero_()
    view["v"].zero_()
    for step, g in enumerate(grads, start=1):
        view["g"].copy_(g)
        assert not ops.adam_step(view["p"], view["g"], view["m"], view["v"], step=step,
                                 grad_scale=8.0, param_copy=view["copy"], decoupled=True, **ADAM_HP)
    for name, ours, ref in zip(("param", "exp_avg", "exp_avg_sq", "param_copy"),
                               (view["p"], view["m"], view["v"], view["copy"]), aligned):
        assert_bitwise(ours, ref, f"{name} at offset {offset}")
    for name, buf in store.items():
        outside = torch.cat([buf[:offset], buf[offset + n:]])
        assert (outside == 7.0).all(), f"{name}: wrote outside its view"


# torch.optim flags beyond the plain update: AMSGrad and maximize, against float64 torch.optim.
ADAM_FLAGS = {
    "amsgrad": dict(amsgrad=True, maximize=False),
    "maximize": dict(amsgrad=False, maximize=True),
    "amsgrad+maximize": dict(amsgrad=True, maximize=True),
}


@pytest.mark.parametrize("flags", list(ADAM_FLAGS))
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=dtype_id)
def test_adam_flags_match_torch(simd_level, grad_dtype, decoupled, flags):
    n = 1021
    grad_scale = 1024.0 if grad_dtype == torch.float16 else 1.0
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(12))
    # Shrinking gradients make exp_avg_sq fall below its running max, so the max matters.
    grads = [g * (0.25 ** k) for k, g in enumerate(make_grads(n, torch.float64, steps=4,
                                                              scale=grad_scale))]
    grads = [g.to(grad_dtype) for g in grads]
    # beta2 = 0.9: exp_avg_sq follows the shrinking gradients quickly, far below its max.
    hp = dict(ADAM_HP, betas=(0.9, 0.9), **ADAM_FLAGS[flags])
    v_max = []
    p, m, v, _ = run_adam(p0, grads, grad_scale=grad_scale, decoupled=decoupled, max_out=v_max,
                          **hp)
    ref_p, ref_m, ref_v, ref_max = adam_reference(p0, grads, decoupled=decoupled,
                                                  grad_scale=grad_scale, **hp)
    steps = len(grads)
    assert_param_close(p, ref_p, steps=steps, lr=hp["lr"])
    gmax = max(g.double().abs().max().item() / grad_scale for g in grads)
    assert_moment_close(m, ref_m, rtol=8 * steps * U24, atol=8 * steps * U24 * gmax, what="exp_avg")
    assert_moment_close(v, ref_v, rtol=8 * steps * U24, atol=0.0, what="exp_avg_sq")
    if hp["amsgrad"]:
        assert_moment_close(v_max[0], ref_max, rtol=8 * steps * U24, atol=0.0, what="max_exp_avg_sq")
        assert (v_max[0] > v).any(), "the max never differed from exp_avg_sq: the test proves nothing"
    # The flag is honoured, not ignored: the plain update lands elsewhere.
    plain_hp = dict(hp, amsgrad=False, maximize=False)
    plain = run_adam(p0, grads, grad_scale=grad_scale, decoupled=decoupled, **plain_hp)[0]
    assert (p - plain).abs().max() > 1e-4


def test_adam_amsgrad_views_leave_neighbours_alone(simd_level):
    """max_exp_avg_sq as a view into a bigger buffer (as ZeroAdam passes shard pieces)."""
    n, offset = 1037, 3
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(13))
    grads = make_grads(n, torch.bfloat16)
    expected_max = []
    expected = run_adam(p0, grads, decoupled=True, amsgrad=True, max_out=expected_max, **ADAM_HP)
    store = torch.full((n + 8,), 7.0)
    p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
    view = store[offset:offset + n]
    view.zero_()
    for step, g in enumerate(grads, start=1):
        assert not ops.adam_step(p, g, m, v, step=step, decoupled=True, amsgrad=True,
                                 max_exp_avg_sq=view, **ADAM_HP)
    assert_bitwise(p, expected[0], "param")
    assert_bitwise(view, expected_max[0], "max_exp_avg_sq view")
    assert (torch.cat([store[:offset], store[offset + n:]]) == 7.0).all()


# ---- SGD -------------------------------------------------------------------------------------

SGD_CASES = {
    "plain": dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
    "momentum": dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.01),
    "dampening": dict(momentum=0.9, dampening=0.3, nesterov=False, weight_decay=0.0),
    "nesterov": dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.05),
    # maximize negates the gradient before weight decay and momentum, as torch does.
    "maximize": dict(momentum=0.9, dampening=0.3, nesterov=False, weight_decay=0.05, maximize=True),
    "maximize plain": dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.05,
                           maximize=True),
}


def run_sgd(p0, grads, *, copy_dtype=None, grad_scale=1.0, lr, **hp):
    p = p0.clone()
    buf = torch.full_like(p0, float("nan")) if hp["momentum"] else None  # first_step must overwrite it
    copy = None if copy_dtype is None else torch.empty(p0.numel(), dtype=copy_dtype)
    for step, g in enumerate(grads, start=1):
        assert ops.sgd_step(p, g, buf, lr=lr, first_step=step == 1, grad_scale=grad_scale,
                            param_copy=copy, **hp) is False
    return p, buf, copy


@pytest.mark.parametrize("case", list(SGD_CASES))
@pytest.mark.parametrize("copy_dtype", COPY_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=dtype_id)
def test_sgd_matches_torch(simd_level, grad_dtype, copy_dtype, case):
    n, lr = 1009, 0.05
    hp = SGD_CASES[case]
    grad_scale = 256.0 if grad_dtype == torch.float16 else 1.0
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(5))
    grads = make_grads(n, grad_dtype, steps=4, scale=grad_scale)
    p, buf, copy = run_sgd(p0, grads, copy_dtype=copy_dtype, grad_scale=grad_scale, lr=lr, **hp)
    ref_p, ref_buf = sgd_reference(p0, grads, lr=lr, grad_scale=grad_scale, **hp)
    assert_param_close(p, ref_p, steps=4, lr=lr)
    if hp["momentum"]:
        # buf = momentum*buf + (1-dampening)*d: a few fp32 roundings per step, |buf| <= ~5|g|.
        assert_moment_close(buf, ref_buf, rtol=16 * U24 * 4, atol=16 * U24 * 4 * 5, what="momentum_buffer")
    if copy is not None:
        assert_bitwise(copy, p.to(copy_dtype), "param_copy vs param.to()")


# ---- non-finite gradients --------------------------------------------------------------------

NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
N_MULTI_CHUNK = 100003  # several threads' chunks, so the bad element may sit in any of them


def bad_index(where, n):
    return {"first": 0, "middle": n // 2 + 1, "last": n - 1}[where]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", list(NONFINITE))
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=dtype_id)
def test_adam_nonfinite_grad_skips_step(simd_level, grad_dtype, bad, where):
    n = N_MULTI_CHUNK
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(6))
    g1, g2 = make_grads(n, grad_dtype, steps=2)
    p, m, v, copy = run_adam(p0, [g1], copy_dtype=torch.bfloat16, decoupled=True, **ADAM_HP)
    before = [t.clone() for t in (p, m, v, copy)]
    g2[bad_index(where, n)] = NONFINITE[bad]
    assert ops.adam_step(p, g2, m, v, step=2, param_copy=copy, decoupled=True, **ADAM_HP) is True
    for name, now, then in zip(("param", "exp_avg", "exp_avg_sq", "param_copy"), (p, m, v, copy), before):
        assert_bitwise(now, then, f"{name} after a skipped step")


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", list(NONFINITE))
def test_sgd_nonfinite_grad_skips_step(simd_level, bad, where):
    n = N_MULTI_CHUNK
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(7))
    g1, g2 = make_grads(n, torch.float16, steps=2)
    p, buf, copy = run_sgd(p0, [g1], copy_dtype=torch.float16, lr=0.1, **SGD_CASES["momentum"])
    before = [t.clone() for t in (p, buf, copy)]
    g2[bad_index(where, n)] = NONFINITE[bad]
    assert ops.sgd_step(p, g2, buf, lr=0.1, param_copy=copy, **SGD_CASES["momentum"]) is True
    for name, now, then in zip(("param", "momentum_buffer", "param_copy"), (p, buf, copy), before):
        assert_bitwise(now, then, f"{name} after a skipped step")


def test_check_finite_false_skips_the_check(simd_level):
    n = 4099
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(8))
    grads = make_grads(n, torch.bfloat16)
    checked = run_adam(p0, grads, copy_dtype=torch.float16, decoupled=True, **ADAM_HP)
    unchecked = run_adam(p0, grads, copy_dtype=torch.float16, decoupled=True, check_finite=False, **ADAM_HP)
    for a, b, name in zip(unchecked, checked, ("param", "exp_avg", "exp_avg_sq", "param_copy")):
        assert_bitwise(a, b, f"{name} with check_finite=False")
    # With the check off, a NaN gradient is applied: only its own element turns NaN.
    p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
    g = grads[0].clone()
    g[17] = math.nan
    assert ops.adam_step(p, g, m, v, step=1, check_finite=False, **ADAM_HP) is False
    assert p.isnan().nonzero().flatten().tolist() == [17]
    p, buf = p0.clone(), torch.zeros(n)
    assert ops.sgd_step(p, g, buf, lr=0.1, momentum=0.9, first_step=True, check_finite=False) is False
    assert p.isnan().nonzero().flatten().tolist() == [17]


# ---- argument checking -----------------------------------------------------------------------

def _adam_args(n=8):
    return dict(param=torch.zeros(n), grad=torch.zeros(n), exp_avg=torch.zeros(n),
                exp_avg_sq=torch.zeros(n), lr=1e-3, step=1)


def _adam_call(**change):
    args = _adam_args()
    args.update(change)
    return lambda: ops.adam_step(args.pop("param"), args.pop("grad"), args.pop("exp_avg"),
                                 args.pop("exp_avg_sq"), **args)


def _sgd_call(**change):
    args = dict(param=torch.zeros(8), grad=torch.zeros(8), momentum_buffer=torch.zeros(8),
                lr=0.1, momentum=0.9)
    args.update(change)
    return lambda: ops.sgd_step(args.pop("param"), args.pop("grad"), args.pop("momentum_buffer"), **args)


META = torch.zeros(8, device="meta")
BAD_CALLS = {
    "param dtype": (_adam_call(param=torch.zeros(8, dtype=torch.float16)), TypeError, "param"),
    "param not a tensor": (_adam_call(param=[0.0] * 8), TypeError, "param"),
    "grad dtype": (_adam_call(grad=torch.zeros(8, dtype=torch.int32)), TypeError, "grad"),
    "exp_avg dtype": (_adam_call(exp_avg=torch.zeros(8, dtype=torch.bfloat16)), TypeError, "exp_avg"),
    "exp_avg_sq dtype": (_adam_call(exp_avg_sq=torch.zeros(8, dtype=torch.float64)), TypeError, "exp_avg_sq"),
    "param_copy fp32": (_adam_call(param_copy=torch.zeros(8)), TypeError, "param_copy"),
    "grad strided": (_adam_call(grad=torch.zeros(16)[::2]), ValueError, "grad"),
    "param strided": (_adam_call(param=torch.zeros(4, 4)[:, :2].t()), ValueError, "param"),
    "exp_avg size": (_adam_call(exp_avg=torch.zeros(7)), ValueError, "exp_avg"),
    "param_copy size": (_adam_call(param_copy=torch.zeros(9, dtype=torch.bfloat16)), ValueError, "param_copy"),
    "grad on meta": (_adam_call(grad=META), ValueError, "grad"),
    "param on meta": (_adam_call(param=META), ValueError, "param"),
    "step 0": (_adam_call(step=0), ValueError, "step"),
    "step float": (_adam_call(step=1.0), TypeError, "step"),
    "lr negative": (_adam_call(lr=-1e-3), ValueError, "lr"),
    "lr nan": (_adam_call(lr=math.nan), ValueError, "lr"),
    "beta1 = 1": (_adam_call(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
    "beta1 < 0": (_adam_call(betas=(-0.1, 0.999)), ValueError, r"betas\[0\]"),
    "beta2 > 1": (_adam_call(betas=(0.9, 1.5)), ValueError, r"betas\[1\]"),
    "betas single": (_adam_call(betas=(0.9,)), ValueError, "betas"),
    "eps negative": (_adam_call(eps=-1e-8), ValueError, "eps"),
    "weight_decay negative": (_adam_call(weight_decay=-0.1), ValueError, "weight_decay"),
    "grad_scale 0": (_adam_call(grad_scale=0.0), ValueError, "grad_scale"),
    "found_inf on cpu": (_adam_call(found_inf=torch.zeros(1, dtype=torch.int32)), ValueError, "found_inf"),
    "amsgrad without max_exp_avg_sq": (_adam_call(amsgrad=True), ValueError, "max_exp_avg_sq"),
    "max_exp_avg_sq without amsgrad": (_adam_call(max_exp_avg_sq=torch.zeros(8)), ValueError, "amsgrad"),
    "max_exp_avg_sq dtype": (_adam_call(amsgrad=True, max_exp_avg_sq=torch.zeros(8, dtype=torch.float16)),
                             TypeError, "max_exp_avg_sq"),
    "max_exp_avg_sq size": (_adam_call(amsgrad=True, max_exp_avg_sq=torch.zeros(9)), ValueError,
                            "max_exp_avg_sq"),
    "sgd no momentum_buffer": (_sgd_call(momentum_buffer=None), ValueError, "momentum_buffer"),
    "sgd momentum_buffer dtype": (_sgd_call(momentum_buffer=torch.zeros(8, dtype=torch.bfloat16)),
                                  TypeError, "momentum_buffer"),
    "sgd momentum_buffer size": (_sgd_call(momentum_buffer=torch.zeros(5)), ValueError, "momentum_buffer"),
    "sgd lr negative": (_sgd_call(lr=-0.1), ValueError, "lr"),
    "sgd momentum negative": (_sgd_call(momentum=-0.5), ValueError, "momentum"),
    "sgd nesterov with dampening": (_sgd_call(nesterov=True, dampening=0.1), ValueError, "nesterov"),
    "sgd grad on meta": (_sgd_call(grad=META), ValueError, "grad"),
    "norm dtype": (lambda: ops.l2_norm_sq(torch.zeros(4, dtype=torch.int64)), TypeError, "t"),
    "norm nonfinite dtype": (lambda: ops.l2_norm_sq(torch.zeros(4), nonfinite=torch.zeros(1)),
                             TypeError, "nonfinite"),
    "norm nonfinite size": (lambda: ops.l2_norm_sq(torch.zeros(4), nonfinite=torch.zeros(2, dtype=torch.int32)),
                            ValueError, "nonfinite"),
    "scale strided": (lambda: ops.scale_(torch.zeros(8)[::2], 2.0), ValueError, "t"),
    "cast dst size": (lambda: ops.cast_(torch.zeros(3), torch.zeros(4)), ValueError, "dst"),
    "cast src dtype": (lambda: ops.cast_(torch.zeros(4), torch.zeros(4, dtype=torch.float64)), TypeError, "src"),
    "threads 0": (lambda: ops.set_num_threads(0), ValueError, "num_threads"),
    "simd level name": (lambda: ops.set_simd_level("sse9"), ValueError, "simd level"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_naming_them(case):
    call, exc, name = BAD_CALLS[case]
    with pytest.raises(exc) as info:
        call()
    # The argument is named as a word of its own ("grad", not inside "grad_scale").
    assert re.search(rf"(^|[^\w]){name}($|[^\w])", str(info.value)), str(info.value)


def test_rejected_step_writes_nothing():
    p, m = torch.ones(8), torch.full((8,), 2.0)
    with pytest.raises(ValueError):
        ops.adam_step(p, torch.ones(8), m, torch.zeros(8), lr=-1.0, step=1)
    assert (p == 1).all() and (m == 2).all()


# ---- l2_norm_sq, all_finite ------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 13, 4096, 4097, 65539, 1000003])
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=dtype_id)
def test_l2_norm_sq_exact_on_small_integers(simd_level, dtype, n):
    """Values in {-3..3}: every partial sum is an integer below 2^24, so any summation order is
    exact. A dropped, doubled or misread element changes the result."""
    x = torch.randint(-3, 4, (n,), generator=torch.Generator().manual_seed(n)).to(dtype)
    out = ops.l2_norm_sq(x)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert out.item() == x.double().square().sum().item()


@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=dtype_id)
def test_l2_norm_sq_matches_float64(simd_level, dtype):
    # Squares are nonnegative, so fp32 partial sums err by <= (terms per partial) * 2^-24
    # relative; the core keeps partials to short blocks and sums them in double. 1e-4 bounds
    # partials of up to ~1600 terms; a lost 1000-element block (1e-3 of 1e6) would fail it.
    x = (torch.randn(1000003, generator=torch.Generator().manual_seed(9)) * 3).to(dtype)
    ref = x.double().square().sum().item()
    assert ops.l2_norm_sq(x).item() == pytest.approx(ref, rel=1e-4)


def test_l2_norm_sq_deterministic_across_threads(simd_level, restore_num_threads):
    x = torch.randn(1000003, generator=torch.Generator().manual_seed(10))
    results = set()
    for threads in (1, 2, 3, 4):
        ops.set_num_threads(threads)
        assert ops.num_threads() == threads
        results.add(ops.l2_norm_sq(x).item())
        results.add(ops.l2_norm_sq(x).item())
    assert len(results) == 1, results


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", list(NONFINITE))
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=dtype_id)
def test_l2_norm_sq_nonfinite_flag(simd_level, dtype, bad, where):
    n = N_MULTI_CHUNK
    x = torch.randn(n, generator=torch.Generator().manual_seed(11)).to(dtype)
    flag = torch.zeros(1, dtype=torch.int32)
    ops.l2_norm_sq(x, nonfinite=flag)
    assert flag.item() == 0 and ops.all_finite(x) is True
    x[bad_index(where, n)] = NONFINITE[bad]
    ops.l2_norm_sq(x, nonfinite=flag)
    assert flag.item() == 1 and ops.all_finite(x) is False
    x[bad_index(where, n)] = 0.0
    ops.l2_norm_sq(x, nonfinite=flag)
    assert flag.item() == 1  # left alone when clean: the flag accumulates over calls


def test_all_finite_empty(simd_level):
    assert ops.all_finite(torch.zeros(0, dtype=torch.bfloat16)) is True


# ---- scale_, cast_ ---------------------------------------------------------------------------

def special_float32() -> torch.Tensor:
    """Zeros, infinities, NaN, limits, ties and subnormals of float32, bfloat16 and float16,
    plus 200k random bit patterns (every exponent, NaN payloads included)."""
    named = [0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 3.4028234663852886e38,
             1.1754943508222875e-38, 1e-40, -1.4e-45, 65504.0, 65519.99, 65520.0, 70000.0, -1e38,
             2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * (1 + 2.0 ** -20), 2.0 ** -26, 2.0 ** -14,
             2.0 ** -14 * (1 - 2.0 ** -11), 6.1e-5, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8,
             1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, -(1 + 2.0 ** -9), 9.2e-41, 3.0e38]
    pattern = torch.randint(-2 ** 31, 2 ** 31, (200000,), dtype=torch.int64,
                            generator=torch.Generator().manual_seed(12)).to(torch.int32)
    return torch.cat([torch.tensor(named, dtype=torch.float32), pattern.view(torch.float32)])


def all_half_bit_patterns(dtype) -> torch.Tensor:
    return torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)


def cast_sources(dtype):
    return special_float32() if dtype == torch.float32 else all_half_bit_patterns(dtype)


@pytest.mark.parametrize("dst_dtype", GRAD_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("src_dtype", GRAD_DTYPES, ids=dtype_id)
def test_cast_matches_torch_to(simd_level, src_dtype, dst_dtype):
    src = cast_sources(src_dtype)
    for offset in (0, 1, 3):  # unaligned starts, and lengths with ragged tails
        s = src[offset:]
        dst = torch.empty(s.numel(), dtype=dst_dtype)
        assert ops.cast_(dst, s) is dst
        assert_bitwise_or_both_nan(dst, s.to(dst_dtype), f"cast {src_dtype}->{dst_dtype} +{offset}")
    ops.cast_(torch.empty(0, dtype=dst_dtype), src[:0])


@pytest.mark.parametrize("factor", [0.5, 3.0, 1.0 / 3.0, 65536.0, 1e-30])
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=dtype_id)
def test_scale_matches_fp32_multiply(simd_level, dtype, factor):
    x = cast_sources(torch.float32).to(dtype) if dtype != torch.float32 else special_float32()
    x = torch.cat([x, torch.randn(4099, generator=torch.Generator().manual_seed(13)).to(dtype)])
    # The core multiplies in fp32 by float32(factor) and rounds once to the tensor's dtype.
    ref = (x.float() * torch.tensor(factor, dtype=torch.float32)).to(dtype)
    t = x[1:].clone()
    assert ops.scale_(t, factor) is t
    assert_bitwise_or_both_nan(t, ref[1:], f"scale_ {dtype} by {factor}")


# ---- threads and SIMD paths agree ------------------------------------------------------------

def op_results(n=70001):
    """A bundle of every kernel's output on awkward data, for cross-configuration comparison."""
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(14))
    out = {}
    for gd in GRAD_DTYPES:
        grads = make_grads(n, gd, scale=64.0, seed=15)
        for name, t in zip(("p", "m", "v", "copy"),
                           run_adam(p0, grads, copy_dtype=torch.bfloat16, grad_scale=64.0,
                                    decoupled=False, **ADAM_HP)):
            out[f"adam {gd} {name}"] = t
        for name, t in zip(("p", "buf", "copy"), run_sgd(p0, grads, copy_dtype=torch.float16,
                                                          grad_scale=64.0, lr=0.1,
                                                          **SGD_CASES["nesterov"])):
            out[f"sgd {gd} {name}"] = t
        out[f"scale {gd}"] = ops.scale_(grads[0].clone(), 0.37)
        out[f"norm {gd}"] = ops.l2_norm_sq(grads[1])
    src = special_float32()
    for dd in (torch.bfloat16, torch.float16):
        out[f"cast f32->{dd}"] = ops.cast_(torch.empty(src.numel(), dtype=dd), src)
    return out


def test_results_independent_of_thread_count(restore_num_threads):
    ops.set_num_threads(1)
    single = op_results()
    for threads in (2, 3):
        ops.set_num_threads(threads)
        for key, value in op_results().items():
            assert_bitwise_or_both_nan(value.reshape(-1), single[key].reshape(-1), f"{key}, {threads} threads")


@pytest.mark.parametrize("level", ["avx2", "avx512"])
def test_simd_paths_match_scalar(level):
    """Every SIMD path must reproduce the scalar path (the reference the vector code is written
    against) bitwise for the elementwise kernels; norms may sum in another order."""
    if level not in available_simd_levels():
        pytest.skip(f"SIMD path {level} unavailable on this CPU/build")
    start = ops.simd_level()
    try:
        ops.set_simd_level("scalar")
        reference = op_results()
        ops.set_simd_level(level)
        assert ops.simd_level() == level
        ours = op_results()
    finally:
        ops.set_simd_level(start)
    for key, value in ours.items():
        if key.startswith("norm"):
            assert value.item() == pytest.approx(reference[key].item(), rel=1e-5), key
        else:
            assert_bitwise_or_both_nan(value, reference[key], f"{key} on {level}")


def test_set_simd_level_round_trip():
    levels = available_simd_levels()
    assert "scalar" in levels and ops.simd_level() in levels
    start = ops.simd_level()
    for level in levels:
        ops.set_simd_level(level)
        assert ops.simd_level() == level
    ops.set_simd_level(start)
