"""Topology: which ranks share a node, and which bytes of a collective cross between nodes.

[Note: nodes] torchrun starts LOCAL_WORLD_SIZE processes on each node and numbers them
contiguously (RANK = node rank * LOCAL_WORLD_SIZE + LOCAL_RANK), so ranks r and s share a node
when r // node_size == s // node_size. `node_size=` overrides what torchrun says (tests, other
launchers); without either, every rank is taken to share one node (mp.spawn on one machine).
Nodes of unequal size and ranks not numbered node by node are refused: every layout zeroshard
builds over nodes (sub-communicators, hybrid sharding) assumes both.

[Note: bytes across nodes] Bytes are counted by the ring model of `bytes_sent` (core's
ring_bytes_sent): in a ring collective over a group, every rank sends its (n-1)/n of the payload
to the next rank of the group (group rank + 1, wrapping around). So all of what a rank sends
crosses between nodes when that next rank is on another node, and none of it otherwise:
`successor_crosses_node` decides, per communicator, once. Over 2 nodes of 2 ranks, a collective
of the whole world sends across from ranks 1 and 3 only; one within a node sends nothing across;
one among the ranks with the same local rank (one per node) sends everything across.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import torch.distributed as dist


class Topology:
    def __init__(self, world_size: int, node_size: int) -> None:
        if not (isinstance(node_size, int) and node_size >= 1):
            raise ValueError(f"node_size must be a whole number of ranks >= 1, got {node_size!r}")
        if world_size % node_size:
            raise ValueError(
                f"node_size={node_size} does not divide the world size {world_size}: zeroshard "
                "needs nodes of equal size (start the same number of processes on every node, "
                "torchrun --nproc_per_node=K), or pass node_size= that divides it")
        self.world_size = world_size
        self.node_size = node_size

    @property
    def nodes(self) -> int:
        return self.world_size // self.node_size

    def node_of(self, global_rank: int) -> int:
        return global_rank // self.node_size

    def successor_crosses_node(self, group_ranks: Sequence[int], group_rank: int) -> bool:
        """Whether the ring successor of `group_rank` in a group of these global ranks (in
        group-rank order) is on another node: then all its ring bytes cross between nodes."""
        if len(group_ranks) <= 1:
            return False
        me = group_ranks[group_rank]
        successor = group_ranks[(group_rank + 1) % len(group_ranks)]
        return self.node_of(me) != self.node_of(successor)

    def __repr__(self) -> str:
        return f"Topology({self.nodes} nodes x {self.node_size} ranks)"


def node_size_from(env: Mapping[str, str], world_size: int, node_size: Optional[int] = None
                   ) -> int:
    """node_size= if given; else torchrun's LOCAL_WORLD_SIZE, checked against RANK and
    LOCAL_RANK ([Note: nodes]); else the whole world (one node)."""
    if node_size is not None:
        return node_size
    local = env.get("LOCAL_WORLD_SIZE")
    if local is None:
        return world_size
    try:
        local_size = int(local)
        rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ValueError(f"LOCAL_WORLD_SIZE={local!r}, RANK and LOCAL_RANK must be whole "
                         "numbers (torchrun sets them); or pass node_size=") from None
    if local_size < 1 or rank % local_size != local_rank:
        raise ValueError(
            f"RANK={rank}, LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_size}: the ranks "
            "of a node are not numbered one node after another as torchrun numbers them; "
            "launch with torchrun, or pass node_size= to say which ranks share a node")
    return local_size


def topology_of(world_size: int, node_size: Optional[int] = None,
                env: Optional[Mapping[str, str]] = None) -> Topology:
    """The topology of the default group's world_size ranks ([Note: nodes])."""
    return Topology(world_size, node_size_from(os.environ if env is None else env, world_size,
                                               node_size))


def group_ranks(process_group) -> list:
    """The global ranks of a process group, in group-rank order (None: the default group)."""
    if process_group is None or process_group is dist.GroupMember.WORLD:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(process_group))


_node_groups: dict = {}


def node_groups(topology: Topology) -> tuple:
    """(this rank's node group, this rank's cross-node group): the ranks of its node, and the
    ranks with its local rank on every node (one per node). Built once per topology, for the
    whole default group: every rank must make the first call, in the same order as the others
    (torch.distributed's new_group is collective). Communicators over them (make_communicator)
    are gloo subgroups on CPU and NCCL sub-communicators on GPU."""
    key = (topology.world_size, topology.node_size)
    if key not in _node_groups:
        if dist.get_world_size() != topology.world_size:
            raise ValueError(f"{topology!r} describes {topology.world_size} ranks, the default "
                             f"group has {dist.get_world_size()}")
        k, nodes = topology.node_size, topology.nodes
        intra, _ = dist.new_subgroups_by_enumeration(
            [list(range(n * k, (n + 1) * k)) for n in range(nodes)])
        cross, _ = dist.new_subgroups_by_enumeration(
            [list(range(local, topology.world_size, k)) for local in range(k)])
        _node_groups[key] = (intra, cross)
    return _node_groups[key]


_shard_groups: dict = {}


def shard_groups(world_size: int, shard_size: int) -> tuple:
    """Hybrid sharding's groups: (this rank's shard group, this rank's replica group). Shard
    groups are runs of shard_size consecutive ranks (with shard_size = node size: the ranks of
    a node); a replica group holds the ranks at the same place in every shard group. Built once
    per (world size, shard size), collectively, as node_groups."""
    key = (world_size, shard_size)
    if key not in _shard_groups:
        if dist.get_world_size() != world_size or world_size % shard_size:
            raise ValueError(f"shard_size={shard_size} must divide the world size {world_size}")
        shard, _ = dist.new_subgroups_by_enumeration(
            [list(range(g * shard_size, (g + 1) * shard_size))
             for g in range(world_size // shard_size)])
        replica, _ = dist.new_subgroups_by_enumeration(
            [list(range(i, world_size, shard_size)) for i in range(shard_size)])
        _shard_groups[key] = (shard, replica)
    return _shard_groups[key]
