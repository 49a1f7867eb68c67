"""Topology: which ranks share a node (torchrun's LOCAL_WORLD_SIZE or node_size=), and
comm_stats() splitting every collective's bytes_sent into intra_node_bytes and inter_node_bytes
by the ring model ([Note: bytes across nodes] in comm/topology.py).

Over gloo processes on this machine "nodes" are only numbers: these tests check the accounting
and the groups. tests/python/test_two_nodes.py runs the same over a real slow link between two
network namespaces.
"""
import pytest
import torch
import torch.distributed as dist

from dist_harness import run_distributed
from zeroshard import ZeroAdamW
from zeroshard.comm.communicator_factory import make_communicator
from zeroshard.comm.topology import Topology, group_ranks, node_groups, node_size_from, topology_of


class Net(torch.nn.Module):
    def __init__(self, dim=12, units=3):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(dim, dim + 1 - i % 2)
                                          for i in range(units))
        self.out = torch.nn.Linear(dim + 1 - (units - 1) % 2, 1)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))[..., :12]
        return self.out(torch.nn.functional.pad(x, (0, self.out.in_features - x.shape[-1])))


def test_node_size_comes_from_torchrun_or_the_argument():
    env = {"LOCAL_WORLD_SIZE": "2", "RANK": "3", "LOCAL_RANK": "1"}
    assert node_size_from(env, 4) == 2
    assert node_size_from(env, 4, node_size=4) == 4  # the argument wins
    assert node_size_from({}, 6) == 6  # mp.spawn on one machine: one node
    t = topology_of(8, env={"LOCAL_WORLD_SIZE": "4", "RANK": "5", "LOCAL_RANK": "1"})
    assert (t.nodes, t.node_size, t.node_of(5), t.node_of(3)) == (2, 4, 1, 0)


def test_unequal_nodes_and_scattered_numbering_are_refused():
    with pytest.raises(ValueError, match="does not divide the world size 6.*nproc_per_node"):
        Topology(6, 4)
    with pytest.raises(ValueError, match="not numbered one node after another"):
        node_size_from({"LOCAL_WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "1"}, 4)
    with pytest.raises(ValueError, match="whole number"):
        Topology(4, 0)


def test_ring_successor_decides_where_bytes_go():
    t = Topology(4, 2)
    world = [0, 1, 2, 3]
    assert [t.successor_crosses_node(world, r) for r in range(4)] == [False, True, False, True]
    assert not any(t.successor_crosses_node([2, 3], r) for r in range(2))  # within node 1
    assert all(t.successor_crosses_node([1, 3], r) for r in range(2))  # local rank 1 of each
    assert not Topology(4, 4).successor_crosses_node(world, 3)  # one node: nothing crosses
    assert not t.successor_crosses_node([2], 0)


def _stats_by_topology(rank, world_size, node_size, stage):
    torch.manual_seed(0)
    model = Net()
    opt = ZeroAdamW(model, lr=1e-2, stage=stage, node_size=node_size, bucket_mb=0.001)
    for _ in range(2):
        model(torch.randn(4, 12)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return {"stats": opt.comm_stats(), "nodes": opt.topology.nodes}


@pytest.mark.parametrize("stage", [2, 3])
def test_comm_stats_split_bytes_by_node(stage):
    per_rank = run_distributed(_stats_by_topology, 4, 2, stage)
    for rank, out in enumerate(per_rank):
        assert out["nodes"] == 2
        for kind, entry in out["stats"].items():
            if kind in ("d2h", "h2d"):
                continue
            assert entry["intra_node_bytes"] + entry["inter_node_bytes"] == entry["bytes_sent"]
            # ranks 1 and 3 send to the next node's first rank; 0 and 2 within their node
            across = entry["inter_node_bytes"] if rank % 2 else entry["intra_node_bytes"]
            assert across == entry["bytes_sent"], (rank, kind, entry)
        assert sum(e["bytes_sent"] for e in out["stats"].values()) > 0
    # one node of 4: nothing crosses
    for out in run_distributed(_stats_by_topology, 4, 4, stage):
        assert out["nodes"] == 1
        assert all(e["inter_node_bytes"] == 0 for e in out["stats"].values())


def _node_group_collectives(rank, world_size):
    topology = Topology(world_size, 2)
    intra, cross = node_groups(topology)
    assert node_groups(topology) == (intra, cross)  # built once
    out = {}
    for name, group in (("intra", intra), ("cross", cross), ("world", None)):
        comm = make_communicator(group, torch.device("cpu"), topology=topology)
        t = torch.full((1000,), float(rank + 1))
        comm.all_reduce(t).wait()
        out[name] = {"sum": t[0].item(), "ranks": group_ranks(group),
                     "stats": comm.stats.as_dict()["all_reduce"]}
    dist.barrier()
    return out


def test_node_groups_reduce_within_and_across_nodes():
    per_rank = run_distributed(_node_group_collectives, 4)
    for rank, out in enumerate(per_rank):
        node, local = rank // 2, rank % 2
        assert out["intra"]["ranks"] == [2 * node, 2 * node + 1]
        assert out["cross"]["ranks"] == [local, local + 2]
        assert out["intra"]["sum"] == sum(r + 1 for r in out["intra"]["ranks"])
        assert out["cross"]["sum"] == sum(r + 1 for r in out["cross"]["ranks"])
        assert out["world"]["sum"] == 10
        payload = 1000 * 4
        # a ring of 2 sends 2 * (2 - 1) / 2 of the payload: all within, or all across
        assert out["intra"]["stats"]["intra_node_bytes"] == payload
        assert out["intra"]["stats"]["inter_node_bytes"] == 0
        assert out["cross"]["stats"]["inter_node_bytes"] == payload
        assert out["cross"]["stats"]["intra_node_bytes"] == 0
        world = out["world"]["stats"]
        assert world["bytes_sent"] == 2 * 3 * payload // 4
        assert world["inter_node_bytes"] == (world["bytes_sent"] if local == 1 else 0)


def _refused(rank, world_size, node_size):
    try:
        ZeroAdamW(Net(units=1), lr=1e-2, stage=2, node_size=node_size)
    except ValueError as e:
        return str(e)
    return None


def test_a_node_size_that_does_not_divide_the_world_is_refused_at_construction():
    for message in run_distributed(_refused, 4, 3):
        assert message is not None and "does not divide the world size 4" in message
    with pytest.raises(ValueError, match="node_size must be None"):
        ZeroAdamW(Net(units=1), lr=1e-2, node_size="node")
