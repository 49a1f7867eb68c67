"""qgZ (quantize_grads="int8" / "int4"): the gradient reduce-scatter over nodes x k ranks in two
all-to-all hops, quantized once each, summed in fp32 (sharding/quantized_reduce.py).

Checked exactly against the same two hops written here with ops.quantize / ops.dequantize from
every rank's input, and against the exact sum within the quantization's bound; bytes split by
node as the formula says; training stays on identical ranks, close to the exact reduction.
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import zeroshard  # noqa: E402
from dist_harness import run_distributed  # noqa: E402
from refusals import refused  # noqa: E402
from unit_net import make_unit_net  # noqa: E402
from zero_oracle import TINY_BUCKET_MB, make_batches, mse_loss, param_snapshot, rank_slice  # noqa: E402
from zeroshard import ops  # noqa: E402
from zeroshard.comm.communicator_factory import make_communicator  # noqa: E402
from zeroshard.comm.topology import Topology, node_groups  # noqa: E402
from zeroshard.sharding.quantized_reduce import QuantizedReduceScatter  # noqa: E402

BLOCK = 64


def _roundtrip(x, bits):
    q, s = ops.quantize(x.contiguous(), bits=bits, block=BLOCK)
    return ops.dequantize(q, s, x.numel(), bits=bits, block=BLOCK)


def expected_slice(inputs, rank, nodes, k, bits):
    """The two hops for `rank`, from every rank's full input, with the same ops in the same
    order."""
    S = inputs[0].numel() // (nodes * k)
    node, local = divmod(rank, k)
    node_sums = []
    for n in range(nodes):  # the node sum local rank `local` of node n computes
        acc = torch.zeros(nodes * S)
        for i in range(k):
            row = inputs[n * k + i].view(nodes, k, S)[:, local, :].reshape(-1)
            acc += _roundtrip(row, bits)
        node_sums.append(acc)
    out = torch.zeros(S)
    for n in range(nodes):
        out += _roundtrip(node_sums[n].view(nodes, S)[node], bits)
    return out


def _reduce(rank, world_size, k, bits):
    topology = Topology(world_size, k)
    intra, cross = node_groups(topology)
    cpu = torch.device("cpu")
    node_comm = make_communicator(intra, cpu, topology=topology)
    cross_comm = make_communicator(cross, cpu, topology=topology)
    qrs = QuantizedReduceScatter(node_comm, cross_comm, bits, block=BLOCK)
    g = torch.Generator().manual_seed(rank)
    S = 301
    full = torch.randn(world_size * S, generator=g) * (1 + rank)
    part = torch.empty(S)
    qrs.reduce_scatter(part, full).wait()
    everyone = [None] * world_size
    dist.all_gather_object(everyone, full)
    exact = torch.stack(everyone).sum(0)[rank * S:(rank + 1) * S]
    want = expected_slice(everyone, rank, world_size // k, k, bits)
    return {"part": part, "want": want, "exact": exact,
            "node": node_comm.stats.as_dict()["reduce_scatter"],
            "cross": cross_comm.stats.as_dict()["reduce_scatter"], "S": S}


@pytest.mark.parametrize("world_size,k", [(4, 2), (6, 3), (4, 4)])
@pytest.mark.parametrize("bits", [8, 4])
def test_two_hops_are_the_formula_bit_for_bit(world_size, k, bits):
    nodes = world_size // k
    for rank, out in enumerate(run_distributed(_reduce, world_size, k, bits)):
        assert torch.equal(out["part"], out["want"]), rank
        # within what quantizing twice can move a sum of world_size values
        err = (out["part"] - out["exact"]).abs().max().item()
        assert err < out["exact"].abs().max().item() * (0.05 if bits == 8 else 0.6), err
        S = out["S"]
        q = lambda n: -(-ops.quantized_bytes(n, bits) // 4) * 4 + 4 * ops.quantized_blocks(n, BLOCK)
        # node hop: k rows of nodes*S, (k-1)/k of them sent, all within the node
        assert out["node"]["payload_bytes"] == k * q(nodes * S)
        assert out["node"]["inter_node_bytes"] == 0
        assert out["node"]["bytes_sent"] == (k - 1) * q(nodes * S)
        # cross hop: nodes rows of S, (nodes-1)/nodes sent, all across nodes
        assert out["cross"]["payload_bytes"] == nodes * q(S)
        assert out["cross"]["intra_node_bytes"] == 0
        assert out["cross"]["inter_node_bytes"] == (nodes - 1) * q(S)


def _train(rank, world_size, stage, options, steps):
    model = make_unit_net()
    opt = zeroshard.ZeroAdamW(model, lr=1e-3, stage=stage, bucket_mb=TINY_BUCKET_MB,
                              node_size=2, **options)
    for tokens, target in make_batches(steps):
        tokens, target = rank_slice(tokens, rank, world_size), rank_slice(target, rank, world_size)
        opt.zero_grad()
        opt.backward(mse_loss(model, tokens, target))
        opt.clip_grad_norm_(1.0)
        opt.step()
    stats = opt.comm_stats()
    errors = opt.quantization_error()
    with opt.full_params():
        return param_snapshot(model), stats, errors


@pytest.mark.parametrize("stage,options", [
    (2, {"quantize_grads": "int8"}),
    (3, {"quantize_grads": "int4", "quantize_weights": "int8"}),
])
def test_training_stays_close_on_identical_ranks(stage, options):
    steps = 4
    quantized = run_distributed(_train, 4, stage, options, steps)
    exact = run_distributed(_train, 4, stage, {}, steps)
    for snap, _, _ in quantized[1:]:
        for name in snap:
            assert torch.equal(snap[name], quantized[0][0][name]), name
    worst = 0.0
    for name, p in quantized[0][0].items():
        # each run moves a weight by about lr a step (Adam's normalised step, plus decay):
        # the two can differ by no more than both moving apart every step
        diff = (p - exact[0][0][name]).abs().max().item()
        assert diff <= 2 * steps * 1e-3 * 1.1, (name, diff)
        worst = max(worst, diff)
    assert worst > 0
    # every rank's gradient bytes across nodes: the cross hop's, a fraction of the exact ring's
    q_inter = sum(s["reduce_scatter"]["inter_node_bytes"] for _, s, _ in quantized)
    e_inter = sum(s["reduce_scatter"]["inter_node_bytes"] for _, s, _ in exact)
    assert 0 < q_inter < e_inter * (0.3 if options["quantize_grads"] == "int8" else 0.2)
    # each quantized collective's relative error, reported: about step / sqrt(12) / rms
    # (int8: ~1e-2 of a block's largest value, int4: ~1e-1); none without quantization
    for _, _, errors in quantized:
        assert 0 < errors["reduce_scatter"] < (0.02 if options["quantize_grads"] == "int8"
                                               else 0.3), errors
        if "quantize_weights" in options:
            assert 0 < errors["all_gather"] < 0.02, errors
    assert all(errors == {} for _, _, errors in exact)


@pytest.mark.parametrize("kwargs,message", [
    ({"stage": 0, "quantize_grads": "int8"}, "use stage=1, 2 or 3"),
    ({"stage": 2, "quantize_grads": "int2"}, "must be None, 'int8' or 'int4'"),
    ({"stage": 2, "quantize_grads": "int8", "shard_size": 2},
     "does not combine with shard_size= or a process_group (with shard_size= the gradients "
     "cross nodes in the replicas' all-reduce, which it would leave unquantized). Use "
     "shard_size= alone"),
])
def test_combinations_not_built_are_refused(kwargs, message):
    for answer in run_distributed(refused, 4, kwargs):
        assert answer is not None and message in answer, answer
