"""Misuse fails fast with an error that names the problem, on every rank, instead of hanging or
training wrongly: stage 3, a parameter given twice, params on different devices, bad bucket_mb or
reducer mode, sparse gradients, and parameter lists that differ across ranks."""
import re

import pytest
import torch
from torch import nn

import zeroshard
from dist_harness import run_distributed
from zero_oracle import build_optimizer, make_model, mse_loss, make_batches

requires_zero = pytest.mark.skipif(not hasattr(zeroshard, "ZeroAdamW"),
                                   reason="zeroshard.ZeroAdamW not implemented yet (issue 3)")


def _outcome(action):
    try:
        action()
    except Exception as err:  # noqa: BLE001 - the type and message are what the test checks
        return type(err).__name__, str(err)
    return None, "no error raised"


def _sparse_backward():
    embed = nn.Embedding(13, 7, sparse=True)
    dense = nn.Linear(7, 1)
    opt = zeroshard.ZeroAdamW(list(embed.parameters()) + list(dense.parameters()), stage=2)
    opt.zero_grad(set_to_none=True)
    dense(embed(torch.arange(5))).sum().backward()
    opt.step()


def _misuse(rank, world_size):
    model = make_model()
    p = model.fc1.weight
    checks = {
        "stage3": lambda: zeroshard.ZeroAdamW(model.parameters(), stage=3),
        "stage_negative": lambda: zeroshard.ZeroSGD(model.parameters(), lr=0.1, stage=-1),
        "twice_in_list": lambda: zeroshard.ZeroAdamW([p, model.fc2.weight, p], stage=1),
        "twice_across_groups": lambda: zeroshard.ZeroAdamW(
            [{"params": [p]}, {"params": [model.fc2.weight, p]}], stage=2),
        "devices": lambda: zeroshard.ZeroAdamW(
            [p, nn.Parameter(torch.zeros(7, device="meta"))], stage=2),
        "bucket_mb": lambda: zeroshard.ZeroAdamW(model.parameters(), stage=2, bucket_mb=0),
        "reducer_mode": lambda: zeroshard.GradientReducer(model.parameters(), mode="all_gather"),
        "sparse": _sparse_backward,
    }
    results = {name: _outcome(check) for name, check in checks.items()}
    # Cross-rank checks last: a broken one may leave a collective pending for the rest.
    extra = list(make_model().parameters())
    if rank == 1:
        extra.append(nn.Parameter(torch.zeros(13)))
    results["extra_param_on_rank1"] = _outcome(lambda: build_optimizer("zeroshard", "AdamW", extra,
                                                                       stage=2))
    shapes = nn.Linear(7, 101 if rank == 0 else 103)
    results["shape_differs_on_rank1"] = _outcome(lambda: build_optimizer(
        "zeroshard", "AdamW", shapes.parameters(), stage=1))
    # and the group still works afterwards: a correct optimizer trains
    model = make_model()
    opt = build_optimizer("zeroshard", "AdamW", model.parameters(), stage=2)
    tokens, target = make_batches(1)[0]
    mse_loss(model, tokens, target).backward()
    opt.step()
    results["still_works"] = (None, "ok")
    return results


EXPECTED = {  # check -> (accepted exception types, what the message must mention)
    "stage3": ((ValueError,), r"stage"),
    "stage_negative": ((ValueError,), r"stage"),
    "twice_in_list": ((ValueError,), r"(?i)twice|more than once|duplicate|appears"),
    "twice_across_groups": ((ValueError,), r"(?i)twice|more than once|duplicate|appears"),
    "devices": ((ValueError, TypeError), r"(?i)device"),
    "bucket_mb": ((ValueError,), r"bucket_mb"),
    "reducer_mode": ((ValueError,), r"mode"),
    "sparse": ((ValueError, TypeError, RuntimeError), r"(?i)sparse"),
    "extra_param_on_rank1": ((ValueError,), r"(?i)rank|mismatch|differ"),
    "shape_differs_on_rank1": ((ValueError,), r"(?i)rank|mismatch|differ|shape|numel"),
}


@requires_zero
def test_misuse_raises_named_errors_on_every_rank():
    per_rank = run_distributed(_misuse, 2, timeout_s=90)
    failures = []
    for rank, results in enumerate(per_rank):
        assert results["still_works"] == (None, "ok")
        for name, (types, pattern) in EXPECTED.items():
            got_type, message = results[name]
            if got_type not in {t.__name__ for t in types}:
                failures.append(f"rank {rank} {name}: expected {[t.__name__ for t in types]}, "
                                f"got {got_type}: {message}")
            elif not re.search(pattern, message):
                failures.append(f"rank {rank} {name}: message {message!r} does not match {pattern}")
    assert not failures, "\n".join(failures)
