"""Every torch.optim.AdamW / Adam / SGD argument is honoured or refused by ZeroAdamW / ZeroAdam /
ZeroSGD: amsgrad, maximize and decoupled_weight_decay (per param group) against stock
torch.optim at world sizes 1-4 and stages 0/1/2 with awkward sizes; max_exp_avg_sq through
state_dict, checkpoint resharding and export; foreach/fused stored; capturable/differentiable
and unknown arguments refused with errors that say what to do.

The oracle is the stock torch optimizer on the full batch (zero_oracle.py), as in
test_zero_numerics.py.
"""
from __future__ import annotations

import inspect
import os

import pytest
import torch

import zeroshard
from dist_harness import run_distributed
from zero_oracle import (TINY_BUCKET_MB, assert_params_close, assert_ranks_identical,
                         build_optimizer, make_batches, make_model, oracle_optimizer,
                         param_snapshot, train_oracle, train_rank)
from zeroshard import export

STEPS = 5
STAGES = (0, 1, 2)

# Name -> (optimizer kind, constructor overrides, overrides for the second param group). Each
# config turns a flag on in one group and off (or differently) in the other, so per-group
# reading is tested, not just the defaults. beta2 = 0.9 lets exp_avg_sq fall below its running
# maximum within a few steps, so AMSGrad changes the result.
CONFIGS = {
    "AdamW amsgrad, maximize in group 1": (
        "AdamW", dict(amsgrad=True, betas=(0.9, 0.9)), dict(amsgrad=False, maximize=True)),
    "Adam L2 maximize, amsgrad+decoupled in group 1": (
        "Adam", dict(maximize=True, weight_decay=0.05, betas=(0.9, 0.9)),
        dict(maximize=False, amsgrad=True, decoupled_weight_decay=True)),
    "SGD maximize, nesterov in group 1": (
        "SGD", dict(maximize=True), dict(maximize=False, dampening=0.0, nesterov=True)),
}


def param_groups(model, second_group):
    """Two groups over AwkwardNet: embed + fc1 (first), fc2 + codebook (second)."""
    first = [model.embed.weight, *model.fc1.parameters()]
    second = [*model.fc2.parameters(), model.codebook]
    return [{"params": first}, {"params": second, **second_group}]


_oracle_cache = {}


def oracle_params(name: str, steps: int = STEPS):
    if (name, steps) not in _oracle_cache:
        kind, overrides, second = CONFIGS[name]
        model = make_model()
        opt = oracle_optimizer(kind, param_groups(model, second), **overrides)
        train_oracle(model, opt, make_batches(steps))
        _oracle_cache[(name, steps)] = param_snapshot(model)
    return _oracle_cache[(name, steps)]


def _train_configs(rank, world_size):
    results = {}
    for name, (kind, overrides, second) in CONFIGS.items():
        for stage in STAGES:
            model = make_model()
            opt = build_optimizer("zeroshard", kind, param_groups(model, second), stage=stage,
                                  bucket_mb=TINY_BUCKET_MB, **overrides)
            train_rank(model, opt, make_batches(STEPS), rank, world_size)
            results[f"{name}/stage{stage}"] = param_snapshot(model)
    return results


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_flags_per_group_match_torch_optim(world_size):
    per_rank = run_distributed(_train_configs, world_size, timeout_s=300)
    failures = []
    for key in per_rank[0]:
        name = key.split("/")[0]
        try:
            assert_ranks_identical([r[key] for r in per_rank], f"{key} ws={world_size}")
            assert_params_close(per_rank[0][key], oracle_params(name), f"{key} ws={world_size}")
        except AssertionError as err:
            failures.append(str(err))
    assert not failures, f"{len(failures)} of {len(per_rank[0])} runs differ:\n" + "\n".join(failures)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_flag_changes_the_oracle(name):
    """Turning any one flag off moves the oracle's result by far more than the tolerance above,
    so an ignored flag would fail that comparison rather than pass by accident."""
    kind, overrides, second = CONFIGS[name]
    flagged = oracle_params(name)
    flags = {k for k, v in {**overrides, **second}.items() if v is True}
    assert flags, name
    for flag in flags:
        model = make_model()
        without = [{k: (False if k == flag else v) for k, v in d.items()} for d in (overrides, second)]
        train_oracle(model, oracle_optimizer(kind, param_groups(model, without[1]), **without[0]),
                     make_batches(STEPS))
        moved = max((flagged[k] - v).abs().max().item() for k, v in param_snapshot(model).items())
        assert moved > 1e-4, f"{name}: {flag} moves the result by only {moved:.3g}"


# ---- state: state_dict, checkpoint resharding ------------------------------------------------

AMSGRAD = "AdamW amsgrad, maximize in group 1"


def _make_amsgrad(stage, process_group=None):
    kind, overrides, second = CONFIGS[AMSGRAD]
    model = make_model(seed=7)  # not the oracle's init: loading must overwrite it
    opt = build_optimizer("zeroshard", kind, param_groups(model, second), stage=stage,
                          bucket_mb=TINY_BUCKET_MB, process_group=process_group, **overrides)
    return model, opt


def _resume_amsgrad(rank, world_size, root):
    """state_dict round trip at world size 3, and a checkpoint saved at 2 ranks, loaded at 3."""
    import torch.distributed as dist
    batches = make_batches(2 * STEPS)
    out = {}
    # state_dict: train STEPS, copy the state into a fresh optimizer, train STEPS more.
    model, opt = _make_amsgrad(stage=1)
    model.load_state_dict(make_model().state_dict())
    train_rank(model, opt, batches[:STEPS], rank, world_size)
    saved = opt.state_dict()
    out["state_keys"] = sorted(saved["state"][0])
    resumed, opt_r = _make_amsgrad(stage=1)
    resumed.load_state_dict(model.state_dict())
    opt_r.load_state_dict(saved)
    train_rank(resumed, opt_r, batches[STEPS:], rank, world_size)
    out["state_dict"] = param_snapshot(resumed)
    # checkpoint: ranks 0-1 train STEPS at stage 2 and save; all 3 ranks load at stage 0 and go on.
    pair = dist.new_group([0, 1])
    path = os.path.join(root, "ck")
    if rank < 2:
        model, opt = _make_amsgrad(stage=2, process_group=pair)
        model.load_state_dict(make_model().state_dict())
        train_rank(model, opt, batches[:STEPS], rank, 2)
        zeroshard.checkpoint.save(path, model=model, optimizer=opt)
    dist.barrier()
    model, opt = _make_amsgrad(stage=0)
    zeroshard.checkpoint.load(path, model=model, optimizer=opt)
    train_rank(model, opt, batches[STEPS:], rank, world_size)
    out["resharded"] = param_snapshot(model)
    return out


def test_amsgrad_state_survives_state_dict_and_resharding(tmp_path):
    per_rank = run_distributed(_resume_amsgrad, 3, str(tmp_path), timeout_s=300)
    assert "max_exp_avg_sq" in per_rank[0]["state_keys"]
    oracle = oracle_params(AMSGRAD, steps=2 * STEPS)
    for key in ("state_dict", "resharded"):
        assert_ranks_identical([r[key] for r in per_rank], key)
        assert_params_close(per_rank[0][key], oracle, key)


def test_state_dict_without_max_exp_avg_sq_is_refused():
    """A state_dict from an optimizer without amsgrad does not load into one with it."""
    model = make_model()
    plain = zeroshard.ZeroAdamW(model.parameters(), stage=1)
    with_amsgrad = zeroshard.ZeroAdamW(make_model().parameters(), stage=1, amsgrad=True)
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        with_amsgrad.load_state_dict(plain.state_dict())


def test_export_gives_torch_optim_amsgrad_state(tmp_path):
    """--optimizer-out: max_exp_avg_sq exactly where torch has it (amsgrad groups), the group
    flags as torch stores them, and torch.optim.AdamW loads it and steps on identically."""
    kind, overrides, second = CONFIGS[AMSGRAD]
    batches = make_batches(STEPS + 1)
    model = make_model()
    opt = build_optimizer("zeroshard", kind, param_groups(model, second), stage=2,
                          bucket_mb=TINY_BUCKET_MB, **overrides)
    train_rank(model, opt, batches[:STEPS], 0, 1)
    zeroshard.checkpoint.save(str(tmp_path / "ck"), model=model, optimizer=opt)
    weights, opt_file = str(tmp_path / "w.pt"), str(tmp_path / "o.pt")
    assert export.main([str(tmp_path / "ck"), weights, "--optimizer-out", opt_file]) == 0
    exported = torch.load(opt_file, weights_only=True)

    ref_model = make_model()
    ref_opt = oracle_optimizer(kind, param_groups(ref_model, second), **overrides)
    train_oracle(ref_model, ref_opt, batches[:STEPS])
    ref = ref_opt.state_dict()
    for mine, theirs in zip(exported["param_groups"], ref["param_groups"]):
        assert mine == theirs
    assert exported["state"].keys() == ref["state"].keys()
    for i, state in ref["state"].items():
        assert exported["state"][i].keys() == state.keys(), i
        for key, value in state.items():
            torch.testing.assert_close(exported["state"][i][key], value, rtol=1e-5, atol=1e-7,
                                       msg=lambda m, i=i, key=key: f"param {i} {key}: {m}")
    # torch takes it as its own and continues exactly as the oracle does.
    loaded_model = make_model()
    loaded_model.load_state_dict(torch.load(weights, weights_only=True))
    loaded_opt = oracle_optimizer(kind, param_groups(loaded_model, second), **overrides)
    loaded_opt.load_state_dict(exported)
    train_oracle(loaded_model, loaded_opt, batches[STEPS:])
    train_oracle(ref_model, ref_opt, batches[STEPS:])
    assert_params_close(param_snapshot(loaded_model), param_snapshot(ref_model), "after export")


# ---- signatures, stored flags, tensor lr -----------------------------------------------------

PAIRS = [(zeroshard.ZeroAdamW, torch.optim.AdamW), (zeroshard.ZeroAdam, torch.optim.Adam),
         (zeroshard.ZeroSGD, torch.optim.SGD)]


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: c.__name__)
def test_signature_covers_torch(ours, theirs):
    """Every torch argument exists with torch's default and the same positional/keyword kind."""
    mine = inspect.signature(ours.__init__).parameters
    for name, p in inspect.signature(theirs.__init__).parameters.items():
        assert name in mine, f"{ours.__name__} lacks torch's {name}"
        assert mine[name].kind == p.kind, f"{ours.__name__}.{name}: {mine[name].kind} vs {p.kind}"
        assert mine[name].default == p.default, f"{ours.__name__}.{name} default"


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("flag", [dict(foreach=True), dict(fused=True), dict(foreach=False)],
                         ids=lambda f: next(iter(f.items())).__repr__())
def test_foreach_and_fused_are_stored_like_torch(ours, theirs, flag):
    model = make_model()
    zero = ours(model.parameters(), lr=0.01, **flag)
    ref = theirs(model.parameters(), lr=0.01, **flag)
    assert zero.defaults == ref.defaults
    extra = {k: v for k, v in zero.param_groups[0].items() if k != "params"}
    assert extra == {k: v for k, v in ref.param_groups[0].items() if k != "params"}


@pytest.mark.parametrize("kind", ["AdamW", "SGD"])
def test_tensor_lr_follows_torch(kind):
    """A 1-element tensor lr is read at every step, so changing it in place takes effect."""
    batches = make_batches(4)
    runs = {}
    for impl in ("torch", "zeroshard"):
        model, lr = make_model(), torch.tensor(0.02)
        opt = (oracle_optimizer(kind, model.parameters(), lr=lr) if impl == "torch" else
               build_optimizer("zeroshard", kind, model.parameters(), stage=2,
                               bucket_mb=TINY_BUCKET_MB, lr=lr))
        train_rank(model, opt, batches[:2], 0, 1)
        lr.fill_(0.001)
        train_rank(model, opt, batches[2:], 0, 1)
        runs[impl] = param_snapshot(model)
    assert_params_close(runs["zeroshard"], runs["torch"], f"{kind} tensor lr")
    with pytest.raises(ValueError, match="one element"):
        zeroshard.ZeroAdamW(make_model().parameters(), lr=torch.tensor([0.1, 0.2]))


# ---- refusals --------------------------------------------------------------------------------

def _params():
    return make_model().parameters()


REFUSED = {
    "AdamW capturable": (lambda: zeroshard.ZeroAdamW(_params(), capturable=True),
                         ValueError, r"capturable=True.*Leave capturable=False"),
    "Adam capturable": (lambda: zeroshard.ZeroAdam(_params(), capturable=True),
                        ValueError, r"capturable=True"),
    "AdamW differentiable": (lambda: zeroshard.ZeroAdamW(_params(), differentiable=True),
                             ValueError, r"differentiable=True.*torch\.optim\.AdamW"),
    "SGD differentiable": (lambda: zeroshard.ZeroSGD(_params(), differentiable=True),
                           ValueError, r"differentiable=True.*torch\.optim\.SGD"),
    "capturable in a param group": (
        lambda: zeroshard.ZeroAdam([{"params": list(_params()), "capturable": True}]),
        ValueError, r"capturable=True"),
    "differentiable in add_param_group": (
        lambda: zeroshard.ZeroSGD(_params()).add_param_group(
            {"params": [torch.nn.Parameter(torch.zeros(3))], "differentiable": True}),
        ValueError, r"differentiable=True"),
    "foreach and fused": (lambda: zeroshard.ZeroAdamW(_params(), foreach=True, fused=True),
                          ValueError, r"fused=True and foreach=True"),
    "amsgrad to SGD": (lambda: zeroshard.ZeroSGD(_params(), amsgrad=True),
                       TypeError, r"\['amsgrad'\].*accepts.*maximize.*stage"),
    "unknown keyword": (lambda: zeroshard.ZeroAdamW(_params(), stage=1, warmup=10),
                        TypeError, r"\['warmup'\].*accepts.*amsgrad.*bucket_mb"),
    "decoupled_weight_decay to AdamW": (
        lambda: zeroshard.ZeroAdamW(_params(), decoupled_weight_decay=False),
        TypeError, r"decoupled_weight_decay"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_arguments_say_what_to_do(case):
    call, exc, pattern = REFUSED[case]
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize("kind, flag", [("AdamW", "amsgrad"), ("SGD", "momentum")])
def test_state_flag_switched_on_later_is_refused(kind, flag):
    """amsgrad (like SGD momentum) needs state allocated at construction."""
    model = make_model()
    opt = build_optimizer("zeroshard", kind, model.parameters(), stage=2, momentum=0.0) \
        if kind == "SGD" else build_optimizer("zeroshard", kind, model.parameters(), stage=2)
    opt.param_groups[0][flag] = True if flag == "amsgrad" else 0.9
    before = param_snapshot(model)
    train_step = lambda: train_rank(model, opt, make_batches(1), 0, 1)  # noqa: E731
    with pytest.raises(ValueError, match=f"{flag} was switched on after construction"):
        train_step()
    assert all(torch.equal(before[k], v) for k, v in param_snapshot(model).items())
