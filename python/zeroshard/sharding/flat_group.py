"""FlatGroup: the parameters of one param group and dtype, moved into one flat buffer.

Owns: the Layout (from the core), the flat parameter buffer the model's parameters become views
of, and the gradient accumulators a stage needs. Knows nothing of collectives or optimizer maths.

Gradient buffers, all fp32 by default (`reduce_dtype`):
- `local_grads` (buffer space, full size): this rank's unreduced gradients summed over
  micro-steps. Stage 1 always has it (its shard lives inside it); stages 0/2 create it the first
  time `no_sync()` is used (the documented memory cost of accumulating without communication).
- `reduced_grads`: the averaged gradients the optimizer reads. Stage 0: full size (buffer space).
  Stages 1/2: this rank's shard only (shard space).

[Note: stage 1 shard in place] At stage 1 `reduced_grads` is the last shard_numel elements of
`local_grads`, not a buffer of its own. Buckets are reduced during backward, last bucket first
(the order gradients arrive in, and the reducer keeps that launch order for these groups), and
finished in that order: bucket b's shard slice starts at (buffer size - shard size + the slices
of buckets before b), which is at or past bucket b's own start (the slices before b sum to at
most 1/N of the buckets before b), so it only ever lands on buckets already reduced and zeroed
(bucket b's own region: it is zeroed when its collective is done, then the slice is written).
Stage 1 then holds one full gradient buffer, as ZeRO's formula counts, not one plus a shard.
A second synchronised backward before the step moves the reduced shard aside (`carried`) and
reduces its own gradients at the step; once the step's gradients have been read (clipped, or
seen through p.grad), no gradient may be added to local_grads (see `shard_in_local`).

[Note: stage 3 parameters] At stage 3 the rank's slice of the parameters lives in `shard_param`
(shard space, the parameters' dtype) and `flat_param` holds data only while its unit is gathered.
Freeing resizes its storage to zero bytes (views autograd saved in forward stay valid objects
and see the data again once it is gathered back into the same storage) and turns every
parameter into a ShardedParameter (sharded_tensor.py) over its pieces of `shard_param`: its
shape is the whole parameter's, its data this rank's elements, so what a script does to it
between steps (clamp_, an EMA's lerp_, an init, a norm) acts on the shard, and anything that
needs the whole tensor raises. A parameter's pieces are contiguous in shard space (consecutive
bucket slices of one rank), so its local values are one view. Gathering points it back at its
view of the full buffer. Frozen parameters (`frozen=True`) are partitioned the same way and
gathered with their unit, but have no gradient buffers and take no part in reductions.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import _core
from ..sharded_params import sharded_init
from ..sharded_params.sharded_tensor import Shard, ShardSpec, raw, shard_parameter, unmake_sharded
from ..comm.simulated_async import poison

ALIGN_BYTES = 128  # every parameter starts on a 128-byte boundary (vector loads, NCCL)
# A last bucket smaller than this share of bucket_elems is not a bucket of its own: the group
# is cut into one bucket fewer, of equal size (at most 1 + SLIVER of the bucket asked for).
SLIVER = 0.25


def flat_layout(numels: Sequence[int], world_size: int, align_elems: int,
                bucket_elems: int) -> "_core.Layout":
    """The core Layout of a group's parameters, with buckets of bucket_elems, except that a
    last bucket under SLIVER of that joins the others (their size grows to share it). A sliver
    costs a whole collective (on gloo a few system calls and thread hand-offs on every rank)
    for almost no data, and at stage 3 each unit's group has its own: gpt-17m's blocks, 2.05
    buckets each at the automatic size, were gathered in 3 collectives where 2 do."""
    layout = _core.Layout(list(numels), world_size, align_elems, bucket_elems)
    buckets = layout.num_buckets
    if buckets > 1:
        last = layout.bucket_ranges[-1]
        if last.end - last.start < SLIVER * layout.bucket_elems:
            fewer = -(-layout.buffer_numel // (buckets - 1))
            layout = _core.Layout(list(numels), world_size, align_elems, fewer)
    return layout


class FlatGroup:
    def __init__(self, params: Sequence[torch.Tensor], names: Sequence[str], group_index: int,
                 *, rank: int, world_size: int, stage: int, bucket_elems: int,
                 reduce_dtype: torch.dtype, host_zeros=None, frozen: bool = False,
                 process_group=None) -> None:
        self.params: List[torch.Tensor] = list(params)
        self.names: List[str] = list(names)
        self.group_index = group_index
        self.rank, self.world_size, self.stage = rank, world_size, stage
        first = self.params[0]
        self.dtype, self.device = first.dtype, first.device
        self.reduce_dtype = reduce_dtype
        self.frozen = frozen  # stage 3: partitioned and gathered, never reduced or updated
        self.process_group = process_group
        # Stage 3: the fp32 master of this group's shard, where one is kept apart from
        # shard_param (set by the optimizer; a sharded parameter's in-place edits reach it).
        self.master_source = lambda: None
        self.owner = None  # a weakref to the owning optimizer (zeroshard.full_params finds it)
        self.shards: List[Shard] = []
        align_elems = max(1, ALIGN_BYTES // first.element_size())
        # Whole shapes: a parameter built under sharded_init is an empty placeholder until here.
        self.shapes = [sharded_init.whole_shape(p) for p in self.params]
        # Stage 0 uses the same layout (buckets) but treats the whole buffer as its shard.
        self.layout = flat_layout([s.numel() for s in self.shapes], world_size, align_elems,
                                  bucket_elems)
        self.flat_param = torch.zeros(self.layout.buffer_numel, dtype=self.dtype,
                                      device=self.device)
        self.param_ranges = [(r.start, r.end) for r in self.layout.param_ranges]
        with torch.no_grad():
            for p, shape, (start, end) in zip(self.params, self.shapes, self.param_ranges):
                view = self.flat_param[start:end].view(shape)
                if sharded_init.is_sharded(p):  # adopt its slices (a collective)
                    sharded_init.gather_whole(p, out=view.reshape(-1))
                    sharded_init.release(p)
                else:
                    view.copy_(p)
                p.data = view  # the model's parameter now lives in the flat buffer
        self.bucket_ranges = [(b.start, b.end) for b in self.layout.bucket_ranges]
        # Stage 3: this rank's slice of the parameters (filled by shard_and_free(), after the
        # construction broadcast has made every rank's full buffer equal).
        self.shard_param: Optional[torch.Tensor] = None
        self.gathered = True
        self._placeholder: Optional[torch.Tensor] = None
        self.local_grads: Optional[torch.Tensor] = None
        # Buckets of local_grads that may hold nonzero values outside the reduced shard: a
        # gradient was added in and the bucket was not zeroed since (its reduction zeroes it).
        # zero_grads() clears local_grads only when one is left: at stage 1 the reduction has
        # already zeroed every bucket, so the step would otherwise clear the whole buffer again.
        self.dirty_buckets: set = set()
        # offload="cpu": the reduced shard lives in host memory, from `host_zeros(n, dtype)`
        # (HostOffload.zeros, page-locked on a GPU; see host_offload.py).
        self.offload = host_zeros is not None and not frozen
        if frozen:
            self.reduced_grads = self._zeros(0)
        elif self.offload:
            if stage == 1:
                self.local_grads = self._zeros(self.layout.buffer_numel)
            self.reduced_grads = host_zeros(self.layout.shard_numel, reduce_dtype)
        elif stage == 1:
            self.local_grads = self._zeros(self.layout.buffer_numel)
            self.reduced_grads = self.local_grads[self.layout.buffer_numel
                                                  - self.layout.shard_numel:]
            self._check_shard_in_place()
        else:
            self.reduced_grads = self._zeros(self.layout.buffer_numel if stage == 0
                                             else self.layout.shard_numel)
        # Stage 1: reduced values sit in local_grads' last shard_numel elements (see [Note:
        # stage 1 shard in place]) and are not consumed yet.
        self.shard_in_local = False
        # Stage 1: the reduced shard was read (clip_grad_norm_, p.grad) since the last step
        self.reduced_read = False
        # Stage 1: an earlier backward's reduced shard, moved aside for a second one
        self.carried: Optional[torch.Tensor] = None
        self.has_reduced = False  # reduced_grads holds sums from an earlier backward
        # Which elements of each parameter this rank's state holds, and where:
        # (param_start, param_end, state_start), in the index space of reduced_grads and of the
        # optimizer's state (the whole buffer at stage 0, the shard at stages 1/2).
        self.param_shard_pieces: List[List[tuple]] = [[] for _ in self.params]
        if stage == 0:
            for j, (start, end) in enumerate(self.param_ranges):
                if end > start:
                    self.param_shard_pieces[j].append((0, end - start, start))
        else:
            for piece in self.layout.shard_pieces(rank):
                r = piece.param_range
                if r.end > r.start:
                    self.param_shard_pieces[piece.param].append(
                        (r.start, r.end, piece.shard_range.start))

    # ---- parameters as views of the flat buffer -----------------------------------------------

    def shard_and_free(self) -> None:
        """Stage 3: keeps this rank's slices of the parameters and frees the full buffer."""
        self.shard_param = torch.empty(self.layout.shard_numel, dtype=self.dtype,
                                       device=self.device)
        for b0, b1, s0 in self.shard_slices():
            self.shard_param[s0:s0 + (b1 - b0)].copy_(self.flat_param[b0:b1])
        self.shards = self._make_shards()
        self.free()

    def _make_shards(self) -> List[Shard]:
        """Each parameter's ShardSpec (every rank's pieces, from the layout) and its local view
        of shard_param; see [Note: stage 3 parameters]."""
        rank_pieces = [[[] for _ in range(self.world_size)] for _ in self.params]
        for r in range(self.world_size):
            for piece in self.layout.shard_pieces(r):
                pr = piece.param_range
                if pr.end > pr.start:
                    rank_pieces[piece.param][r].append((pr.start, pr.end))
        shards = []
        for j, shape in enumerate(self.shapes):
            mine = self.param_shard_pieces[j]
            s0 = mine[0][2] if mine else 0
            n = sum(p1 - p0 for p0, p1, _ in mine)
            if mine and mine[-1][2] + (mine[-1][1] - mine[-1][0]) != s0 + n:
                raise AssertionError(f"{self.names[j]}: pieces not contiguous in shard space")
            spec = ShardSpec(torch.Size(shape), tuple(tuple(sorted(rp)) for rp in rank_pieces[j]),
                             self.rank, self.process_group, self.names[j])

            def master(s0=s0, n=n):
                m = self.master_source()
                return None if m is None else m[s0:s0 + n]
            shards.append(Shard(spec, self.shard_param[s0:s0 + n], master,
                                lambda: self.owner() if self.owner is not None else None))
        return shards

    @property
    def full_nbytes(self) -> int:
        return self.layout.buffer_numel * self.flat_param.element_size()

    def free(self) -> None:
        """Stage 3: drops the full parameters' memory (the views stay, sized, without data)."""
        if self.shard_param is not None and self.gathered:
            if self._placeholder is None:
                self._placeholder = torch.empty(0, dtype=self.dtype, device=self.device)
            for p, shard in zip(self.params, self.shards):
                shard_parameter(p, shard, self._placeholder)
            self.flat_param.untyped_storage().resize_(0)
            self.gathered = False

    def materialize(self) -> None:
        """Stage 3: gives the full buffer its memory back (contents undefined until gathered)."""
        if not self.gathered:
            self._check_attached_sharded()  # model.to(dtype) since: an error, not a revert
            self.flat_param.untyped_storage().resize_(self.full_nbytes)
            poison(self.flat_param)  # simulated asynchrony: a read before the gather sees NaN
            for p, shape, (start, end) in zip(self.params, self.shapes, self.param_ranges):
                unmake_sharded(p, self.flat_param[start:end].view(shape))
            self.gathered = True

    def param_values(self, buffer_start: int, buffer_end: int, shard_start: int) -> torch.Tensor:
        """The parameters of one piece of this rank's shard: a view of the flat buffer at stages
        0-2, of shard_param at stage 3."""
        if self.shard_param is not None:
            return self.shard_param[shard_start:shard_start + (buffer_end - buffer_start)]
        return self.flat_param[buffer_start:buffer_end]

    def adopt_changed_params(self, master: torch.Tensor) -> None:
        """Every element of this rank's shard whose parameter no longer equals its fp32 master
        (rounded to the parameter's dtype) gives the master the parameter's value: weights
        loaded into the model after the master was copied from it must not be reverted by the
        next update. Slice by slice: no shard-sized temporary."""
        for b0, b1, s0 in self.shard_slices():
            if b1 == b0:
                continue
            current = self.param_values(b0, b1, s0).to(master.device, torch.float32)
            kept = master.detach()[s0:s0 + (b1 - b0)]
            changed = current.to(self.dtype) != kept.to(self.dtype)
            if bool(changed.any()):
                kept[changed] = current[changed]

    def write_gathered_into_shard(self) -> None:
        """Stage 3, while gathered: copies this rank's part of the whole parameters (changed
        inside full_params(writeback=True)) into its shard."""
        for b0, b1, s0 in self.shard_slices():
            self.param_values(b0, b1, s0).copy_(self.flat_param[b0:b1])

    def load_param(self, j: int, value: torch.Tensor) -> None:
        """Sets parameter j to `value` (whole): at stage 3 only this rank's pieces are kept."""
        if self.shard_param is None:
            self.params[j].copy_(value)
            return
        flat = value.reshape(-1)
        for p0, p1, s0 in self.param_shard_pieces[j]:
            self.shard_param[s0:s0 + (p1 - p0)].copy_(flat[p0:p1])

    def is_attached(self, j: int) -> bool:
        p = self.params[j]
        start, end = self.param_ranges[j]
        if end == start:  # an empty tensor has no address to compare
            return p.dtype == self.dtype and p.device == self.device and p.numel() == 0
        return (p.data_ptr() == self.flat_param.data_ptr() + start * self.flat_param.element_size()
                and p.dtype == self.dtype and p.device == self.device)

    def reattach(self) -> int:
        """Points parameters that no longer view the flat buffer back at it, adopting their
        current values. model.to(device) after construction copies every parameter (even to
        the same device, e.g. 'cpu:0'); without this, the optimizer would update a buffer the
        model no longer reads. Returns how many were re-attached; raises, changing nothing,
        when a parameter changed device, dtype or shape (the buffers cannot follow)."""
        if self.shard_param is not None:
            self._check_attached_sharded()
            return 0
        base, elem = self.flat_param.data_ptr(), self.flat_param.element_size()
        moved = [j for j, (p, (start, end)) in enumerate(zip(self.params, self.param_ranges))
                 if (p.data_ptr() != base + start * elem if end > start
                     else not self.is_attached(j))]
        for j in moved:
            p = self.params[j]
            start, end = self.param_ranges[j]
            if p.device != self.device or p.dtype != self.dtype or p.numel() != end - start:
                raise ValueError(
                    f"{self.names[j]} is now {p.dtype} on {p.device} with shape "
                    f"{tuple(p.shape)}, but the optimizer was built when it was {self.dtype} on "
                    f"{self.device} with {end - start} elements (model.to(), .half(), .cuda() or "
                    "a resize after the optimizer was created). zeroshard keeps parameters in "
                    "flat buffers that cannot follow: move or cast the model first, then build "
                    "the optimizer.")
        with torch.no_grad():
            for j in moved:
                p = self.params[j]
                view = self.flat_param[self.param_ranges[j][0]:self.param_ranges[j][1]]
                view.copy_(p.detach().reshape(-1))
                p.data = view.view_as(p)
        return len(moved)

    def _check_attached_sharded(self) -> None:
        """Stage 3: the parameters must still be views of flat_param's storage."""
        with raw():
            self._check_attached_sharded_raw()

    def _check_attached_sharded_raw(self) -> None:
        storages = {self.flat_param.untyped_storage()._cdata}
        if self._placeholder is not None:
            storages.add(self._placeholder.untyped_storage()._cdata)
        for j, p in enumerate(self.params):
            # model.to("cpu:0") copies even an empty placeholder: still nothing lost.
            moved_placeholder = not self.gathered and p.numel() == 0
            if ((p.untyped_storage()._cdata not in storages and not moved_placeholder)
                    or p.dtype != self.dtype
                    or p.device != self.device):
                raise RuntimeError(
                    f"{self.names[j]} no longer belongs to the stage-3 optimizer's buffers "
                    "(model.to(), .half(), .cuda() or p.data = ... after the optimizer was "
                    "built). At stage 3 a parameter holds no data outside its unit's forward "
                    "and backward, so it cannot be moved or replaced: move or cast the model "
                    "before building the optimizer, and change values inside "
                    "`with opt.full_params(writeback=True):`.")

    # ---- index spaces ------------------------------------------------------------------------

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def shard_numel(self) -> int:
        """Elements of the optimizer's shard on this rank (the whole buffer at stage 0)."""
        return self.layout.buffer_numel if self.stage == 0 else self.layout.shard_numel

    def shard_slices(self):
        """(buffer_start, buffer_end, shard_start) of each piece of this rank's shard."""
        if self.stage == 0:
            return [(0, self.layout.buffer_numel, 0)]
        out = []
        for b in range(self.layout.num_buckets):
            r = self.layout.bucket_slice(b, self.rank)
            out.append((r.start, r.end, self.layout.bucket_slice_shard_offset(b)))
        return out

    def shard_as_fp32(self) -> torch.Tensor:
        """A new fp32 tensor (shard space) holding this rank's shard of the flat parameters."""
        return self.copy_shard_into(torch.empty(self.shard_numel, dtype=torch.float32,
                                                device=self.device))

    def copy_shard_into(self, out: torch.Tensor) -> torch.Tensor:
        """Copies this rank's shard of the flat parameters into `out` (shard space, any dtype
        and device) slice by slice: no shard-sized temporary on the device (offload fills
        host tensors this way). Returns out."""
        for b0, b1, s0 in self.shard_slices():
            out[s0:s0 + (b1 - b0)].copy_(self.param_values(b0, b1, s0))
        return out

    def write_shard(self, shard: torch.Tensor) -> None:
        """Copies a shard-space tensor back into this rank's slices of the flat parameters."""
        for b0, b1, s0 in self.shard_slices():
            self.param_values(b0, b1, s0).copy_(shard[s0:s0 + (b1 - b0)])

    def _check_shard_in_place(self) -> None:
        """[Note: stage 1 shard in place]'s invariant, for this layout: each bucket's slice of
        the shard lies at or past the bucket's own start in local_grads."""
        base = self.layout.buffer_numel - self.layout.shard_numel
        for b in range(self.layout.num_buckets):
            start = self.bucket_ranges[b][0]
            if base + self.layout.bucket_slice_shard_offset(b) < start:
                raise AssertionError(f"stage 1 layout: bucket {b}'s shard slice would land "
                                     "on a bucket reduced after it")

    def bucket_slice(self, bucket: int):
        r = self.layout.bucket_slice(bucket, self.rank)
        return r.start, r.end, self.layout.bucket_slice_shard_offset(bucket)

    # ---- buffers -----------------------------------------------------------------------------

    def _zeros(self, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=self.reduce_dtype, device=self.device)

    def ensure_local_grads(self) -> torch.Tensor:
        if self.local_grads is None:
            self.local_grads = self._zeros(self.layout.buffer_numel)
        return self.local_grads

    def param_grad_pieces(self, j: int) -> List[torch.Tensor]:
        """This rank's part of parameter j's reduced gradient, as views of reduced_grads."""
        return [self.reduced_grads[s0:s0 + (p1 - p0)] for p0, p1, s0 in self.param_shard_pieces[j]]

    @property
    def reduces_in_place(self) -> bool:
        """Stage 1: the reduced shard is a view of local_grads."""
        return self.local_grads is not None and self.stage == 1 and not self.offload

    def zero_grads(self) -> None:
        self.reduced_grads.zero_()
        self.has_reduced = False
        self.shard_in_local = self.reduced_read = False
        self.carried = None
        if self.local_grads is not None and self.dirty_buckets:
            self.zero_local_grads()

    def zero_local_grads(self) -> None:
        self.local_grads.zero_()
        self.dirty_buckets.clear()

    def shard_grads(self, buffer_start: int, buffer_end: int, shard_start: int) -> torch.Tensor:
        """The reduced gradient of one shard piece."""
        if self.stage == 0:
            return self.reduced_grads[buffer_start:buffer_end]
        return self.reduced_grads[shard_start:shard_start + (buffer_end - buffer_start)]

    def memory_bytes(self) -> dict:
        """Device bytes of parameters and gradients; with offload the reduced shard is on
        the host, under host_grads."""
        grads = self.reduced_grads.numel() * self.reduced_grads.element_size()
        host_grads = 0
        if self.offload:
            grads, host_grads = 0, grads
        if self.local_grads is not None:
            grads = self.local_grads.numel() * self.local_grads.element_size() + (
                0 if self.reduces_in_place else grads)
        if self.shard_param is not None:  # stage 3: the shard, plus the full buffer if gathered
            params = self.shard_param.numel() * self.shard_param.element_size() + (
                self.full_nbytes if self.gathered else 0)
        else:
            params = self.flat_param.numel() * self.flat_param.element_size()
        return {"model_params": params, "grads": grads, "host_grads": host_grads}
