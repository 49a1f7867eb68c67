"""Parameters without a gradient in a step are skipped as torch.optim skips them.

torch.optim leaves a parameter whose p.grad is None at step() exactly as it is: no weight decay,
no moment decay, and its own `step` count stays (later bias corrections use it; SGD's momentum
buffer starts at the parameter's own first step). HeadsNet has three heads on a shared trunk:
- `aux`: used on some steps only, the same on every rank (and on one step used, but its p.grad
  set to None by the script after backward: "no gradient", as in torch);
- `solo`: used on some steps on rank 0 only. It did get a gradient on some rank, so it is updated
  with the rank-averaged gradient (rank 0's over the world size), as DDP with
  find_unused_parameters gives;
- `never`: never used: it must come out bitwise equal to its initial value.

The oracle is stock torch.optim on one process: its loss is the mean over ranks of every rank's
loss (each computed on that rank's slice, as the rank computes it), so its gradient is exactly
the rank-averaged one. Stages 0-3, world sizes 1-3, AdamW, SGD (momentum) and Adagrad through
ZeroRedundancy; state_dict / full_state_dict (per-parameter steps as torch's) and
zeroshard.checkpoint round trips mid-training.
"""
import os

import pytest
import torch
from torch import nn

import zeroshard
from dist_harness import run_distributed
from zero_oracle import (OPTIMIZERS, TINY_BUCKET_MB, VOCAB, WIDTH, assert_params_close,
                         assert_ranks_identical, make_batches, oracle_optimizer, rank_slice)

STEPS = 6
MICRO = 2
STAGES = (0, 1, 2, 3)
AUX_STEPS = {0: (0, 1), 2: (0, 1), 3: (1,), 4: (0, 1)}  # step -> micro-steps using aux
AUX_DROPPED = {2}  # steps where the script sets aux's p.grad = None after backward
SOLO_STEPS = {1: (0, 1), 3: (0,), 4: (1,)}  # step -> micro-steps using solo, on rank 0 only


class HeadsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList([nn.Linear(WIDTH, 31), nn.Linear(31, WIDTH)])
        self.aux = nn.Linear(WIDTH, 3)
        self.solo = nn.Linear(WIDTH, 5)
        self.never = nn.Linear(WIDTH, 2)

    def forward(self, tokens, aux: bool, solo: bool):
        h = self.embed(tokens)
        h = self.blocks[1](torch.tanh(self.blocks[0](h)))
        extra = torch.zeros((), dtype=h.dtype)
        if aux:
            extra = extra + self.aux(h).pow(2).mean()
        if solo:
            extra = extra + 0.5 * self.solo(h).pow(2).mean()
        return h, extra


def make_heads_net(seed: int = 0) -> HeadsNet:
    torch.manual_seed(seed)
    return HeadsNet()


def rank_loss(model, tokens, target, step, micro, rank, world_size):
    """What `rank` computes in micro-step `micro` of `step` (its slice of the global batch)."""
    tokens, target = rank_slice(tokens, rank, world_size), rank_slice(target, rank, world_size)
    tokens, target = rank_slice(tokens, micro, MICRO), rank_slice(target, micro, MICRO)
    aux = micro in AUX_STEPS.get(step, ())
    solo = rank == 0 and micro in SOLO_STEPS.get(step, ())
    out, extra = model(tokens, aux, solo)
    return (((out - target) ** 2).mean() + extra) / MICRO


def drop_aux_grads(model, step):
    if step in AUX_DROPPED:
        model.aux.weight.grad = None
        model.aux.bias.grad = None


def train_oracle_steps(model, opt, batches, first, world_size):
    for step in range(first, len(batches)):
        tokens, target = batches[step]
        opt.zero_grad(set_to_none=True)
        loss = sum(rank_loss(model, tokens, target, step, m, r, world_size)
                   for r in range(world_size) for m in range(MICRO)) / world_size
        loss.backward()
        drop_aux_grads(model, step)
        opt.step()


def build(kind, model, stage, **extra):
    cls, hyper = OPTIMIZERS[kind]
    kwargs = dict(hyper, stage=stage, bucket_mb=TINY_BUCKET_MB, **extra)
    params = model if stage == 3 else model.parameters()
    if kind == "Adagrad":
        return zeroshard.ZeroRedundancy(params, optimizer_class=cls, **kwargs)
    return getattr(zeroshard, "Zero" + kind)(params, **kwargs)


def train_rank_steps(model, opt, batches, first, last, rank, world_size):
    for step in range(first, last):
        tokens, target = batches[step]
        opt.zero_grad(set_to_none=True)
        for m in range(MICRO):
            loss = rank_loss(model, tokens, target, step, m, rank, world_size)
            if m < MICRO - 1:
                with opt.no_sync():
                    loss.backward()
            else:
                loss.backward()
        drop_aux_grads(model, step)
        opt.step()


def snapshot(model, opt):
    with opt.full_params():
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def set_values(model, opt, values):
    """Writes parameter values into a model trained by `opt` (any stage)."""
    with opt.full_params(writeback=True):
        with torch.no_grad():
            for p, v in zip(model.parameters(), values.values()):
                p.copy_(v)


def oracle(kind, world_size, steps=STEPS, **overrides):
    model = make_heads_net()
    opt = oracle_optimizer(kind, model.parameters(), **overrides)
    train_oracle_steps(model, opt, make_batches(steps), 0, world_size)
    return model, opt


def _train_all(rank, world_size, kinds, stages):
    results = {}
    batches = make_batches(STEPS)
    for kind in kinds:
        for stage in stages:
            model = make_heads_net()
            opt = build(kind, model, stage)
            train_rank_steps(model, opt, batches, 0, STEPS, rank, world_size)
            results[f"{kind}/stage{stage}"] = snapshot(model, opt)
    return results


def _check(per_rank, world_size):
    start = {n: p.detach().clone() for n, p in make_heads_net().named_parameters()}
    failures = []
    oracles = {}
    for key in per_rank[0]:
        kind = key.split("/")[0]
        if kind not in oracles:
            model, _ = oracle(kind, world_size)
            oracles[kind] = {n: p.detach().clone() for n, p in model.named_parameters()}
        try:
            assert_ranks_identical([r[key] for r in per_rank], f"{key} ws={world_size}")
            assert_params_close(per_rank[0][key], oracles[kind], f"{key} ws={world_size}")
            for name in ("never.weight", "never.bias"):
                assert torch.equal(per_rank[0][key][name], start[name]), \
                    f"{key} ws={world_size}: {name} changed without ever getting a gradient"
        except AssertionError as err:
            failures.append(str(err))
    assert not failures, f"{len(failures)} of {len(per_rank[0])} runs differ:\n" + "\n".join(failures)
    # The heads moved where they should have: the test would not pass with them frozen.
    some = per_rank[0][next(iter(per_rank[0]))]
    assert not torch.equal(some["solo.weight"], start["solo.weight"])
    assert not torch.equal(some["aux.weight"], start["aux.weight"])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_unused_params_match_torch_optim(world_size):
    per_rank = run_distributed(_train_all, world_size, ("AdamW", "SGD", "Adagrad"), STAGES,
                               timeout_s=400)
    _check(per_rank, world_size)


def test_old_behaviour_would_differ():
    """The oracle is sensitive to the skipping: updating every parameter every step (what
    zeroshard did before) gives different heads."""
    model, _ = oracle("AdamW", 2)
    ref = make_heads_net()
    opt = oracle_optimizer("AdamW", ref.parameters())
    batches = make_batches(STEPS)
    for step in range(STEPS):
        tokens, target = batches[step]
        opt.zero_grad(set_to_none=True)
        loss = sum(rank_loss(ref, tokens, target, step, m, r, 2)
                   for r in range(2) for m in range(MICRO)) / 2
        loss.backward()
        for p in ref.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        opt.step()
    assert not torch.allclose(model.aux.weight, ref.aux.weight, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(model.never.weight, ref.never.weight, rtol=1e-4, atol=1e-5)


# ---- state dicts and checkpoints mid-training ------------------------------------------------

HALF = 3


def _extra(kind):
    return {"amsgrad": True} if kind == "AdamW" else {}


def _state_dicts(rank, world_size, stage, load_stage):
    batches = make_batches(STEPS)
    out = {}
    for kind in ("AdamW", "SGD"):
        model = make_heads_net()
        opt = build(kind, model, stage, **_extra(kind))
        train_rank_steps(model, opt, batches, 0, HALF, rank, world_size)
        mid = snapshot(model, opt)
        full = opt.full_state_dict()
        shard = opt.state_dict()
        out[f"{kind}/full"] = {k: {n: v.clone() for n, v in e.items()}
                               for k, e in full["state"].items()}
        # full_state_dict -> a fresh optimizer at another stage, then train on.
        model2 = make_heads_net(seed=7)
        opt2 = build(kind, model2, load_stage, **_extra(kind))
        set_values(model2, opt2, mid)
        opt2.load_state_dict(full)
        train_rank_steps(model2, opt2, batches, HALF, STEPS, rank, world_size)
        out[f"{kind}/full_resumed"] = snapshot(model2, opt2)
        # state_dict (this rank's shard) -> the same stage; and the pre-per-parameter format.
        for variant in ("shard", "old_shard"):
            sd = shard
            if variant == "old_shard":
                sd = dict(shard, state={i: {k: v for k, v in s.items() if k != "param_steps"}
                                        for i, s in shard["state"].items()})
            model3 = make_heads_net(seed=7)
            opt3 = build(kind, model3, stage, **_extra(kind))
            set_values(model3, opt3, mid)
            opt3.load_state_dict(sd)
            if variant == "old_shard":  # every parameter takes the flat group's count
                out[f"{kind}/old_steps"] = sorted(
                    {n for s in opt3.shard_state for n in s["param_steps"]})
                continue
            train_rank_steps(model3, opt3, batches, HALF, STEPS, rank, world_size)
            out[f"{kind}/{variant}_resumed"] = snapshot(model3, opt3)
        if kind == "AdamW":
            train_rank_steps(model, opt, batches, HALF, STEPS, rank, world_size)
            out[f"{kind}/straight"] = snapshot(model, opt)
    return out


@pytest.mark.parametrize("world_size,stage,load_stage", [(1, 2, 0), (2, 1, 3), (3, 3, 2)])
def test_state_dicts_round_trip(world_size, stage, load_stage):
    per_rank = run_distributed(_state_dicts, world_size, stage, load_stage, timeout_s=400)
    names = [n for n, _ in make_heads_net().named_parameters()]
    for kind in ("AdamW", "SGD"):
        model, torch_opt = oracle(kind, world_size, steps=HALF, **_extra(kind))
        torch_state = torch_opt.state_dict()["state"]
        full = per_rank[0][f"{kind}/full"]
        for i, name in enumerate(names):
            mine, theirs = full[i], torch_state.get(i)
            if theirs is None:  # torch keeps no state for a parameter never stepped
                assert float(mine["step"]) == 0, f"{kind} {name}: {mine['step']}"
                continue
            if "step" in theirs:
                assert float(mine["step"]) == float(theirs["step"]), \
                    f"{kind} {name}: step {mine['step']} vs torch's {theirs['step']}"
            for k, v in theirs.items():
                if k != "step":
                    torch.testing.assert_close(mine[k], v, rtol=1e-5, atol=1e-6,
                                               msg=lambda m, n=name, k=k: f"{kind} {n} {k}: {m}")
        steps = {names[i]: float(e["step"]) for i, e in full.items()}
        assert steps["never.weight"] == 0 and steps["solo.weight"] < steps["blocks.0.weight"]
        final, _ = oracle(kind, world_size, **_extra(kind))
        want = {n: p.detach() for n, p in final.named_parameters()}
        for variant in ("full_resumed", "shard_resumed"):
            assert_ranks_identical([r[f"{kind}/{variant}"] for r in per_rank], f"{kind} {variant}")
            assert_params_close(per_rank[0][f"{kind}/{variant}"], want, f"{kind} {variant}")
        assert per_rank[0][f"{kind}/old_steps"] == [HALF]
    final, _ = oracle("AdamW", world_size, **_extra("AdamW"))
    assert_params_close(per_rank[0]["AdamW/straight"],
                        {n: p.detach() for n, p in final.named_parameters()}, "AdamW straight")


def _checkpoint(rank, world_size, path, stage, load_stage):
    batches = make_batches(STEPS)
    model = make_heads_net()
    opt = build("AdamW", model, stage)
    train_rank_steps(model, opt, batches, 0, HALF, rank, world_size)
    zeroshard.checkpoint.save(path, model=model, optimizer=opt)
    model2 = make_heads_net(seed=11)
    opt2 = build("AdamW", model2, load_stage)
    zeroshard.checkpoint.load(path, model=model2, optimizer=opt2)
    steps = sorted({n for s in opt2.shard_state for n in s["param_steps"]})
    train_rank_steps(model2, opt2, batches, HALF, STEPS, rank, world_size)
    return {"params": snapshot(model2, opt2), "steps": steps,
            "full_steps": {k: float(e["step"]) for k, e in opt2.full_state_dict()["state"].items()}}


@pytest.mark.parametrize("world_size,stage,load_stage", [(2, 2, 3), (3, 3, 1), (1, 0, 2)])
def test_checkpoint_round_trip(tmp_path, world_size, stage, load_stage):
    per_rank = run_distributed(_checkpoint, world_size, os.fspath(tmp_path / "ckpt"), stage,
                               load_stage, timeout_s=400)
    final, torch_opt = oracle("AdamW", world_size)
    assert_ranks_identical([r["params"] for r in per_rank], "resumed from checkpoint")
    assert_params_close(per_rank[0]["params"], {n: p.detach() for n, p in final.named_parameters()},
                        "resumed from checkpoint")
    torch_state = torch_opt.state_dict()["state"]
    for i in range(len(list(final.parameters()))):
        want = float(torch_state[i]["step"]) if i in torch_state else 0.0
        assert per_rank[0]["full_steps"][i] == want
    assert per_rank[0]["steps"][0] == 0 and len(per_rank[0]["steps"]) > 2


def test_export_gives_each_parameter_its_own_step(tmp_path):
    """zeroshard.export of a checkpoint where heads were skipped on some steps: each parameter's
    step is torch's, and a never-stepped parameter has no state (as torch keeps none)."""
    from zeroshard import export
    path = os.fspath(tmp_path / "ckpt")
    run_distributed(_save_after, 2, path, STEPS, timeout_s=200)
    out = os.fspath(tmp_path / "opt.pt")
    export.export(path, os.fspath(tmp_path / "w.safetensors"), optimizer_out=out)
    exported = torch.load(out, weights_only=True)["state"]
    _, torch_opt = oracle("AdamW", 2)
    want = torch_opt.state_dict()["state"]
    assert sorted(exported) == sorted(want)  # the never-used head has no entry in either
    for i, entry in want.items():
        assert float(exported[i]["step"]) == float(entry["step"]), i
        torch.testing.assert_close(exported[i]["exp_avg_sq"], entry["exp_avg_sq"],
                                   rtol=1e-5, atol=1e-8)


def _save_after(rank, world_size, path, steps):
    model = make_heads_net()
    opt = build("AdamW", model, 3)
    train_rank_steps(model, opt, make_batches(steps), 0, steps, rank, world_size)
    zeroshard.checkpoint.save(path, model=model, optimizer=opt)


def _to_flat_inner(opt, inner):
    """An inner state dict in the layout used before per-parameter pieces: one flat master
    parameter per flat group (what older ZeroRedundancy state dicts hold)."""
    state, groups = {}, []
    for i, (g, pieces) in enumerate(zip(inner["param_groups"], opt.inner_pieces)):
        numel = opt.flat_groups[i].shard_numel
        flat = {}
        for index, (a, e, _) in zip(g["params"], pieces):
            for k, v in inner["state"].get(index, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == e - a:
                    flat.setdefault(k, torch.zeros(numel, dtype=v.dtype))[a:e] = v
                else:
                    flat[k] = v
        state[i] = flat
        groups.append(dict(g, params=[i]))
    return {"state": state, "param_groups": groups}


def train_all_used(model, opt, batches, first, last):
    """Every parameter gets a gradient in every step (older state dicts had one step count)."""
    for step in range(first, last):
        tokens, target = batches[step]
        opt.zero_grad()
        out, extra = model(tokens, True, True)
        loss = ((out - target) ** 2).mean() + extra + model.never(out).pow(2).mean()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("stage", [0, 2])
def test_zero_redundancy_loads_flat_inner_state(stage):
    """ZeroRedundancy state dicts saved when the inner optimizer had one flat parameter per
    flat group still load (and training goes on exactly as without the round trip)."""
    import copy
    batches = make_batches(STEPS)
    model = make_heads_net()
    opt = build("Adagrad", model, stage)
    train_all_used(model, opt, batches, 0, HALF)
    sd = copy.deepcopy(opt.state_dict())
    sd["inner"] = _to_flat_inner(opt, sd["inner"])
    mid = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_all_used(model, opt, batches, HALF, STEPS)
    model2 = make_heads_net(seed=5)
    opt2 = build("Adagrad", model2, stage)
    set_values(model2, opt2, mid)
    opt2.load_state_dict(sd)
    train_all_used(model2, opt2, batches, HALF, STEPS)
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), n


# ---- staging buffers that still hold an earlier step's values ---------------------------------

def _reused_buffers_hold_nan(rank, world_size, stage):
    """Every micro-batch synchronised (stages 0/2/3 then copy gradients into staging buffers
    reused from step to step), with every free ring buffer filled with NaN before each
    backward: whatever no gradient wrote (alignment gaps, a head unused on this rank) must still
    reduce as zero. Returns the parameters and whether every reduced gradient, padding
    included, stayed finite."""
    model = make_heads_net()
    opt = build("AdamW", model, stage)
    finite = True
    for step, (tokens, target) in enumerate(make_batches(STEPS)):
        opt.zero_grad(set_to_none=True)
        for m in range(MICRO):
            for ring in opt.reducer.rings.values():
                for slot in ring._free:  # not those of collectives still in flight
                    for t in slot._tensors.values():
                        t.fill_(float("nan"))
            rank_loss(model, tokens, target, step, m, rank, world_size).backward()
        drop_aux_grads(model, step)
        opt._reduced()
        finite = finite and all(bool(torch.isfinite(fg.reduced_grads).all())
                                for fg in opt.flat_groups)
        opt.step()
    return snapshot(model, opt), finite


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_what_no_gradient_wrote_reduces_as_zero_in_reused_buffers(world_size, stage):
    per_rank = run_distributed(_reused_buffers_hold_nan, world_size, stage)
    assert all(finite for _, finite in per_rank), "NaN from a reused buffer reached a gradient"
    assert_ranks_identical([s for s, _ in per_rank], f"stage {stage}")
    model, _ = oracle("AdamW", world_size)
    assert_params_close(per_rank[0][0], {n: p.detach() for n, p in model.named_parameters()},
                        f"stage {stage}, {world_size} ranks, NaN in reused buffers")
