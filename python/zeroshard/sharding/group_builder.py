"""FlatGroupBuilder: turns an optimizer's param groups into FlatGroups, the flat buffers every
stage partitions: one per param group and dtype at stages 0-2; at stage 3 one per unit, param
group and dtype (a unit's gather reads its own shards only), plus the unit's frozen parameters.

Its inputs are the param groups and parameter names, the layout settings (rank, world size,
stage, bucket size, reduce dtype, process group), where host memory comes from (offload) and how
rank 0's values reach the other ranks (`broadcast`, for groups not built by sharded_init).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import weakref

import torch

from ..sharded_params import sharded_init
from .buffer_ring import largest_unit_numel
from .flat_group import FlatGroup
from .param_lists import TRAINABLE_DTYPES
from .param_units import Unit, find_units, owning_units


class FlatGroupBuilder:
    def __init__(self, param_groups: List[dict], names: Dict[int, str], *, rank: int,
                 world_size: int, stage: int, bucket_elems: int, reduce_dtype: torch.dtype,
                 device: torch.device, process_group, host_zeros: Optional[Callable],
                 broadcast: Callable[[List[torch.Tensor]], None]) -> None:
        self.param_groups = param_groups
        self.names = names
        self.layout = dict(rank=rank, world_size=world_size, bucket_elems=bucket_elems,
                           reduce_dtype=reduce_dtype, process_group=process_group)
        self.stage = stage
        self.device = device
        self.host_zeros = host_zeros
        self.broadcast = broadcast

    def of_param_group(self, gi: int, select=None, adopted: Optional[list] = None
                       ) -> List[FlatGroup]:
        """One FlatGroup per dtype among param group gi's trainable parameters (those `select`
        accepts). `adopted` gets, per FlatGroup, whether all its parameters came from
        sharded_init (identical on every rank: no broadcast needed)."""
        by_dtype: "OrderedDict[torch.dtype, list]" = OrderedDict()
        for p in self.param_groups[gi]["params"]:
            if p.requires_grad and (select is None or select(p)):
                by_dtype.setdefault(p.dtype, []).append(p)
        if adopted is not None:
            adopted.extend(all(sharded_init.is_sharded(p) for p in ps)
                           for ps in by_dtype.values())
        return [FlatGroup(ps, [self.names[id(p)] for p in ps], gi, stage=self.stage,
                          host_zeros=self.host_zeros, **self.layout)
                for ps in by_dtype.values()]

    def of_units(self, module: torch.nn.Module, units, partition_frozen: bool
                 ) -> Tuple[List[Unit], List[FlatGroup], List[FlatGroup]]:
        """Stage 3: (units, trainable FlatGroups, frozen FlatGroups). Each group is made equal
        across ranks and sharded as soon as it is built (peak memory: one group whole at a
        time). Frozen parameters (partition_frozen) are gathered with their unit, never
        reduced; otherwise they stay whole on every rank."""
        found = find_units(module, units)
        owner = owning_units(module, [m for _, m in found])
        unit_list = [Unit(0, "<root>", module, True)] + [
            Unit(i + 1, name, m, False) for i, (name, m) in enumerate(found)]
        for g in self.param_groups:
            for p in g["params"]:
                if p.requires_grad and id(p) not in owner:
                    raise ValueError(f"{self.names[id(p)]} is not a parameter of the module "
                                     "given to the stage-3 optimizer; stage 3 can only gather "
                                     "parameters of that module")
        trainable, frozen = [], []
        for u in unit_list:
            for gi in range(len(self.param_groups)):
                adopted = []
                added = self.of_param_group(
                    gi, lambda p, u=u: owner.get(id(p)) == u.index, adopted)
                for fg, whole in zip(added, adopted):
                    if not whole:  # sharded_init's came from rank 0 already
                        self.broadcast([fg.flat_param])
                    fg.shard_and_free()
                u.groups.extend(added)
                trainable.extend(added)
            if partition_frozen:
                groups = self._frozen_of(module, u, owner)
                u.groups.extend(groups)
                frozen.extend(groups)
        return unit_list, trainable, frozen

    def _frozen_of(self, module: torch.nn.Module, u: Unit, owner) -> List[FlatGroup]:
        """The frozen FlatGroups of unit u: its parameters that require no grad, per dtype
        (float32/bfloat16/float16 on the optimizer's device; others stay whole)."""
        by_dtype: "OrderedDict[torch.dtype, list]" = OrderedDict()
        names = dict((id(p), n) for n, p in module.named_parameters(remove_duplicate=True))
        for p in dict.fromkeys(module.parameters()):
            if (not p.requires_grad and owner.get(id(p)) == u.index and p.device == self.device
                    and p.dtype in TRAINABLE_DTYPES
                    and sharded_init.whole_shape(p).numel() > 0):
                by_dtype.setdefault(p.dtype, []).append(p)
        groups = []
        for ps in by_dtype.values():
            fg = FlatGroup(ps, [names.get(id(p), "a frozen parameter") for p in ps], -1,
                           stage=3, frozen=True, **self.layout)
            if not all(sharded_init.is_sharded(p) for p in ps):
                self.broadcast([fg.flat_param])
            fg.shard_and_free()
            groups.append(fg)
        return groups


def largest_unit_of(module: torch.nn.Module, units, params) -> int:
    """Stage 3: the most elements of `params` (whole shapes) in one non-root unit of module,
    for the automatic bucket size (buffer_ring.auto_bucket_mb)."""
    owner = owning_units(module, [m for _, m in find_units(module, units)])
    return largest_unit_numel([sharded_init.whole_shape(p).numel() for p in params],
                              [owner.get(id(p), 0) for p in params])


def adopt_sharded_init(params, names: Dict[int, str], world_size: int, stage: int,
                       partition_frozen: bool) -> None:
    """Parameters built under zeroshard.sharded_init hold only this rank's slice. Stage 3
    adopts the trainable ones (and, with partition_frozen, the frozen ones) group by group
    (FlatGroup gathers them); every other one is made whole here (a collective per
    parameter)."""
    sharded = [p for p in dict.fromkeys(params) if sharded_init.is_sharded(p)]
    for p in sharded:
        record = sharded_init.record_of(p)
        if record.spec.world_size != world_size:
            raise ValueError(
                f"{names.get(id(p), 'a parameter')} was sharded by sharded_init over "
                f"{record.spec.world_size} ranks, but the optimizer shards over {world_size}: "
                "pass the same process_group, or the same shard_size (and node_size), to both")
    for p in sharded:
        if stage != 3 or (not p.requires_grad and not partition_frozen):
            sharded_init.unshard(p)


def own_shards(owner, flat_groups, frozen_groups, shard_state, offload) -> None:
    """Stage 3: each sharded parameter's in-place edits reach its fp32 master (where one is
    kept apart from the parameter: in shard_state, or offload's host copy), and
    zeroshard.full_params(model) finds the optimizer that owns it (held weakly)."""
    me = weakref.ref(owner)
    for fg, state in zip(flat_groups, shard_state):
        fg.owner = me
        if offload is not None:
            fg.master_source = lambda fg=fg, state=state: offload.master(fg, state)
        else:
            fg.master_source = lambda state=state: state.get("master")
    for fg in frozen_groups:
        fg.owner = me
