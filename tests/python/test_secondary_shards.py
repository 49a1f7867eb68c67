"""hpZ (secondary_shard="node", stage 3): after a unit's forward gather each rank keeps the
node-local part of its parameters, and backward gathers them among the node's ranks only.

Without quantization it changes no number: the torch.optim oracle holds at 2x2 ranks (with
activation checkpointing and clipping too). Backward's gathers are the node's, none of their
bytes cross nodes; the copies' bytes are reported; what cannot work is refused.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import zeroshard  # noqa: E402
from dist_harness import run_distributed  # noqa: E402
from refusals import refused  # noqa: E402
from test_zero_stage3 import _check_against_oracle  # noqa: E402
from unit_net import make_unit_net  # noqa: E402
from zero_oracle import TINY_BUCKET_MB, make_batches, mse_loss, rank_slice  # noqa: E402

HPZ = {"secondary_shard": "node", "node_size": 2}


@pytest.mark.parametrize("cfg", [
    {"opt": HPZ},
    {"opt": HPZ, "clip": 0.05, "net": {"checkpointing": "non_reentrant"}},
    {"opt": HPZ, "micro_batches": 2, "no_sync": True},
])
def test_matches_torch_optim_at_2x2(cfg):
    _check_against_oracle(cfg, 4)


def _one_step(rank, world_size, options):
    model = make_unit_net()
    opt = zeroshard.ZeroAdamW(model, lr=1e-3, stage=3, bucket_mb=TINY_BUCKET_MB,
                              **{"node_size": 2, **options})
    tokens, target = make_batches(1)[0]
    tokens, target = rank_slice(tokens, rank, world_size), rank_slice(target, rank, world_size)
    opt.reset_comm_stats()
    loss = mse_loss(model, tokens, target)
    secondary = opt.memory_report()["units"]["secondary_bytes"]
    opt.backward(loss)
    stats = opt.comm_stats()
    node_gathers = (opt.groups.node_comm.stats.as_dict()["all_gather"]
                    if opt.groups.node_comm is not None else None)
    non_root = sum(fg.layout.buffer_numel * fg.flat_param.element_size()
                   for u in opt.units.units if not u.is_root for fg in u.groups)
    last = sum(fg.layout.buffer_numel * fg.flat_param.element_size()
               for fg in opt.units.units[-1].groups)  # UnitNet's blocks run in order
    opt.step()
    after_step = opt.memory_report()["units"]["secondary_bytes"]
    from zeroshard.estimate import estimate_model_states, param_numels_of, param_units_of
    estimated = estimate_model_states(
        param_numels_of(model), world_size=world_size, stage=3, units=param_units_of(model),
        bucket_mb=TINY_BUCKET_MB, secondary_shard_ranks=2 if options else None)
    return {"stats": stats, "node": node_gathers, "non_root": non_root, "last": last,
            "secondary": secondary, "after_step": after_step,
            "estimated": estimated.get("secondary_params", 0)}


def test_backward_gathers_stay_in_the_node_and_the_copies_are_reported():
    hpz = run_distributed(_one_step, 4, HPZ)
    plain = run_distributed(_one_step, 4, {})
    for rank, (h, p) in enumerate(zip(hpz, plain)):
        # backward re-gathers every non-root unit: inside the node, never across
        assert h["node"]["payload_bytes"] == h["non_root"]
        assert h["node"]["inter_node_bytes"] == 0
        # what left the world all-gather is exactly backward's share of it (plain stage 3
        # keeps the last block from its forward for backward; hpZ gathers it in the node)
        assert (p["stats"]["all_gather"]["payload_bytes"] - (h["non_root"] - p["last"])
                == h["stats"]["all_gather"]["payload_bytes"] - h["node"]["payload_bytes"])
        if rank % 2:  # the ranks whose ring successor is on the other node
            assert h["stats"]["all_gather"]["inter_node_bytes"] < \
                p["stats"]["all_gather"]["inter_node_bytes"]
        # the node-local copies: the non-root units' parameters / 2, from forward to the step
        assert h["secondary"] == h["non_root"] // 2 and h["after_step"] == 0
        assert h["estimated"] == h["secondary"]  # the estimator's secondary_params
        assert p["secondary"] == 0


@pytest.mark.parametrize("kwargs,message", [
    ({"stage": 2, "secondary_shard": "node"}, "use stage=3"),
    ({"stage": 3, "secondary_shard": "rack"}, "must be None or 'node'"),
    ({"stage": 3, "secondary_shard": "node", "shard_size": 2}, "use one or the other"),
])
def test_combinations_that_cannot_work_are_refused(kwargs, message):
    for answer in run_distributed(refused, 4, kwargs):
        assert answer is not None and message in answer, answer


