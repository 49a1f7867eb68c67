"""qwZ (quantize_weights="int8", stage 3): a forward's gathers of non-root units send each rank's
slice block-quantized (int8 + one fp32 scale per 2048) and dequantize it; backward, the root and
full_params() gather exact weights; the shards and masters are never quantized.

Checked exactly: the forward equals a plain model's forward at the weights quantized slice by
slice as the ranks hold them, and the bytes are the formula's. Then training: ranks identical,
close to the unquantized run, and the combinations that cannot work refused.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import zeroshard  # noqa: E402
from dist_harness import run_distributed  # noqa: E402
from refusals import refused  # noqa: E402
from unit_net import make_unit_net  # noqa: E402
from zero_oracle import (TINY_BUCKET_MB, make_batches, mse_loss, param_snapshot,  # noqa: E402
                         rank_slice)
from zeroshard import ops  # noqa: E402

BLOCK = 2048


def _quantized_like_the_ranks(model, opt):
    """A plain copy of `model` whose non-root units' weights are quantized and dequantized slice
    by slice, as each rank's slice of each bucket is before a qwZ gather."""
    plain = make_unit_net()
    with opt.full_params():
        plain.load_state_dict(model.state_dict())
    by_name = dict(plain.named_parameters())
    for u in opt.units.units:
        if u.is_root:
            continue
        for fg in u.groups:
            flat = torch.zeros(fg.layout.buffer_numel)
            for name, (start, end) in zip(fg.names, fg.param_ranges):
                flat[start:end] = by_name[name].detach().reshape(-1)
            for b in range(fg.layout.num_buckets):
                for r in range(opt.world_size):
                    s = fg.layout.bucket_slice(b, r)
                    piece = flat[s.start:s.end].clone()
                    q, scales = ops.quantize(piece, block=BLOCK)
                    flat[s.start:s.end] = ops.dequantize(q, scales, piece.numel(), block=BLOCK)
            with torch.no_grad():
                for name, (start, end), shape in zip(fg.names, fg.param_ranges, fg.shapes):
                    by_name[name].copy_(flat[start:end].view(shape))
    return plain


def _forward_and_bytes(rank, world_size):
    model = make_unit_net()
    opt = zeroshard.ZeroAdamW(model, lr=1e-3, stage=3, bucket_mb=TINY_BUCKET_MB,
                              quantize_weights="int8")
    tokens, target = make_batches(1)[0]
    tokens, target = rank_slice(tokens, rank, world_size), rank_slice(target, rank, world_size)
    reference = _quantized_like_the_ranks(model, opt)
    opt.reset_comm_stats()
    loss = mse_loss(model, tokens, target)
    forward_bytes = opt.comm_stats()["all_gather"]["payload_bytes"]
    opt.backward(loss)
    step_bytes = opt.comm_stats()["all_gather"]["payload_bytes"]
    want = mse_loss(reference, tokens, target)
    exact_model = make_unit_net()
    exact = mse_loss(exact_model, tokens, target)
    # the formula: per non-root unit bucket slice of n elements, every rank's
    # pad4(n) bytes + 4 bytes a block in forward, 4n bytes (fp32) in backward; the root once
    quantized = exact_bytes = 0
    for u in opt.units.units:
        for fg in u.groups:
            for b in range(fg.layout.num_buckets):
                n = fg.layout.bucket_slice(b, 0).end - fg.layout.bucket_slice(b, 0).start
                full = world_size * n * 4
                if u.is_root:
                    exact_bytes += full
                else:
                    quantized += world_size * (-(-n // 4) * 4 + 4 * -(-n // BLOCK))
                    exact_bytes += full
    return {"loss": loss.item(), "want": want.item(), "exact": exact.item(),
            "forward_bytes": forward_bytes, "step_bytes": step_bytes,
            "formula_forward": quantized + sum(
                world_size * (fg.layout.bucket_slice(b, 0).end - fg.layout.bucket_slice(b, 0).start) * 4
                for u in opt.units.units if u.is_root for fg in u.groups
                for b in range(fg.layout.num_buckets)),
            "formula_step": quantized + exact_bytes}


@pytest.mark.parametrize("world_size", [2, 3])
def test_forward_is_the_weights_quantized_slice_by_slice_and_bytes_are_the_formulas(world_size):
    for out in run_distributed(_forward_and_bytes, world_size):
        assert out["loss"] == out["want"], out
        assert out["loss"] != out["exact"]  # the quantization did happen
        assert out["forward_bytes"] == out["formula_forward"], out
        assert out["step_bytes"] == out["formula_step"], out


def _train(rank, world_size, options, steps):
    model = make_unit_net()
    opt = zeroshard.ZeroAdamW(model, lr=1e-3, stage=3, bucket_mb=TINY_BUCKET_MB, **options)
    for tokens, target in make_batches(steps):
        tokens, target = rank_slice(tokens, rank, world_size), rank_slice(target, rank, world_size)
        opt.zero_grad()
        opt.backward(mse_loss(model, tokens, target))
        opt.clip_grad_norm_(1.0)
        opt.step()
    with opt.full_params():
        return param_snapshot(model)


@pytest.mark.parametrize("world_size,options", [
    (2, {}), (4, {"shard_size": 2}),
])
def test_training_stays_close_to_exact_gathers_on_identical_ranks(world_size, options):
    steps = 4
    quantized = run_distributed(_train, world_size, {**options, "quantize_weights": "int8"},
                                steps)
    exact = run_distributed(_train, world_size, options, steps)
    for snap in quantized[1:]:
        for name in snap:
            assert torch.equal(snap[name], quantized[0][name]), name
    worst = 0.0
    for name, p in quantized[0].items():
        # AdamW moves each weight by at most ~lr a step: a quantized forward may change the
        # direction of small ones, never by more than the steps' total
        diff = (p - exact[0][name]).abs().max().item()
        assert diff <= steps * 1e-3 * 1.01, (name, diff)
        worst = max(worst, diff)
    assert worst > 0  # the option did something


@pytest.mark.parametrize("kwargs,message", [
    ({"stage": 2, "quantize_weights": "int8"}, "use stage=3"),
    ({"stage": 3, "quantize_weights": "int8", "reshard_after_forward": False},
     "needs reshard_after_forward=True"),
    ({"stage": 3, "quantize_weights": "int4"}, "must be None or 'int8'"),
])
def test_combinations_that_cannot_work_are_refused(kwargs, message):
    answer = refused(0, 1, kwargs)
    assert answer is not None and message in answer, answer
