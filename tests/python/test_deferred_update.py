"""Stage 3 with offload: the host update runs beside the next forward (see [Note: deferred
update] in deferred_update.py). Exactness is the offload suite's (bitwise the same stage without
offload, test_zero_offload.py) and the user scripts' (EMA, weight clipping right after step(),
test_stage3_user_scripts.py); here: step() returns before the update is done, the update runs
in the last forward's unit order, a unit's gather waits for its own groups only, and whatever
reads parameters or state in between sees the finished update."""
from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from unit_net import make_unit_net  # noqa: E402
from zero_oracle import TINY_BUCKET_MB, make_batches, mse_loss  # noqa: E402

import zeroshard  # noqa: E402
from zeroshard.optimizers import ZeroAdamW  # noqa: E402


def _build(offload="cpu"):
    model = make_unit_net(0)
    opt = zeroshard.ZeroAdamW(model, stage=3, lr=1e-2, weight_decay=0.1, offload=offload,
                              bucket_mb=TINY_BUCKET_MB)
    return model, opt


def _step(model, opt, batch):
    tokens, target = batch
    opt.zero_grad()
    loss = mse_loss(model, tokens, target)
    loss.backward()
    opt.step()
    return float(loss.detach())


@pytest.fixture
def gated(monkeypatch):
    """ZeroAdamW._step_group that records the units it updates and, once armed, holds the
    update of the last group until released."""
    original = ZeroAdamW._step_group
    state = {"order": [], "gate": None, "hold": None}

    def step_group(self, fg, st, group, grad_scale, updated):
        state["order"].append(self.units.unit_of_group[id(fg)].index)
        if state["hold"] is fg:
            state["gate"].wait(30)
        return original(self, fg, st, group, grad_scale, updated)
    monkeypatch.setattr(ZeroAdamW, "_step_group", step_group)
    return state


def test_step_returns_before_the_update_and_the_forward_waits_unit_by_unit(gated):
    model, opt = _build()
    reference_model, reference = _build(offload=None)
    batches = make_batches(3)
    for batch in batches[:2]:
        _step(model, opt, batch)
        _step(reference_model, reference, batch)
    # the update follows the last forward's unit order, the root first
    forward_order = list(opt.units.record)  # the last forward's units, in order
    root = opt.units.root.index
    last_update = gated["order"][-len(opt.flat_groups):]
    assert last_update[0] == root
    seen = [u for u in dict.fromkeys(last_update) if u != root]
    assert seen == [u for u in dict.fromkeys(forward_order) if u != root], (seen, forward_order)
    # hold the last group's update: step() still returns, and the forward runs up to that unit
    held = max(opt.flat_groups, key=lambda fg: forward_order.index(
        opt.units.unit_of_group[id(fg)].index) if opt.units.unit_of_group[id(fg)].index
        in forward_order else -1)
    gated["gate"], gated["hold"] = threading.Event(), held
    _step(model, opt, batches[2])
    _step(reference_model, reference, batches[2])
    assert opt.deferred.pending and opt.deferred.returned_early >= 1
    reached = []
    hooks = [u.module.register_forward_pre_hook(lambda m, a, i=u.index: reached.append(i))
             for u in opt.units.units]
    held_unit = opt.units.unit_of_group[id(held)]
    threading.Timer(0.3, gated["gate"].set).start()
    tokens, target = make_batches(4)[3]
    loss = mse_loss(model, tokens, target)
    for h in hooks:
        h.remove()
    assert held_unit.index in reached and reached[0] != held_unit.index  # earlier units ran first
    assert float(loss.detach()) == float(mse_loss(reference_model, tokens, target).detach())
    with opt.full_params(), reference.full_params():
        for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
            assert torch.equal(p, q), name


def test_what_the_script_does_between_steps_sees_the_finished_update(gated):
    """An EMA's lerp_, a norm, a state_dict and a checkpoint right after step() all wait for the
    update (here held until a timer releases it)."""
    model, opt = _build()
    reference_model, reference = _build(offload=None)
    batches = make_batches(2)
    for batch in batches:
        _step(model, opt, batch)
        _step(reference_model, reference, batch)
    gated["gate"], gated["hold"] = threading.Event(), opt.flat_groups[-1]
    batch = make_batches(3)[2]
    _step(model, opt, batch)
    _step(reference_model, reference, batch)
    threading.Timer(0.2, gated["gate"].set).start()
    p = list(model.parameters())[-1]
    q = list(reference_model.parameters())[-1]
    assert float(p.detach().norm()) == float(q.detach().norm())  # waited for the held group
    assert not opt.deferred.pending
    state = opt.state_dict()
    ref_state = reference.state_dict()
    assert state["state"].keys() == ref_state["state"].keys()
    for k in state["state"]:
        for key, value in state["state"][k].items():
            if isinstance(value, torch.Tensor) and key != "master":
                assert torch.equal(value, ref_state["state"][k][key]), (k, key)


def test_an_error_in_the_deferred_update_reaches_the_script(monkeypatch):
    model, opt = _build()
    _step(model, opt, make_batches(1)[0])
    opt.settle()

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")
    monkeypatch.setattr(ZeroAdamW, "_step_group", broken)
    tokens, target = make_batches(2)[1]
    opt.zero_grad()
    mse_loss(model, tokens, target).backward()
    opt.step()  # returns: the update runs on the worker
    with pytest.raises(RuntimeError, match="kernel failed"):
        mse_loss(model, tokens, target)  # the first gather waits for it and raises its error
