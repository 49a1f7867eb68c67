"""ParamUnits: stage 3's units of parameters, gathered just before they run and freed after.

Owns: which modules are units and which of the optimizer's FlatGroups hold each unit's
parameters, the module hooks that gather a unit before its forward (and, through a gradient hook
on its outputs, before its backward) and free it after, the prefetch of the next unit in the
recorded order, and the check that every rank gathers the same unit. Knows FlatGroup
(materialize / free / shard_param) and the Communicator; knows nothing of optimizer maths or of
gradient buckets (the optimizer reports each bucket's launch, see `on_bucket_launched`).

[Note: unit lifecycle] A unit's full parameters are allocated and all-gathered from the ranks'
shards right before they are needed and freed as soon as they are not:
- forward: gathered at the unit's pre-forward hook (or earlier by a prefetch), freed when the
  next unit's forward starts when `reshard_after_forward` (non-root units), else kept for
  backward. The unit whose forward ran last is kept too: backward needs it first, so freeing
  it would only gather it again at once (what DeepSpeed's reuse distance and FSDP users'
  reshard_after_forward=False on the last block save). Nothing tells a unit it is the last
  while it runs, so each unit is held until the next one starts or the forward ends. Not with
  qwZ (the forward's weights are quantized; backward computes at exact ones) or hpZ (its
  backward gathers stay inside the node, and its memory is planned per unit);
- backward: gathered again when the first gradient of any of the unit's outputs is computed (a
  multi-grad hook registered in forward), freed once every gradient bucket of the unit has been
  launched (all its parameters' gradients have left for the reduce-scatter; autograd needs no
  weight after the last accumulation), or at the end of backward at the latest;
- the root unit (parameters outside every unit: embeddings, final norm, head) is kept from its
  forward to the end of backward, which needs it first (as FSDP keeps its root);
- step() frees everything (the shards change, gathered copies would be stale).
While a unit's forward runs again inside backward (activation checkpointing recomputes it),
nothing is freed.

[Note: unit order] Prefetch follows the order units ran in the previous forward (and, in
backward, the reverse of the current forward). Every rank records its own order, so a changed
order (a branch) costs one wasted gather, never a hang. A rank whose order differs from the
others' would pair its gather with another unit's and read wrong weights, and a forward that
one rank runs alone (evaluation under `if rank == 0:`) would pair its gathers with the other
ranks' training collectives; so each gather first all-gathers a call tag (call_tags.py: the
unit's index and whether it is a grad-recording forward, an evaluation or backward), and a
mismatch raises an error naming both sides on every rank. The root's tag (the first gather of
each forward, where a forward one rank runs alone begins) is checked before its data collective
is launched, so those never pair. Checking every unit's so would make each prefetch wait for the
collectives queued ahead of its tag (on gloo, in order: 14-17 ms a step of gpt-17m's 2-rank
stage 3, blocked in forward and backward), so the other units' tags are checked later: on CPU
when the unit's gather is waited, before its data is waited or read (a mismatched data
collective may have paired with another rank's: its values are never used); on CUDA, where
reading a tag stalls the host, at the next step() (or full_params()), before any update.

[Note: frozen parameters] A unit's frozen FlatGroups are gathered with it and never reduced.
The usual early free (once all the unit's gradient buckets are launched) is not enough when
it has frozen parameters: autograd may still need them for the gradient of the unit's inputs
(a LoRA layer's base weight, after its adapters' gradients are done). Such a unit is freed
once both have happened: its buckets are launched and the gradient of its forward inputs is
computed (a multi-grad hook on them), or at the end of backward.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils._pytree import tree_flatten

from ..comm import call_tags
from .quantized_gather import quantized_all_gather
from ..comm.communicator import Communicator, Work
from .flat_group import FlatGroup
from ..sharded_params.sharded_tensor import ShardedAccessError


class Unit:
    """One module whose own parameters (those not in a nested unit) are gathered together."""

    def __init__(self, index: int, name: str, module: torch.nn.Module, is_root: bool) -> None:
        self.index, self.name, self.module, self.is_root = index, name, module, is_root
        self.groups: List[FlatGroup] = []
        self.buckets = 0  # gradient buckets of all its FlatGroups
        self.launched = 0  # of them launched in the current backward
        self.pending: Optional[tuple] = None  # (tag_work, tags, [data works]) of a gather
        self.kept = False  # stays gathered until its backward (reshard_after_forward=False)
        self.inputs_pending = False  # frozen params: the inputs' gradient is not computed yet

    @property
    def gathered(self) -> bool:
        return bool(self.groups) and self.groups[0].gathered

    @property
    def full_nbytes(self) -> int:
        return sum(fg.full_nbytes for fg in self.groups)

    @property
    def has_frozen(self) -> bool:
        return any(fg.frozen for fg in self.groups)


class _UnitHook:
    """A module hook of ParamUnits. A copy.deepcopy of the model (an EMA) gets a hook that does
    nothing (the copy gathers through sharded_modules' hooks, not this optimizer's units);
    pickling the model refuses, as its sharded parameters do."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    # Gathers, frees and collectives are not traceable: torch.compile runs them eagerly,
    # between the compiled pieces of the model (a graph break at each unit boundary).
    @torch.compiler.disable
    def __call__(self, *args):
        return self.fn(*args)

    def __deepcopy__(self, memo):
        return _no_op_hook

    def __reduce__(self):
        raise ShardedAccessError(
            "a model trained by a zeroshard stage-3 optimizer cannot be pickled (torch.save of "
            "the model object): its parameters are sharded across ranks. Save with "
            "zeroshard.checkpoint.save(path, model=model, optimizer=opt), or save whole "
            "tensors: `with zeroshard.full_params(model): sd = model.state_dict()` on every "
            "rank, then torch.save(sd) on rank 0.")


def _no_op_hook(*args):
    return None


def find_units(module: torch.nn.Module, units=None) -> List[tuple]:
    """[(name, module)] of the units inside `module` (the root unit not included). Default:
    every child of every nn.ModuleList (a transformer's blocks). `units`: module classes and/or
    module instances."""
    classes = tuple(u for u in (units or ()) if isinstance(u, type))
    instances = {id(u) for u in (units or ()) if isinstance(u, torch.nn.Module)}
    if units is not None:
        bad = [u for u in units if not isinstance(u, (type, torch.nn.Module))]
        if bad:
            raise TypeError(f"units= takes module classes or module instances, got {bad[0]!r}")
    found, seen = [], set()
    for name, m in module.named_modules():
        if m is module or id(m) in seen:
            continue
        if units is None:
            is_unit = False
            parent_name = name.rsplit(".", 1)[0] if "." in name else ""
            parent = module.get_submodule(parent_name) if parent_name else module
            is_unit = isinstance(parent, torch.nn.ModuleList)
        else:
            is_unit = id(m) in instances or (bool(classes) and isinstance(m, classes))
        if is_unit:
            seen.add(id(m))
            found.append((name, m))
    if units is not None and instances - seen:
        raise ValueError("units= names a module instance that is not inside the model given "
                         "to the optimizer")
    return found


def owning_units(module: torch.nn.Module, unit_modules: Sequence[torch.nn.Module]
                 ) -> Dict[int, int]:
    """id(parameter) -> index of its unit (0 is the root). A parameter reached through two
    different units (tied weights) belongs to the root, which is gathered whenever either
    runs."""
    index = {id(m): i + 1 for i, m in enumerate(unit_modules)}
    owners: Dict[int, set] = defaultdict(set)

    def visit(m: torch.nn.Module, unit: int, path: set) -> None:
        if id(m) in path:
            return
        unit = index.get(id(m), unit)
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)].add(unit)
        for child in m._modules.values():
            if child is not None:
                visit(child, unit, path | {id(m)})

    visit(module, 0, set())
    return {pid: (next(iter(us)) if len(us) == 1 else 0) for pid, us in owners.items()}


class ParamUnits:
    def __init__(self, units: List[Unit], comm: Communicator, *,
                 prefetch: int, reshard_after_forward: bool,
                 wait_guard: Optional[Callable[[Work], None]] = None,
                 quantize_weights: Optional[str] = None, secondary=None) -> None:
        self.units = [u for u in units if u.groups]
        self.comm = comm
        self.prefetch = prefetch
        self.reshard_after_forward = reshard_after_forward
        # qwZ ("int8"): a forward's gathers of non-root units go through quantized_all_gather
        # (each such unit is freed after its forward: reshard_after_forward). The root (kept
        # from forward to the end of backward), gathers in backward, full_params() and a module
        # called on its own stay exact: gradients are taken at the exact weights.
        self.quantize_weights = quantize_weights
        self._forward_gathers = False  # inside a unit's forward pre-hook (its gather, prefetches)
        # hpZ (secondary_shards.py): backward gathers non-root units within the node
        self.secondary = secondary
        self.wait_guard = wait_guard
        self.unit_of_group: Dict[int, Unit] = {}
        for u in self.units:
            for fg in u.groups:
                self.unit_of_group[id(fg)] = u
                if not fg.frozen:
                    u.buckets += fg.layout.num_buckets
        self.root = next((u for u in self.units if u.is_root), None)
        self.by_index = {u.index: u for u in self.units}
        self.record: List[int] = []  # units' pre-forwards in the current forward
        self.previous: List[int] = []  # ... in the forward before it (prefetch order)
        self.matches = True  # the current forward follows `previous` so far
        self.backward_pos = 0  # where backward is in the reversed current record
        self.pinned = 0  # inside full_params(): nothing is freed
        # The unit whose forward ended last, not freed yet: kept for backward if the forward
        # ends before another unit starts (see [Note: unit lifecycle])
        self.held: Optional[Unit] = None
        self.hold_last = quantize_weights is None and secondary is None
        self.peak_alive = 0  # most non-root units with full buffers at once
        self._unchecked: List[tuple] = []  # CUDA: (unit, tags) not yet compared
        self._sharded = {id(p): fg for u in self.units for fg in u.groups for p in fg.params}
        self.on_first_forward: Optional[Callable[[], None]] = None  # the optimizer's checks
        # The optimizer's wait for a unit's deferred update (see deferred_update.py)
        self.before_gather: Optional[Callable[[Unit], None]] = None
        self._handles = []
        self._install_hooks()

    # ---- hooks -------------------------------------------------------------------------------

    def _install_hooks(self) -> None:
        for u in self.units:
            self._handles.append(u.module.register_forward_pre_hook(
                _UnitHook(lambda m, args, u=u: self._before_forward(u)), prepend=True))
            self._handles.append(u.module.register_forward_hook(
                _UnitHook(lambda m, args, out, u=u: self._after_forward(u, args, out))))
            # Modules holding the unit's parameters may be called on their own (an input
            # embedding through get_input_embeddings(), a head): gather first there too.
            mine = {id(q) for fg in u.groups for q in fg.params}
            owners = {id(m): m for m in u.module.modules()
                      if any(id(p) in mine for p in m._parameters.values() if p is not None)}
            for m in owners.values():
                if m is not u.module:
                    self._handles.append(m.register_forward_pre_hook(
                        _UnitHook(lambda mod, args, u=u: self.ensure(u)), prepend=True))
                self._handles.append(m._register_state_dict_hook(
                    _UnitHook(self._state_dict_guard)))

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @staticmethod
    def _in_backward() -> bool:
        return torch._C._current_graph_task_id() != -1

    def _before_forward(self, u: Unit) -> None:
        if self._in_backward():  # a checkpointed unit recomputed in backward
            self.ensure(u)
            return
        if self.on_first_forward is not None:
            check, self.on_first_forward = self.on_first_forward, None
            check()
        if u.is_root or len(self.record) > 4 * len(self.units):
            self.previous, self.record, self.matches = (self.record or self.previous), [], True
        if self.held is not None and self.held is not u:
            self.free(self.held)  # another unit runs: the held one was not the last
        self.held = None
        k = len(self.record)
        self.record.append(u.index)
        self.matches = self.matches and k < len(self.previous) and self.previous[k] == u.index
        self._forward_gathers = True
        try:
            self.ensure(u)
            if self.matches:
                self._prefetch(self.previous[k + 1:])
        finally:
            self._forward_gathers = False

    def _after_forward(self, u: Unit, args, output) -> None:
        if self._in_backward():
            return
        tensors = [t for t in tree_flatten(output)[0]
                   if isinstance(t, torch.Tensor) and t.requires_grad]
        needs_backward = torch.is_grad_enabled() and bool(tensors)
        if needs_backward:
            torch.autograd.graph.register_multi_grad_hook(
                tensors, lambda grad, u=u: self._before_backward(u), mode="any")
            self.backward_pos = 0
            if u.has_frozen:  # see [Note: frozen parameters]
                inputs = [t for t in tree_flatten(args)[0]
                          if isinstance(t, torch.Tensor) and t.requires_grad]
                u.inputs_pending = bool(inputs)
                if inputs:
                    torch.autograd.graph.register_multi_grad_hook(
                        inputs, lambda grads, u=u: self._inputs_done(u), mode="all")
        if u.is_root:
            # The forward is over: the unit that ran last is backward's first; nothing else of
            # it needs a full unit.
            if self.held is not None:
                self.held.kept = needs_backward
                self.held = None
            for other in self.units:
                if not other.is_root and not other.kept:
                    self.free(other)
            if not needs_backward:
                self.free(u)
        elif needs_backward and self.reshard_after_forward and self.hold_last:
            if self.held is not None and self.held is not u:  # a nested unit's
                self.free(self.held)
            self.held = u
        elif self.reshard_after_forward or not needs_backward:
            if needs_backward and self.secondary is not None and u.pending is None:
                self.secondary.keep(u.groups)
            self.free(u)
        else:
            u.kept = True

    def _before_backward(self, u: Unit) -> None:
        self.ensure(u)
        # The root's backward starts first (its head) though it ran first in forward.
        order = [i for i in reversed(self.record) if self.root is None or i != self.root.index]
        if u.is_root:
            self._prefetch(order[self.backward_pos:])
            return
        for k in range(self.backward_pos, len(order)):
            if order[k] == u.index:
                self.backward_pos = k + 1
                self._prefetch(order[k + 1:])
                break

    def _prefetch(self, upcoming: List[int]) -> None:
        ahead = 0
        for index in upcoming:
            if ahead >= self.prefetch:
                break
            v = self.by_index.get(index)
            if v is None or v.is_root:
                continue
            ahead += 1
            if not v.gathered:
                self._start_gather(v)

    def _state_dict_guard(self, module, state_dict, prefix, local_metadata) -> None:
        """Gathered (inside full_params): a copy that outlives the gathered buffer. Sharded:
        the entry is a ShardedTensor (an EMA's foreach lerp_ over state_dict() works on it;
        torch.save of it raises)."""
        for name, p in module._parameters.items():
            if state_dict.get(prefix + name) is p:  # keep_vars=True: the objects, no data read
                continue
            fg = self._sharded.get(id(p)) if p is not None else None
            if fg is not None and fg.gathered:
                state_dict[prefix + name] = state_dict[prefix + name].clone()

    # ---- gather and free ---------------------------------------------------------------------

    def ensure(self, u: Unit) -> None:
        """u's full parameters are in place when this returns."""
        if u.pending is None and not u.gathered:
            self._start_gather(u)
        if u.pending is not None:
            self._finish_gather(u)

    def _start_gather(self, u: Unit) -> None:
        if self.before_gather is not None:  # the shards hold the last step's update
            self.before_gather(u)
        tag_work = tags = None
        if self.comm.world_size > 1:
            # [Note: unit order]: every rank must be gathering this same unit, for the same kind
            # of pass.
            device = u.groups[0].device
            code = call_tags.encode(call_tags.UNIT, u.index, self._phase())
            tags = torch.empty(self.comm.world_size, dtype=torch.float32, device=device)
            mine = torch.full((1,), float(code), dtype=torch.float32, device=device)
            tag_work = self.comm.all_gather_control(tags, mine)
            if u.is_root:
                self._wait(tag_work)
                self._check_tags(tags, code)
                tag_work = None
            else:
                tags = (tags, code)
        for fg in u.groups:
            fg.materialize()
        # A unit's buffers are freed only after its gather is waited (free() finishes a pending
        # one), so the caller's stream orders their reuse: no record_stream (see Communicator).
        if (self.secondary is not None and not u.is_root and self._in_backward()
                and self.secondary.has(u.groups)):
            work = self.secondary.comm.all_gather_buckets(self.secondary.gather_pairs(u.groups),
                                                          record_outputs=False)
        else:  # every rank's shard of every bucket
            pairs = [(fg.flat_param[b_start:b_end], fg.shard_param[s0:s0 + (s_end - s_start)])
                     for fg in u.groups
                     for b, (b_start, b_end) in enumerate(fg.bucket_ranges)
                     for s_start, s_end, s0 in [fg.bucket_slice(b)]]
            if self.quantize_weights and self._forward_gathers and not u.is_root:
                work = quantized_all_gather(self.comm, pairs, bits=8)
            else:
                work = self.comm.all_gather_buckets(pairs, record_outputs=False)
        u.pending = (tag_work, tags, work)
        alive = sum(1 for v in self.units if v.gathered and not v.is_root)
        self.peak_alive = max(self.peak_alive, alive)

    def _finish_gather(self, u: Unit) -> None:
        tag_work, tags, work = u.pending
        u.pending = None
        if tag_work is not None:
            self._wait(tag_work)
            if u.groups[0].device.type == "cuda":
                self._unchecked.append(tags)  # (tags, code), compared at check_order()
            else:  # before the data collective is waited, let alone read
                self._check_tags(*tags)
        self._wait(work)

    @staticmethod
    def _phase() -> int:
        return call_tags.phase() | (1 if ParamUnits._in_backward() else 0)

    def _check_tags(self, tags: torch.Tensor, code: int) -> None:
        def name_of(kind: int, index: int) -> str:
            if kind == call_tags.UNIT and index in self.by_index:
                return self.by_index[index].name
            return f"#{index}"
        call_tags.check([int(t) for t in tags.tolist()], code, self.comm.rank, name_of)

    def check_order(self) -> None:
        """CUDA: compares the unit tags gathered since the last check (one host sync)."""
        pending, self._unchecked = self._unchecked, []
        for tags, code in pending:
            self._check_tags(tags, code)

    def _wait(self, work: Work) -> None:
        if self.wait_guard is not None and not work.is_completed():
            self.wait_guard(work)
        work.wait()

    def free(self, u: Unit) -> None:
        if self.pinned:
            return
        if u.pending is not None:  # never free memory a collective still writes
            self._finish_gather(u)
        if self.held is u:
            self.held = None
        u.kept = False
        for fg in u.groups:
            fg.free()

    def free_all(self) -> None:
        for u in self.units:
            self.free(u)
        if self.secondary is not None and not self.pinned:  # the shards are about to change
            self.secondary.drop()

    def gather_all(self) -> None:
        for u in self.units:
            if u.pending is None and not u.gathered:
                self._start_gather(u)
        for u in self.units:
            if u.pending is not None:
                self._finish_gather(u)

    # ---- backward bookkeeping (called by the optimizer) --------------------------------------

    def on_bucket_launched(self, fg: FlatGroup) -> None:
        """A gradient bucket of fg started its reduce-scatter; once all of a unit's have, its
        full parameters are not needed again in this backward."""
        u = self.unit_of_group.get(id(fg))
        if u is None:
            return
        u.launched += 1
        self._free_if_done(u)

    def _inputs_done(self, u: Unit) -> None:
        u.inputs_pending = False
        self._free_if_done(u)

    def _free_if_done(self, u: Unit) -> None:
        if u.launched == u.buckets and not u.inputs_pending and self._in_backward():
            self.free(u)

    def before_backward(self) -> None:
        """The first gradient of a backward: count this backward's launched buckets afresh."""
        for u in self.units:
            u.launched = 0

    def after_backward(self) -> None:
        self.free_all()

    @contextlib.contextmanager
    def full_params(self):
        """Every unit gathered (a collective on every rank) and kept until the block ends."""
        self.check_order()
        self.gather_all()
        self.pinned += 1
        try:
            yield
        finally:
            self.pinned -= 1
