"""memory/comm_model.py predicts comm_stats() of a training step to the byte: per collective kind
the calls, payload, bytes sent and their split within / across nodes, for plain ZeRO at stages
0-3, hybrid sharding, hpZ, qwZ and qgZ, on every rank of 2 nodes x 2 ranks."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import zeroshard  # noqa: E402
from dist_harness import run_distributed  # noqa: E402
from unit_net import make_unit_net  # noqa: E402
from zero_oracle import TINY_BUCKET_MB, make_batches, mse_loss, rank_slice  # noqa: E402
from zeroshard.estimate import param_numels_of, param_units_of  # noqa: E402
from zeroshard.memory.comm_model import link_seconds, step_traffic  # noqa: E402

CASES = [
    (0, {}), (1, {}), (2, {}), (3, {}),
    (2, {"shard_size": "node"}), (3, {"shard_size": 2}),
    (3, {"secondary_shard": "node"}), (3, {"quantize_weights": "int8"}),
    (2, {"quantize_grads": "int8"}),
    (3, {"secondary_shard": "node", "quantize_weights": "int8", "quantize_grads": "int4"}),
]


def _measure(rank, world_size):
    out = []
    for stage, options in CASES:
        model = make_unit_net()
        opt = zeroshard.ZeroAdamW(model, lr=1e-3, stage=stage, bucket_mb=TINY_BUCKET_MB,
                                  node_size=2, **options)
        for step, (tokens, target) in enumerate(make_batches(2)):
            if step == 1:
                opt.reset_comm_stats()
            tokens = rank_slice(tokens, rank, world_size)
            target = rank_slice(target, rank, world_size)
            opt.zero_grad()
            opt.backward(mse_loss(model, tokens, target))
            opt.step()
        measured = {k: v for k, v in opt.comm_stats().items() if k not in ("d2h", "h2d")}
        predicted = step_traffic(param_numels_of(model), world_size=world_size, stage=stage,
                                 node_size=2, rank=rank, bucket_mb=TINY_BUCKET_MB,
                                 units=param_units_of(model) if stage == 3 else None, **options)
        out.append((measured, predicted))
    return out


def test_the_model_is_comm_stats_to_the_byte():
    per_rank = run_distributed(_measure, 4, timeout_s=300)
    for rank, results in enumerate(per_rank):
        for (stage, options), (measured, predicted) in zip(CASES, results):
            assert measured == predicted, (rank, stage, options)
    # and the options do what they are for: fewer bytes across nodes than plain stage 3
    across = {str(opts): sum(r["inter_node_bytes"] for r in per_rank[1][i][1].values())
              for i, (stage, opts) in enumerate(CASES) if stage == 3}
    plain = across[str({})]
    assert across[str({"shard_size": 2})] < plain
    assert across[str({"secondary_shard": "node"})] < plain
    zero_pp = across[str(CASES[-1][1])]
    assert zero_pp < 0.3 * plain


def test_link_seconds_adds_each_links_bytes_at_its_speed():
    traffic = {"all_gather": {"intra_node_bytes": 2e9, "inter_node_bytes": 1e9},
               "reduce_scatter": {"intra_node_bytes": 0, "inter_node_bytes": 1e9}}
    assert link_seconds(traffic, intra_gbps=100, inter_gbps=10) == pytest.approx(0.02 + 0.2)


def test_the_estimator_prints_each_options_traffic_and_time(capsys):
    from zeroshard import estimate
    from zeroshard.memory.comm_model import OPTIONS, options_for
    from zeroshard.memory.model_shapes import preset_model
    assert estimate.main(["--preset", "gpt2", "--stage", "2", "3", "--world-size", "32",
                          "--nodes", "4", "--gpus-per-node", "8", "--intra-gbps", "900",
                          "--inter-gbps", "100"]) == 0
    out = capsys.readouterr().out
    numels, units = preset_model("gpt2")
    for stage in (2, 3):
        for name in options_for(stage):
            traffic = step_traffic(numels, world_size=32, stage=stage, node_size=8,
                                   units=units if stage == 3 else None, **OPTIONS[name])
            seconds = link_seconds(traffic, intra_gbps=900, inter_gbps=100)
            row = next(line for line in out.splitlines()
                       if line.split()[:2] == [str(stage), name.split()[0]])
            assert f"{seconds:9.4f}".strip() in row, (row, seconds)
    assert "ZeRO++ (hpZ+qwZ+qgZ)" in out


def test_nodes_without_a_model_says_what_to_add(capsys):
    from zeroshard import estimate
    with pytest.raises(SystemExit):
        estimate.main(["--device-memory", "80GB", "--nodes", "2"])
    assert "name a model" in capsys.readouterr().err
