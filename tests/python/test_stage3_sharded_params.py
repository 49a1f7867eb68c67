"""Stage-3 parameters between steps: sharded parameters that behave like parameters.

Each operation a script applies to weights between steps (inits, clipping, copies, an EMA's
lerp_, norms) runs on a sharded stage-3 model on gloo ranks and on the same unsharded model in
the same process; the sharded result, gathered with zeroshard.full_params, must equal the
unsharded one. Operations that need the whole tensor must raise zeroshard's error, never
return something empty. UnitNet with tiny buckets makes parameters straddle bucket and shard
edges, so a parameter's pieces on a rank are several ranges.
"""
from __future__ import annotations

import copy
import io
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_harness import run_distributed  # noqa: E402
from unit_net import make_unit_net  # noqa: E402
from zero_oracle import TINY_BUCKET_MB, make_batches, rank_slice  # noqa: E402

import zeroshard  # noqa: E402


def _edits(model, gen_seed: int) -> list:
    """What scripts do to weights between steps; returns the reductions they read."""
    torch.manual_seed(gen_seed)
    b0, b1 = model.blocks[0], model.blocks[1]
    with torch.no_grad():
        torch.nn.init.kaiming_uniform_(b0.fc1.weight, a=0.3)  # RNG consumed as unsharded
        b0.fc2.weight.normal_(0.0, 0.05)
        b0.fc1.bias.uniform_(-0.1, 0.1)
        for p in model.parameters():
            p.data.clamp_(-0.2, 0.2)  # a WGAN critic's weight clipping
        b1.fc1.weight.mul_(0.5).add_(0.01)
        b1.fc2.bias.zero_()
        b1.fc1.bias.fill_(0.25)
        b1.fc2.weight.copy_(torch.linspace(-1, 1, b1.fc2.weight.numel()).view_as(b1.fc2.weight))
        b1.fc2.weight.lerp_(torch.full(b1.fc2.weight.shape, 0.5, dtype=b1.fc2.weight.dtype),
                            0.25)  # toward a whole tensor: its pieces are taken
        shadow = b1.fc1.weight.detach().clone()  # the same layout: lerp_ piece by piece
        b1.fc1.weight.lerp_(shadow * 3, 0.5)
        model.codebook.copy_(model.codebook * 2 - 1)  # out-of-place into in-place
        torch._foreach_mul_(list(model.blocks[2].parameters()), 0.9)
        w = model.blocks[2].fc1.weight
        reads = [w.norm(), w.sum(), w.abs().max(), w.mean(), w.min(), w.norm(p=1),
                 torch.linalg.vector_norm(w, float("inf")), (w * w).sum(),
                 model.embed.weight.std()]
    return [float(r) for r in reads]


def _apply_and_compare(rank, world_size, dtype):
    plain = make_unit_net(dtype=dtype)
    model = make_unit_net(dtype=dtype)
    opt = zeroshard.ZeroAdamW(model, lr=1e-2, stage=3, bucket_mb=TINY_BUCKET_MB)
    assert all(isinstance(p, zeroshard.ShardedParameter) for p in model.parameters())
    assert [p.shape for p in model.parameters()] == [p.shape for p in plain.parameters()]
    assert [p.numel() for p in model.parameters()] == [p.numel() for p in plain.parameters()]
    clipped_masters = True
    if dtype != torch.float32:  # clipping reaches the fp32 master itself, not only the bf16 copy
        with torch.no_grad():
            for p, q in zip(model.parameters(), plain.parameters()):
                p.data.clamp_(-0.05, 0.05)
                q.data.clamp_(-0.05, 0.05)
        clipped_masters = all(float(state["master"].abs().max()) <= float(torch.tensor(0.05))
                              for state in opt.shard_state)
    want = _edits(plain, 7)
    got = _edits(model, 7)
    with zeroshard.full_params(model):
        values = {n: p.detach().clone() for n, p in model.named_parameters()}
    masters_follow = True
    if dtype != torch.float32:  # rounding the fp32 master gives the parameter
        for fg, state in zip(opt.flat_groups, opt.shard_state):
            masters_follow &= torch.equal(state["master"].to(dtype), fg.shard_param)
    return values, dict(plain.named_parameters()), got, want, masters_follow, clipped_masters


@pytest.mark.parametrize("world_size,dtype", [(2, torch.float32), (3, torch.float32),
                                              (3, torch.bfloat16)])
def test_edits_between_steps_equal_the_unsharded_model(world_size, dtype):
    # fp32: bitwise. bf16: the sharded model edits its fp32 master and rounds once, where the
    # unsharded bf16 model rounds after every op: equal to within bf16's rounding.
    exact = dtype == torch.float32
    for values, plain, got, want, masters_follow, clipped_masters in run_distributed(
            _apply_and_compare, world_size, dtype, timeout_s=120):
        for name, value in values.items():
            torch.testing.assert_close(value, plain[name].detach(), rtol=0 if exact else 2e-2,
                                       atol=0 if exact else 2e-3, msg=name)
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                                   torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-5 if exact else 2e-2, atol=1e-6)
        assert masters_follow and clipped_masters


def _refusals(rank, world_size):
    model = make_unit_net()
    zeroshard.ZeroAdamW(model, lr=1e-2, stage=3, bucket_mb=TINY_BUCKET_MB)
    w = model.blocks[0].fc1.weight
    tries = {
        "matmul": lambda: w @ torch.ones(w.shape[1]),
        "linear": lambda: torch.nn.functional.linear(torch.ones(2, w.shape[1]), w),
        "view": lambda: w.view(w.shape),
        "reshape": lambda: w.reshape(-1),
        "index": lambda: w[0],
        "tolist": lambda: w.tolist(),
        "sum along a dim": lambda: w.sum(dim=0),
        "torch.save(model)": lambda: torch.save(model, io.BytesIO()),
        "torch.save(state_dict)": lambda: torch.save(model.state_dict(), io.BytesIO()),
        "transpose": lambda: w.t(),
        "module forward outside a gather": lambda: model.blocks[0].fc1.forward(
            torch.ones(2, w.shape[1])),
    }
    messages = {}
    for what, attempt in tries.items():
        try:
            result = attempt()
        except zeroshard.ShardedAccessError as e:
            messages[what] = str(e)
        else:
            messages[what] = f"returned {type(result).__name__} instead of raising"
    return messages


def test_reads_that_need_the_whole_tensor_raise_zeroshards_error():
    for messages in run_distributed(_refusals, 2, timeout_s=120):
        for what, message in messages.items():
            assert "full_params" in message or "zeroshard.checkpoint" in message, (what, message)


def _copies_and_loads(rank, world_size):
    torch.manual_seed(0)
    with zeroshard.sharded_init():
        teacher = make_unit_net(3)
    reference = make_unit_net(3)
    twin = copy.deepcopy(teacher)  # before any optimizer: a sharded copy of a sharded model
    tokens, target = make_batches(1)[0]
    x = rank_slice(tokens, rank, world_size)
    with torch.no_grad():
        outs = [teacher(x), twin(x), reference(x)]
    model = make_unit_net()
    zeroshard.ZeroAdamW(model, lr=1e-2, stage=3, bucket_mb=TINY_BUCKET_MB)
    model.load_state_dict(reference.state_dict())  # whole tensors: each shard takes its part
    ema = copy.deepcopy(model)  # after the optimizer: sharded like the model, independent
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.0)
    local_bytes = sum(p._zs.local.numel() * 4 for p in ema.parameters())
    whole_bytes = sum(p.numel() * 4 for p in ema.parameters())
    with zeroshard.full_params(model), zeroshard.full_params(ema):
        loaded = all(torch.equal(p, q) for p, q in zip(model.parameters(),
                                                        reference.parameters()))
        ema_zero = all(bool((p == 0).all()) for p in ema.parameters())
    with pytest.raises(zeroshard.ShardedAccessError, match="no optimizer"):
        teacher(x)  # grad enabled: a standalone sharded parameter cannot train
    return outs, loaded, ema_zero, local_bytes, whole_bytes, type(ema.blocks[0].fc1.weight)


@pytest.mark.parametrize("world_size", [2, 3])
def test_copies_standalone_forward_and_load_state_dict(world_size):
    for outs, loaded, ema_zero, local_bytes, whole_bytes, kind in run_distributed(
            _copies_and_loads, world_size, timeout_s=120):
        torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)
        torch.testing.assert_close(outs[1], outs[2], rtol=0, atol=0)
        assert loaded, "load_state_dict into a stage-3 model lost values"
        assert ema_zero, "the EMA copy's edits did not stay in the copy"
        assert kind is zeroshard.ShardedParameter
        assert local_bytes < 0.6 * whole_bytes, (local_bytes, whole_bytes)


def test_single_rank_sharded_parameter_face():
    model = make_unit_net()
    plain = make_unit_net()
    zeroshard.ZeroAdamW(model, lr=1e-2, stage=3)
    w, ref = model.blocks[0].fc1.weight, plain.blocks[0].fc1.weight
    assert (w.shape, w.dim(), w.numel(), w.dtype, w.size(1)) == \
        (ref.shape, ref.dim(), ref.numel(), ref.dtype, ref.size(1))
    assert w.requires_grad and w.is_leaf and isinstance(w, torch.nn.Parameter)
    assert "ShardedTensor" in repr(w) and "full_params" in repr(w)
    with pytest.raises(RuntimeError, match="in-place operation"):
        w.mul_(2)  # as torch: a leaf that requires grad, outside no_grad
    # A reduction's value is fine to log; differentiating it is refused at backward.
    norm = w.norm()
    assert float(norm.detach()) == pytest.approx(float(ref.detach().norm()), rel=1e-6)
    with pytest.raises(zeroshard.ShardedAccessError, match="regulariser"):
        (norm * 2).backward()
    with pytest.raises(zeroshard.ShardedAccessError):
        ((w * w).sum() + 1).backward()
    detached = w.detach()
    assert isinstance(detached, zeroshard.ShardedTensor) and not detached.requires_grad
    assert float(detached.clone().mul(2).sum()) == pytest.approx(float((ref.detach() * 2).sum()),
                                                                 rel=1e-6)


class _LibraryParameter(torch.nn.Parameter):
    """A library's own parameter class (as some quantisation and PEFT libraries have)."""


def test_a_parameter_subclass_stays_itself_sharded_and_in_copies():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ModuleList([torch.nn.Linear(3, 3)]))
    model[0].weight = _LibraryParameter(model[0].weight.detach().clone())
    zeroshard.ZeroAdamW(model, lr=1e-2, stage=3)
    w = model[0].weight
    assert isinstance(w, _LibraryParameter) and isinstance(w, zeroshard.ShardedParameter)
    twin = copy.deepcopy(model)[0].weight
    assert isinstance(twin, _LibraryParameter) and isinstance(twin, zeroshard.ShardedParameter)
    assert twin._zs.local is not w._zs.local and torch.equal(twin._zs.local, w._zs.local)
    with zeroshard.full_params(model):
        assert type(model[0].weight) is _LibraryParameter
