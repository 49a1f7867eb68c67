"""Stage 1 reduces during backward, its shard landing inside its own gradient buffer
(flat_group.py's [Note: stage 1 shard in place]): the reductions start before backward returns,
the layout's invariant holds for awkward sizes, and every way a script can add gradients to an
already reduced buffer either matches the torch.optim oracle or stops with an error.

- two synchronised backwards before a step, and a synchronised one followed by one inside
  no_sync(): the first's reduced shard is moved aside and added back (the oracle's sum);
- clip_grad_norm_ (which reads the reduced shard) and then another backward: refused, as before.
"""
from __future__ import annotations

import contextlib

import pytest

from dist_harness import run_distributed
from zero_oracle import (TINY_BUCKET_MB, assert_params_close, assert_ranks_identical,
                         build_optimizer, make_batches, make_model, mse_loss, oracle_optimizer,
                         param_snapshot, rank_slice, train_oracle)

STEPS = 3


def _reductions_start_in_backward(rank, world_size):
    model = make_model()
    opt = build_optimizer("zeroshard", "AdamW", model.parameters(), stage=1,
                          bucket_mb=TINY_BUCKET_MB)
    tokens, target = make_batches(1)[0]
    opt.reset_comm_stats()
    mse_loss(model, rank_slice(tokens, rank, world_size),
             rank_slice(target, rank, world_size)).backward()
    during = opt.comm_stats()["reduce_scatter"]["calls"]
    opt.step()
    after = opt.comm_stats()["reduce_scatter"]["calls"]
    return during, after, opt.flat_groups[0].layout.num_buckets


@pytest.mark.parametrize("world_size", [2, 3])
def test_stage1_reduces_while_backward_runs(world_size):
    for during, after, buckets in run_distributed(_reductions_start_in_backward, world_size):
        assert buckets > 4
        # every bucket's reduce-scatter started before backward returned; step adds none
        assert during == after == buckets


def _script(rank, world_size, pattern, stage):
    """Two micro-batches a step: "sync+sync" (no no_sync at all), "sync+no_sync" (the second
    inside no_sync), "clip+backward" (clip_grad_norm_ between them)."""
    model = make_model()
    opt = build_optimizer("zeroshard", "AdamW", model.parameters(), stage=stage,
                          bucket_mb=TINY_BUCKET_MB)
    for tokens, target in make_batches(STEPS):
        tokens, target = rank_slice(tokens, rank, world_size), rank_slice(target, rank, world_size)
        opt.zero_grad()
        for micro in range(2):
            loss = mse_loss(model, rank_slice(tokens, micro, 2), rank_slice(target, micro, 2)) / 2
            second = micro == 1
            if second and pattern == "clip+backward":
                opt.clip_grad_norm_(1e9)
                try:
                    loss.backward()
                except RuntimeError as e:
                    return str(e)
            with (opt.no_sync() if second and pattern == "sync+no_sync"
                  else contextlib.nullcontext()):
                loss.backward()
        opt.step()
    return param_snapshot(model)


def _oracle():
    model = make_model()
    train_oracle(model, oracle_optimizer("AdamW", model.parameters()), make_batches(STEPS))
    return param_snapshot(model)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("pattern", ["sync+sync", "sync+no_sync"])
def test_a_second_backward_before_the_step_adds_to_the_reduced_shard(world_size, pattern):
    per_rank = run_distributed(_script, world_size, pattern, 1)
    assert_ranks_identical(per_rank, pattern)
    assert_params_close(per_rank[0], _oracle(), f"stage 1, {pattern}, {world_size} ranks")


def test_a_backward_after_clip_grad_norm_is_refused():
    for message in run_distributed(_script, 2, "clip+backward", 1):
        assert isinstance(message, str) and "arrived after this step's gradients were" in message


def test_the_shard_lands_on_reduced_buckets_only_for_awkward_sizes():
    """The invariant each stage-1 FlatGroup checks at construction, over many layouts: a
    bucket's slice of the shard never starts before the bucket itself."""
    from zeroshard import _core
    for world_size in (1, 2, 3, 4, 7):
        for numels in ([1], [71, 3, 1000, 5], [4097] * 3, [13, 2048, 2049, 1, 77777]):
            for align in (1, 16, 64):
                for bucket_elems in (64, 71, 1000, 100000):
                    layout = _core.Layout(numels, world_size, align, bucket_elems)
                    base = layout.buffer_numel - layout.shard_numel
                    for b in range(layout.num_buckets):
                        assert base + layout.bucket_slice_shard_offset(b) >= \
                            layout.bucket_ranges[b].start, (world_size, numels, align,
                                                            bucket_elems, b)


def _local_grads_after(rank, world_size, stage):
    """Gradients added in every way a script can, each followed by a step or a zero_grad();
    after each, every rank's accumulation buffer must be all zeros (zero_grads skips clearing
    it when the reductions already did: flat_group.py's dirty_buckets), and the steps must
    still train like the oracle."""
    model = make_model()
    opt = build_optimizer("zeroshard", "AdamW", model.parameters(), stage=stage,
                          bucket_mb=TINY_BUCKET_MB)
    batches = make_batches(STEPS)
    nonzero = []

    def backward(tokens, target, sync=True, scale=1.0):
        with (contextlib.nullcontext() if sync else opt.no_sync()):
            (mse_loss(model, rank_slice(tokens, rank, world_size),
                      rank_slice(target, rank, world_size)) * scale).backward()

    def check(after):
        for fg in opt.flat_groups:
            if fg.local_grads is not None:
                nonzero.append((after, int(fg.local_grads.count_nonzero())))

    tokens, target = batches[0]
    backward(tokens, target, sync=False)  # accumulated, never reduced: then dropped
    opt.zero_grad()
    check("no_sync backward, zero_grad")
    backward(tokens, target)  # reduced (stage 1: the shard inside the buffer), then dropped
    opt.zero_grad(set_to_none=False)
    check("backward, zero_grad")
    backward(tokens, target)
    backward(tokens, target)  # the first shard carried, both reduced at the step
    opt.zero_grad()
    check("two backwards, zero_grad")
    for i, (tokens, target) in enumerate(batches):
        opt.zero_grad()
        if i == 1:
            backward(tokens, target, sync=False, scale=0.5)  # twice half, the second synced
            backward(tokens, target, scale=0.5)
        else:
            backward(tokens, target)
        opt.step()
        check(f"step {i}")
    return nonzero, param_snapshot(model)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("stage", [1, 2])
def test_the_accumulation_buffer_is_zero_after_every_step_and_zero_grad(world_size, stage):
    per_rank = run_distributed(_local_grads_after, world_size, stage)
    for nonzero, _ in per_rank:
        assert nonzero and all(count == 0 for _, count in nonzero), nonzero
    assert_ranks_identical([snapshot for _, snapshot in per_rank], f"stage {stage}")
    assert_params_close(per_rank[0][1], _oracle(), f"stage {stage}, {world_size} ranks")
