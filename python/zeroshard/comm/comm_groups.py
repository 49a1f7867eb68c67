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

from .communicator import Communicator
from .communicator_factory import make_communicator
from .simulated_communicator import simulated_if_asked
from .topology import Topology, node_groups, shard_groups, topology_of
from .topology_options import TopologyOptions


class CommGroups:
    @classmethod
    def for_optimizer(cls, process_group, device: torch.device, timeout_s: float,
                      options: TopologyOptions, *, stage: int) -> "CommGroups":
        """Which ranks share a node (node_size=, else torchrun's), and the groups shard_size=
        asks for (checked: resolved_shard_size)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        topology = topology_of(world, options.node_size)
        quantize_grads, secondary_shard = options.quantize_grads, options.secondary_shard
        k = resolved_shard_size(options.shard_size, world, topology.node_size, stage=stage,
                                process_group=process_group)
        if quantize_grads is not None:
            if k != world or process_group is not None:
                raise ValueError(
                    "quantize_grads= quantizes a reduce-scatter over every rank of the default "
                    "group, node by node; it does not combine with shard_size= or a "
                    "process_group (with shard_size= the gradients cross nodes in the replicas' "
                    "all-reduce, which it would leave unquantized). Use shard_size= alone (that "
                    "all-reduce is its only inter-node traffic), or quantize_grads= without it "
                    "(at stage 3 with secondary_shard='node' and quantize_weights='int8': "
                    "ZeRO++)")
        if secondary_shard is not None and (k != world or process_group is not None):
            raise ValueError("secondary_shard= keeps a node-local copy of parameters sharded "
                             "over every rank of the default group; with shard_size= every "
                             "gather stays inside the shard group already: use one or the other")
        groups = cls(process_group, device, datetime.timedelta(seconds=timeout_s), topology, k)
        if (quantize_grads is not None or secondary_shard is not None) and world > 1:
            intra, cross = node_groups(topology)
            groups.node_comm = groups.comm_over(intra)
            groups.cross_comm = groups.comm_over(cross)
        return groups

    def __init__(self, process_group, device: torch.device,
                 timeout: Optional[datetime.timedelta], topology: Topology,
                 shard_size: Optional[int] = None) -> None:
        self.topology = topology
        self._device, self._timeout = device, timeout
        comm_over = self.comm_over
        # qgZ's hops and hpZ's gathers (for_optimizer with quantize_grads or secondary_shard):
        # the node's ranks, and the ranks with this rank's local rank on every node
        self.node_comm: Optional[Communicator] = None
        self.cross_comm: Optional[Communicator] = None
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

    def comm_over(self, group) -> Communicator:
        return simulated_if_asked(make_communicator(group, self._device, self._timeout,
                                                    self.topology), self._device)

    def communicators(self):
        """Each distinct communicator once: the ones whose bytes comm_stats() adds up."""
        seen = []
        for c in (self.comm, self.replica_comm, self.world_comm, self.node_comm,
                  self.cross_comm):
            if c is not None and all(c is not s for s in seen):
                seen.append(c)
        return seen


def resolved_shard_size(shard_size, world_size: int, node_size: int, *, stage: int,
                        process_group) -> int:
    """Ranks each shard group holds (world_size: plain ZeRO, no replicas), with the hybrid
    combinations that cannot work refused, each naming what to use instead."""
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
    return k
