"""CommGroups: the communicators an optimizer talks through, plain or hybrid-sharded.

Plain ZeRO (shard_size = every rank of the process group): one communicator does everything.
Hybrid sharding (shard_size=k < N, FSDP's HSDP, ZeRO++'s MiCS-like grouping): state is
partitioned within shard groups of k ranks (topology.shard_groups) and replicated across the N/k
of them. `comm` is then the shard group's: reduce-scatters, all-gathers and unit gathers stay
inside it; `replica_comm` all-reduces each reduced gradient slice across the replicas;
`world_comm` carries what every rank must agree on (rank 0's weights at construction, which
parameters got a gradient, the launch order of buckets), so that replicas stay identical.
"""
from __future__ import annotations

import datetime
from typing import Optional

import torch
import torch.distributed as dist

from .communicator import Communicator, make_communicator
from .simulated_communicator import simulated_if_asked
from .topology import Topology, shard_groups, topology_of


class CommGroups:
    @classmethod
    def for_optimizer(cls, process_group, device: torch.device, timeout_s: float, *,
                      node_size, shard_size, stage: int, offload) -> "CommGroups":
        """Which ranks share a node (node_size=, else torchrun's), and the groups shard_size=
        asks for (checked: resolved_shard_size)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        topology = topology_of(world, node_size)
        k = resolved_shard_size(shard_size, world, topology.node_size, stage=stage,
                                offload=offload, process_group=process_group)
        return cls(process_group, device, datetime.timedelta(seconds=timeout_s), topology, k)

    def __init__(self, process_group, device: torch.device,
                 timeout: Optional[datetime.timedelta], topology: Topology,
                 shard_size: Optional[int] = None) -> None:
        self.topology = topology

        def comm_over(group) -> Communicator:
            return simulated_if_asked(make_communicator(group, device, timeout, topology), device)
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.replica_comm: Optional[Communicator] = None
        if shard_size is None or shard_size == world:
            self.process_group = process_group
            self.comm = self.world_comm = comm_over(process_group)
        else:
            shard, replica = shard_groups(world, shard_size)
            self.process_group = shard
            self.comm = comm_over(shard)
            self.replica_comm = comm_over(replica)
            self.world_comm = comm_over(None)
        self.replicas = self.replica_comm.world_size if self.replica_comm is not None else 1
        # Gradients are averaged over every rank that computed one: the shard group's and,
        # through the replica all-reduce, every replica's.
        self.average_over = self.comm.world_size * self.replicas

    def communicators(self):
        """Each distinct communicator once: the ones whose bytes comm_stats() adds up."""
        seen = []
        for c in (self.comm, self.replica_comm, self.world_comm):
            if c is not None and all(c is not s for s in seen):
                seen.append(c)
        return seen


def resolved_shard_size(shard_size, world_size: int, node_size: int, *, stage: int, offload,
                        process_group) -> int:
    """Ranks each shard group holds (world_size: plain ZeRO, no replicas), with the hybrid
    combinations not built yet refused, each naming what to use instead."""
    if shard_size is None:
        return world_size
    k = node_size if shard_size == "node" else shard_size
    if world_size % k:
        raise ValueError(f"shard_size={shard_size!r} ({k} ranks) does not divide the world size "
                         f"{world_size}: shard groups must be of equal size (use a divisor of "
                         f"{world_size}, or 'node' with nodes of equal size)")
    if k == world_size:
        return k
    if process_group is not None:
        raise ValueError("shard_size= builds its shard and replica groups over the default "
                         "process group: pass process_group=None (or shard within your group "
                         "by passing it alone, without shard_size)")
    if stage == 0:
        raise ValueError("stage 0 replicates everything already: shard_size= applies to stages "
                         "1-3")
    if offload == "cpu":
        raise NotImplementedError("shard_size= with offload='cpu' is not built yet: use one "
                                  "or the other")
    return k
