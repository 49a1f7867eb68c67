"""The drop-in contract in scripts written for torch.optim + DDP, not for zeroshard (issue 7).

Each test's training loop is written the way public training scripts write it — model.to()
after the optimizer, model.zero_grad() or no zeroing at all, per-rank seeds, rank-0 saving,
torch.nn.utils.clip_grad_norm_, torch.amp.GradScaler, DDP's require_backward_grad_sync and
no_sync — and must either train exactly like stock torch.optim on the full batch (the oracle of
zero_oracle.py) or stop with an error that says what to do.
"""
import contextlib
import os

import pytest
import torch

import zeroshard
from dist_harness import run_distributed
from zero_oracle import (SMALL_BUCKET_MB, assert_params_close, assert_ranks_identical,
                         make_batches, make_model, mse_loss, oracle_optimizer, param_snapshot,
                         rank_slice, train_oracle)

STEPS = 4
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)  # OPTIMIZERS["AdamW"]
_oracles = {}


def oracle(clip=None, micro=1):
    key = (clip, micro)
    if key not in _oracles:
        model = make_model()
        train_oracle(model, oracle_optimizer("AdamW", model.parameters()), make_batches(STEPS),
                     clip=clip)
        _oracles[key] = param_snapshot(model)
    return _oracles[key]


class Offloaded(int):
    """A stage with offload="cpu": compares as its stage number, shows as "2+offload"."""
    offload = "cpu"

    def __str__(self) -> str:
        return f"{int(self)}+offload"

    __repr__ = __str__

    def __reduce__(self):  # the spawned ranks get it back as an Offloaded
        return (Offloaded, (int(self),))


class Hybrid(int):
    """A stage hybrid-sharded over shard groups of 1 rank (at 2 ranks: 2 replicas), shown as
    "2+hybrid": the replica all-reduce and the every-rank agreement in a user's idioms."""
    options = {"shard_size": 1}

    def __str__(self) -> str:
        return f"{int(self)}+hybrid"

    __repr__ = __str__

    def __reduce__(self):
        return (Hybrid, (int(self),))


def _zero(model, stage, **kw):
    # Stage 3 gathers parameters module by module: it takes the model itself.
    return zeroshard.ZeroAdamW(model if stage == 3 else model.parameters(), stage=int(stage),
                               bucket_mb=SMALL_BUCKET_MB, offload=getattr(stage, "offload", None),
                               **HYPER, **getattr(stage, "options", {}), **kw)


def _snap(model, opt):
    """The model's parameters, whole (at stage 3 they are only whole inside full_params)."""
    with opt.full_params():
        return param_snapshot(model)


def _local(batch, rank, world_size):
    tokens, target = batch
    return rank_slice(tokens, rank, world_size), rank_slice(target, rank, world_size)


# ---- 1. model.to() after the optimizer exists ------------------------------------------------

def _train_after_to(rank, world_size, stage):
    model = make_model()
    opt = _zero(model, stage)
    model.to("cpu:0")  # what accelerate/Trainer do: copies every parameter
    for batch in make_batches(STEPS):
        mse_loss(model, *_local(batch, rank, world_size)).backward()
        opt.step()
        opt.zero_grad()
    return _snap(model, opt)


@pytest.mark.parametrize("stage", [0, 1, 2, 3, Offloaded(2), Offloaded(3), Hybrid(3)])
def test_model_moved_after_construction_still_trains(stage):
    per_rank = run_distributed(_train_after_to, 2, stage)
    assert_ranks_identical(per_rank, f"stage {stage}")
    assert_params_close(per_rank[0], oracle(), f"stage {stage} after model.to('cpu:0')")


def test_model_moved_one_process_repro():
    """The issue's repro: weights changed by 0.000 before the fix."""
    torch.manual_seed(0)
    m = torch.nn.Linear(8, 1)
    ref = torch.nn.Linear(8, 1)
    ref.load_state_dict(m.state_dict())
    opt = zeroshard.ZeroAdamW(m.parameters(), stage=2, lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    m.to("cpu:0")
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for _ in range(20):
        for model, o in ((m, opt), (ref, ref_opt)):
            ((model(x) - y) ** 2).mean().backward()
            o.step()
            o.zero_grad()
    torch.testing.assert_close(m.weight, ref.weight, rtol=1e-5, atol=1e-6)
    assert opt.flat_groups[0].is_attached(0), "the weight views the flat buffer again"


def test_cast_or_move_to_other_dtype_is_a_clear_error():
    model = make_model()
    zeroshard.ZeroAdamW(model.parameters(), stage=1)
    model.to(torch.float64)
    tokens, target = make_batches(1)[0]
    with pytest.raises(ValueError, match=r"fc1.weight.*float64.*build the optimizer|"
                                         r"float64.*move or cast the model first"):
        mse_loss(model, tokens, target.double()).backward()


def test_cast_after_a_stage3_optimizer_is_a_clear_error():
    model = make_model()
    zeroshard.ZeroAdamW(model, stage=3)
    # A sharded parameter refuses the cast at once (its shard cannot follow), changing nothing.
    with pytest.raises(RuntimeError, match="move or cast the model before building"):
        model.to(torch.float64)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tokens, target = make_batches(1)[0]
    mse_loss(model, tokens, target).backward()  # still trains


# ---- 2. gradients start from zero after step(), however the script zeroes -------------------

def _train_zeroing(rank, world_size, stage, how):
    model = make_model()
    opt = _zero(model, stage)
    for batch in make_batches(STEPS):
        mse_loss(model, *_local(batch, rank, world_size)).backward()
        opt.step()
        if how == "model":
            model.zero_grad()  # what the HF Trainer does
        elif how == "model_keep":
            model.zero_grad(set_to_none=False)
        # "none": never zeroed, as DeepSpeed's engine allows
    return _snap(model, opt)


@pytest.mark.parametrize("stage", [0, 1, 2, 3, Offloaded(2)])
@pytest.mark.parametrize("how", ["model", "model_keep", "none"])
def test_gradients_restart_from_zero_after_step(stage, how):
    per_rank = run_distributed(_train_zeroing, 2, stage, how)
    assert_ranks_identical(per_rank, f"stage {stage} {how}")
    assert_params_close(per_rank[0], oracle(), f"stage {stage}, zeroing: {how}")


def _zeroed_between_backward_and_step(rank, world_size, stage):
    """model.zero_grad() after backward means 'no gradient' in torch: the step must not use the
    discarded backward's gradient (and torch.optim would not move the weights at all)."""
    model = make_model()
    opt = _zero(model, stage)
    batches = make_batches(2)
    mse_loss(model, *_local(batches[0], rank, world_size)).backward()
    model.zero_grad()
    before = _snap(model, opt)
    opt.step()
    after_noop = _snap(model, opt)
    mse_loss(model, *_local(batches[1], rank, world_size)).backward()
    opt.step()
    return before, after_noop, _snap(model, opt)


@pytest.mark.parametrize("stage", [0, 2, 3, Offloaded(2)])
def test_model_zero_grad_discards_the_pending_gradient(stage):
    before, after_noop, final = run_distributed(_zeroed_between_backward_and_step, 2, stage)[0]
    assert_params_close(after_noop, before, "a step after model.zero_grad()", rtol=0, atol=0)
    model = make_model()
    ref = oracle_optimizer("AdamW", model.parameters())
    batches = make_batches(2)
    mse_loss(model, *batches[1]).backward()
    ref.step()
    assert_params_close(final, param_snapshot(model), f"stage {stage}")


# ---- 3. every rank starts from rank 0's weights and buffers ---------------------------------

def _train_seeded_per_rank(rank, world_size, stage):
    model = make_model(seed=rank)  # common in scripts: seed + rank
    model.register_buffer("running", torch.full((3,), float(rank)))
    opt = _zero(model, stage)
    buffer_at_start = model.running.clone()
    for batch in make_batches(STEPS):
        opt.zero_grad()
        mse_loss(model, *_local(batch, rank, world_size)).backward()
        opt.step()
    return _snap(model, opt), buffer_at_start


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_ranks_start_from_rank0_weights(stage):
    per_rank = run_distributed(_train_seeded_per_rank, 3, stage)
    assert_ranks_identical([p for p, _ in per_rank], f"stage {stage}")
    assert_params_close(per_rank[0][0], oracle(), f"stage {stage}, per-rank seeds")
    for _, buf in per_rank:
        assert torch.equal(buf, torch.zeros(3)), "buffers must come from rank 0"


# ---- 4. state dicts saved on rank 0 ----------------------------------------------------------

def _rank0_saves_state_dict(rank, world_size, stage, path):
    import torch.distributed as dist
    model = make_model()
    opt = _zero(model, stage)
    batches = make_batches(STEPS)
    for batch in batches[:2]:
        mse_loss(model, *_local(batch, rank, world_size)).backward()
        opt.step()
        opt.zero_grad()
    shard_file, full_file = os.path.join(path, "shard.pt"), os.path.join(path, "full.pt")
    full = opt.full_state_dict()  # collective: every rank
    if rank == 0:
        torch.save(opt.state_dict(), shard_file)
        torch.save({"model": model.state_dict(), "optimizer": full}, full_file)
    dist.barrier()
    shard_error = None
    try:
        opt.load_state_dict(torch.load(shard_file, weights_only=False))
    except ValueError as e:
        shard_error = str(e)
    # resume from the rank-0 file into a fresh model and optimizer, then finish training
    ckpt = torch.load(full_file, weights_only=False)
    resumed = make_model(seed=7)
    resumed.load_state_dict(ckpt["model"])
    opt2 = _zero(resumed, stage)
    opt2.load_state_dict(ckpt["optimizer"])
    for batch in batches[2:]:
        mse_loss(resumed, *_local(batch, rank, world_size)).backward()
        opt2.step()
        opt2.zero_grad()
    return shard_error, param_snapshot(resumed)


@pytest.mark.parametrize("stage", [1, 2])
def test_rank0_state_dict_refused_elsewhere_full_state_dict_resumes(stage, tmp_path):
    per_rank = run_distributed(_rank0_saves_state_dict, 2, stage, str(tmp_path))
    assert per_rank[0][0] is None, "rank 0 loads its own shard"
    assert "full_state_dict" in per_rank[1][0] and "rank 0" in per_rank[1][0]
    assert_ranks_identical([p for _, p in per_rank], f"stage {stage}")
    assert_params_close(per_rank[0][1], oracle(), f"stage {stage}, resumed from full_state_dict")


def _full_state_dict(rank, world_size, stage):
    model = make_model()
    opt = _zero(model, stage)
    for batch in make_batches(STEPS):
        opt.zero_grad()
        mse_loss(model, *_local(batch, rank, world_size)).backward()
        opt.step()
    return opt.full_state_dict()


@pytest.mark.parametrize("world_size,stage", [(1, 2), (3, 1), (4, 2), (2, 0), (3, 3),
                                              (3, Offloaded(2))])
def test_full_state_dict_equals_torch_optim_state_dict(world_size, stage):
    full = run_distributed(_full_state_dict, world_size, stage)[0]
    model = make_model()
    ref = oracle_optimizer("AdamW", model.parameters())
    train_oracle(model, ref, make_batches(STEPS))
    expected = ref.state_dict()
    assert sorted(full["state"]) == sorted(expected["state"])
    for i, want in expected["state"].items():
        got = full["state"][i]
        assert float(got["step"]) == float(want["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)
    # and it loads into the stock optimizer, which then takes the same step as the original
    clone = make_model()
    clone.load_state_dict(model.state_dict())
    stock = oracle_optimizer("AdamW", clone.parameters())
    stock.load_state_dict(full)
    batch = make_batches(STEPS + 1)[-1]
    for m, o in ((model, ref), (clone, stock)):
        o.zero_grad()
        mse_loss(m, *batch).backward()
        o.step()
    assert_params_close(param_snapshot(clone), param_snapshot(model), "stock after load")


def test_stock_torch_state_dict_loads_into_zero_optimizer():
    """Migrating: a torch.optim.AdamW state_dict from before the switch loads and continues."""
    model = make_model()
    ref = oracle_optimizer("AdamW", model.parameters())
    batches = make_batches(STEPS)
    train_oracle(model, ref, batches[:2])
    moved = make_model()
    moved.load_state_dict(model.state_dict())
    opt = zeroshard.ZeroAdamW(moved.parameters(), stage=2, **HYPER)
    opt.load_state_dict(ref.state_dict())
    train_oracle(model, ref, batches[2:])
    for batch in batches[2:]:
        opt.zero_grad()
        mse_loss(moved, *batch).backward()
        opt.step()
    assert_params_close(param_snapshot(moved), param_snapshot(model), "migrated state")


# ---- 6. torch.nn.utils.clip_grad_norm_ and torch.amp.GradScaler -----------------------------

def _torch_idioms(rank, world_size, stage, use_scaler, foreach):
    model = make_model()
    opt = _zero(model, stage)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if use_scaler else None
    norms = []
    for batch in make_batches(STEPS):
        loss = mse_loss(model, *_local(batch, rank, world_size))
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05, foreach=foreach))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
    return _snap(model, opt), torch.stack(norms)


@pytest.mark.parametrize("stage", [0, 1, 2, 3, Offloaded(1), Offloaded(3), Hybrid(2), Hybrid(3)])
@pytest.mark.parametrize("use_scaler", [False, True])
def test_torch_clip_grad_norm_and_grad_scaler(stage, use_scaler):
    per_rank = run_distributed(_torch_idioms, 2, stage, use_scaler, None)
    model = make_model()
    ref_norms = train_oracle(model, oracle_optimizer("AdamW", model.parameters()),
                             make_batches(STEPS), clip=0.05)
    assert_ranks_identical([p for p, _ in per_rank], f"stage {stage}")
    torch.testing.assert_close(per_rank[0][1], torch.stack(ref_norms), rtol=1e-5, atol=1e-7)
    assert (torch.stack(ref_norms) > 0.05).all(), "the test must actually clip"
    assert_params_close(per_rank[0][0], param_snapshot(model),
                        f"stage {stage} torch clip, scaler={use_scaler}")


def _overflow_skips_everywhere(rank, world_size, stage):
    model = make_model()
    opt = _zero(model, stage)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = _snap(model, opt)
    batch = make_batches(1)[0]
    loss = mse_loss(model, *_local(batch, rank, world_size))
    if rank == world_size - 1:
        loss = loss * float("inf")  # one rank overflows: every rank must skip
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return _snap(model, opt), before, scaler.get_scale()


@pytest.mark.parametrize("stage", [0, 2, 3, Offloaded(2), Hybrid(3)])
def test_grad_scaler_overflow_on_one_rank_skips_on_all(stage):
    for after, before, scale in run_distributed(_overflow_skips_everywhere, 2, stage):
        assert_params_close(after, before, "skipped step", rtol=0, atol=0)
        assert scale == 2.0 ** 9


def _read_grad(rank, world_size, stage):
    model = make_model()
    _zero(model, stage)
    mse_loss(model, *_local(make_batches(1)[0], rank, world_size)).backward()
    try:
        return model.fc1.weight.grad.clone()
    except RuntimeError as e:
        return str(e)


def test_p_grad_reads_whole_gradient_at_stage0_and_errors_at_stage2():
    model = make_model()
    mse_loss(model, *make_batches(1)[0]).backward()
    full = run_distributed(_read_grad, 2, 0)
    torch.testing.assert_close(full[0], model.fc1.weight.grad, rtol=1e-5, atol=1e-7)
    message = run_distributed(_read_grad, 2, 2)[0]
    assert "fc1.weight" in message and "clip_grad_norm_" in message and "stage=0" in message


# ---- 7. DDP wrapped after construction -------------------------------------------------------

def _ddp_after(rank, world_size):
    model = make_model()
    _zero(model, 2)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    try:
        mse_loss(ddp, *_local(make_batches(1)[0], rank, world_size)).backward()
    except ValueError as e:
        return str(e)
    return None


def test_ddp_wrapper_added_after_construction_is_refused():
    for message in run_distributed(_ddp_after, 2):
        assert message is not None and "DistributedDataParallel after the optimizer" in message
        assert "fc" in message or "embed" in message or "codebook" in message


# ---- 8. gradient-accumulation switches written for DDP --------------------------------------

def _accumulate(rank, world_size, stage, switch):
    model = make_model()
    opt = _zero(model, stage)
    micro = 2
    reductions = []
    for batch in make_batches(STEPS):
        tokens, target = _local(batch, rank, world_size)
        for m in range(micro):
            last = m == micro - 1
            opt.reset_comm_stats()
            ctx = contextlib.nullcontext()
            if switch == "require_backward_grad_sync":
                model.require_backward_grad_sync = last  # nanoGPT's idiom
            elif not last:
                ctx = model.no_sync()  # DDP's / accelerate's idiom, on the bare model
            with ctx:
                loss = mse_loss(model, rank_slice(tokens, m, micro),
                                rank_slice(target, m, micro)) / micro
                loss.backward()
            stats = opt.comm_stats()
            reductions.append(stats["all_reduce"]["calls"] + stats["reduce_scatter"]["calls"])
        opt.step()
        opt.zero_grad()
    return _snap(model, opt), reductions


@pytest.mark.parametrize("stage", [0, 2, 3, Offloaded(2)])
@pytest.mark.parametrize("switch", ["require_backward_grad_sync", "no_sync"])
def test_ddp_accumulation_switches_are_honoured(stage, switch):
    per_rank = run_distributed(_accumulate, 2, stage, switch)
    params, reductions = per_rank[0]
    assert reductions[0::2] == [0] * STEPS, f"non-final micro-steps reduced: {reductions}"
    assert all(r > 0 for r in reductions[1::2]), f"final micro-steps must reduce: {reductions}"
    assert_ranks_identical([p for p, _ in per_rank], f"stage {stage}")
    assert_params_close(params, oracle(), f"stage {stage} accumulation via {switch}")


def test_no_sync_method_does_not_travel_with_the_model(tmp_path):
    import copy
    model = make_model()
    zeroshard.ZeroAdamW(model.parameters(), stage=0)
    assert callable(model.no_sync)
    torch.save(model, tmp_path / "m.pt")  # must not try to pickle the optimizer
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with loaded.no_sync():
        pass
    with copy.deepcopy(model).no_sync():
        pass


# ---- weights loaded into the model after the optimizer exists --------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weights_loaded_after_construction_are_not_reverted(dtype):
    """bf16 parameters (fp32 master) and ZeroRedundancy (fp32 master for any dtype) keep a copy
    of the weights; loading new weights into the model afterwards must not be undone."""
    pretrained = make_model(seed=5, dtype=dtype)
    model = make_model(seed=0, dtype=dtype)
    if dtype == torch.float32:
        opt = zeroshard.ZeroRedundancy(model.parameters(), optimizer_class=torch.optim.SGD,
                                       lr=0.0, stage=2)
    else:
        opt = zeroshard.ZeroAdamW(model.parameters(), lr=0.0, weight_decay=0.0, stage=2)
    model.load_state_dict(pretrained.state_dict())  # e.g. a fine-tuning script's checkpoint
    tokens, target = make_batches(1)[0]
    mse_loss(model, tokens, target).backward()
    opt.step()  # lr 0: the weights must stay the loaded ones
    assert_params_close(param_snapshot(model), param_snapshot(pretrained), "after lr=0 step",
                        rtol=0, atol=0)


# ---- 5. collectives called on rank 0 only ----------------------------------------------------

def _full_state_dict_on_rank0_only(rank, world_size):
    import time
    model = make_model()
    opt = _zero(model, 2, timeout_s=60)
    start = time.monotonic()
    try:
        for batch in make_batches(STEPS):
            mse_loss(model, *_local(batch, rank, world_size)).backward()
            opt.step()
            opt.zero_grad()
            if rank == 0:
                torch.save(opt.full_state_dict(), os.devnull)  # the usual `if rank == 0:` save
    except zeroshard.CollectiveTimeout as e:
        return str(e), time.monotonic() - start
    return None, time.monotonic() - start


def test_full_state_dict_on_one_rank_fails_fast_everywhere():
    """Rank 0 learns at once that rank 1 went on without calling it. Rank 1 either finds rank 0
    waiting at its next step's poll, or (when it polled before rank 0 got there) is blocked in a
    collective rank 0 never joins and fails as soon as rank 0's process ends — in both cases
    long before timeout_s, with a message that names the likely cause."""
    per_rank = run_distributed(_full_state_dict_on_rank0_only, 2)
    for rank, (message, seconds) in enumerate(per_rank):
        assert message is not None, f"rank {rank} did not raise"
        assert seconds < 30, f"rank {rank} took {seconds:.1f} s (timeout_s is 60)"
    assert "full_state_dict" in per_rank[0][0] and "every rank" in per_rank[0][0], per_rank[0]
    went_on = per_rank[1][0]
    assert ("full_state_dict" in went_on and "every rank" in went_on) or \
        "a rank is inside a call that this rank did not make" in went_on, went_on


def test_checkpoint_after_model_moved_and_reloaded(tmp_path):
    """model.to() then model.load_state_dict() after construction, then a checkpoint: the saved
    weights are the loaded ones, not the flat buffer's stale copy."""
    model = make_model(seed=0)
    opt = zeroshard.ZeroAdamW(model.parameters(), stage=2)
    model.to("cpu:0")
    model.load_state_dict(make_model(seed=3).state_dict())
    zeroshard.checkpoint.save(tmp_path / "ckpt", model=model, optimizer=opt)
    fresh = make_model(seed=9)
    zeroshard.checkpoint.load(tmp_path / "ckpt", model=fresh,
                              optimizer=zeroshard.ZeroAdamW(fresh.parameters(), stage=2))
    assert_params_close(param_snapshot(fresh), param_snapshot(make_model(seed=3)), "reloaded",
                        rtol=0, atol=0)


def test_nonfinite_gradient_norm_stops_the_step_not_the_weights():
    """torch would clip by 0 and write NaN into every parameter; zeroshard refuses the step."""
    model = make_model()
    opt = zeroshard.ZeroAdamW(model.parameters(), stage=2)
    tokens, target = make_batches(1)[0]
    (mse_loss(model, tokens, target) * float("inf")).backward()
    assert not torch.isfinite(opt.clip_grad_norm_(1.0))
    before = param_snapshot(model)
    with pytest.raises(RuntimeError, match="gradient norm of (inf|nan).*zero_grad"):
        opt.step()
    assert_params_close(param_snapshot(model), before, "refused step", rtol=0, atol=0)
    opt.zero_grad()  # skipping the batch recovers
    mse_loss(model, tokens, target).backward()
    opt.clip_grad_norm_(1.0)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(RuntimeError, match="non-finite|cannot be clipped"):
        (mse_loss(model, tokens, target) * float("nan")).backward()
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
