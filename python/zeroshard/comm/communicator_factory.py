"""make_communicator: the Communicator for a process group and a device.

CUDA tensors get NcclCommunicator (even at world size 1, so that a one-GPU run exercises the
multi-GPU code), one rank LocalCommunicator, anything else ProcessGroupCommunicator (gloo);
every one learns from the topology which of its bytes cross between nodes.
"""
from __future__ import annotations

import datetime
from typing import Optional

import torch
import torch.distributed as dist

from .. import _core
from .communicator import Communicator, LocalCommunicator, ProcessGroupCommunicator
from .nccl_communicator import NcclCommunicator
from .topology import Topology, group_ranks, topology_of


def default_timeout_s() -> float:
    return 600.0


def make_communicator(process_group: Optional[dist.ProcessGroup], device: torch.device,
                      timeout: Optional[datetime.timedelta] = None,
                      topology: Optional[Topology] = None) -> Communicator:
    """The communicator for tensors on `device` over `process_group` (None: the default group,
    or world size 1 when torch.distributed is not initialised), its bytes split by `topology`
    (None: as torchrun placed the ranks, topology.py). The optimizers take it through
    simulated_communicator.simulated_if_asked (ZEROSHARD_SIMULATE_ASYNC=1)."""
    if not dist.is_available() or not dist.is_initialized():
        if process_group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialised")
        return LocalCommunicator()
    comm = _make_communicator(process_group, device, timeout)
    topology = topology or topology_of(dist.get_world_size())
    ranks = group_ranks(process_group)
    comm.crosses_node = topology.successor_crosses_node(ranks, comm.rank)
    if isinstance(comm, ProcessGroupCommunicator) and len({topology.node_of(r) for r in ranks}) > 1:
        # Across nodes the ring gather stays: its link use is what comm_stats() models, while
        # a broadcast per rank sends every slice over the slow link to each remote rank.
        comm.gather_by_broadcast = False
    return comm


def _make_communicator(process_group, device, timeout) -> Communicator:
    # CUDA tensors take the NCCL path even at world size 1, so that a one-GPU run exercises the
    # same code as a multi-GPU one.
    if device.type == "cuda" and _core.gpu.built_with_cuda():
        seconds = timeout.total_seconds() if timeout is not None else default_timeout_s()
        return NcclCommunicator(process_group, device, seconds)
    if dist.get_world_size(process_group) == 1:
        return LocalCommunicator()
    return ProcessGroupCommunicator(process_group,
                                    timeout.total_seconds() if timeout is not None else None)
