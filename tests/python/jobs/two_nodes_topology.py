"""Run under ../shared/tools/two-nodes (torchrun --nnodes=2, 2 ranks a node, a thin link between
the nodes): zeroshard finds the nodes from torchrun, splits every collective's bytes into those
sent within a node and those sent across, and its node groups reduce within and across nodes.
Rank 0 prints one line `TOPOLOGY_RESULT <json>` for tests/python/test_two_nodes.py.
"""
import json
import os
import time

import torch
import torch.distributed as dist

import zeroshard
from zeroshard.comm.communicator_factory import make_communicator
from zeroshard.comm.topology import node_groups


def timed_all_reduce(group, topology, numel: int) -> float:
    comm = make_communicator(group, torch.device("cpu"), topology=topology)
    t = torch.ones(numel)
    dist.barrier()
    start = time.perf_counter()
    comm.all_reduce(t).wait()
    return time.perf_counter() - start


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    opt = zeroshard.ZeroAdamW(model, lr=1e-3, stage=3)
    for _ in range(2):
        model(torch.randn(8, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    stats = opt.comm_stats()
    intra, cross = node_groups(opt.topology)
    numel = 1 << 20  # 4 MB of fp32
    seconds = {"node": timed_all_reduce(intra, opt.topology, numel),
               "cross": timed_all_reduce(cross, opt.topology, numel),
               "world": timed_all_reduce(None, opt.topology, numel)}
    everyone = [None] * world
    dist.all_gather_object(everyone, {"rank": rank, "local_world_size":
                                      int(os.environ["LOCAL_WORLD_SIZE"]),
                                      "nodes": opt.topology.nodes, "stats": stats,
                                      "seconds": seconds})
    if rank == 0:
        print("TOPOLOGY_RESULT " + json.dumps(everyone), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
