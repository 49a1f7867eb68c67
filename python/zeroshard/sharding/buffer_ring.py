"""BufferRing: the communication buffers of gradient reduction, allocated once and reused.

Owns a small set of slots; each slot holds the buffers one bucket's collective needs while it is
being filled and while it is in flight: the bucket's staging copy of its gradients (stage 0
accumulating, stage 2) and the receive buffer of this rank's reduced slice. On gloo the
full-size receive buffer of the all-to-all that stands in for reduce-scatter is only needed
while the collective is in flight, so those are pooled apart (`acquire_scratch`): one per
collective in flight, not one per slot. Every buffer is allocated the first time a bucket
needs it, at the size of the largest bucket, and kept: after the first step a training loop
allocates no communication memory, so neither glibc's heap (CPU) nor torch's caching allocator
(GPU) fragments under per-step allocations.

Knows nothing of buckets or collectives: BucketReducer acquires a slot when a bucket gets its
first gradient and releases it when the bucket's collective has been waited (on CUDA a wait
joins the caller's stream to the collective's event, so the next write into a reused slot is
stream-ordered after the collective without a host sync).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from ..comm.simulated_async import poison


class Slot:
    """Named buffers of one in-flight bucket; views of persistent tensors."""

    def __init__(self, ring: "BufferRing") -> None:
        self.ring = ring
        self._tensors: Dict[str, torch.Tensor] = {}
        # The event after which the slot may be written again (an offload D2H copy still
        # reading it when the slot was released), or None.
        self.fence = None
        # The ring's receive buffer this slot's collective holds while in flight (gloo's
        # all-to-all), or None: see BufferRing.acquire_scratch.
        self.scratch = None

    def view(self, name: str, numel: int, *, zero: bool = False) -> torch.Tensor:
        """The first `numel` elements of this slot's buffer `name` (grown if too small)."""
        t = self._tensors.get(name)
        if t is None or t.numel() < numel:
            t = self.ring._allocate(max(numel, self.ring.capacity(name)))
            self._tensors[name] = t
        out = t[:numel]
        if zero:
            out.zero_()
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def poison(self) -> None:
        """Handed out again: with simulated asynchrony, its old contents become NaN (see [Note:
        simulated asynchrony]); otherwise nothing."""
        for t in self._tensors.values():
            poison(t)


class BufferRing:
    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self._free: List[Slot] = []
        self.slots: List[Slot] = []
        self.allocations = 0  # tensors ever allocated; constant once training is in its rhythm
        self._capacity: Dict[str, int] = {}
        self.scratch: List[torch.Tensor] = []  # receive buffers, see acquire_scratch
        self._free_scratch: List[torch.Tensor] = []

    def capacity(self, name: str) -> int:
        return self._capacity.get(name, 0)

    def reserve(self, name: str, numel: int) -> None:
        """Buffers called `name` will be at least `numel` elements (the largest bucket), so a
        later, larger bucket does not reallocate every slot."""
        self._capacity[name] = max(self.capacity(name), numel)

    def _allocate(self, numel: int) -> torch.Tensor:
        self.allocations += 1
        return torch.empty(numel, dtype=self.dtype, device=self.device)

    def acquire_free(self):
        """A free slot, or None when every slot is in use."""
        return self._free.pop() if self._free else None

    def new_slot(self) -> Slot:
        slot = Slot(self)
        self.slots.append(slot)
        return slot

    def release(self, slot: Slot) -> None:
        self._free.append(slot)

    def acquire_scratch(self, numel: int) -> torch.Tensor:
        """A full-bucket receive buffer (gloo's all-to-all) of at least `numel` elements, held
        from a collective's launch to its wait. Only collectives in flight need one, at most
        max_in_flight, while the ring has one slot more (a bucket filling): so these are
        pooled apart from the slots, not one per slot."""
        while self._free_scratch:
            t = self._free_scratch.pop()
            if t.numel() >= numel:
                poison(t)  # simulated asynchrony: a late reader of its last use sees NaN
                return t
            self.scratch.remove(t)  # too small for the buckets now planned
        t = self._allocate(max(numel, self.capacity("recv")))
        self.scratch.append(t)
        return t

    def release_scratch(self, t: torch.Tensor) -> None:
        self._free_scratch.append(t)

    def trim(self, keep: int) -> None:
        """Drops free slots beyond the first `keep` (their memory goes back to the allocator):
        a ring that grew while the launch order was still a guess settles at its plan."""
        while len(self.slots) > keep and self._free:
            slot = self._free.pop()
            self.slots.remove(slot)

    def nbytes(self) -> int:
        return (sum(slot.nbytes() for slot in self.slots)
                + sum(t.numel() * t.element_size() for t in self.scratch))


DEFAULT_BUCKET_MB = 25.0  # DDP's default bucket size
# A bucket smaller than this pays a collective's fixed cost next to few bytes (see auto_bucket_mb).
SMALL_BUCKET_MB = 4.0


def auto_bucket_mb(total_numel: int, elem_size: int, unit_numel: int = 0) -> float:
    """bucket_mb=None: DDP's 25 MiB, but at most 1/32 of the model's gradient bytes, so that the
    ring (about five buckets: three slots of staging, two receive buffers on gloo) stays near a
    fifth of the gradients instead of eating what ZeRO saves; except that a small model's bucket
    may grow to 1/16 of its gradients while it stays under SMALL_BUCKET_MB, since there every
    collective's fixed cost (on gloo, system calls and thread hand-offs on each rank; at stage 3
    each unit gathered bucket by bucket, twice a step) is large next to its bytes. At least
    1/4 MiB. gpt-17m (53 MiB of gradients): 3.3 MiB, where 1/32 made its 2-rank step on 2 cores
    1.5-2% slower at stages 1-2 and 3-5% at stage 3, for 10 MiB less ring (docs/measured.md);
    from 128 MiB of gradients on, 1/32 as before.

    Stage 3 passes unit_numel, its largest unit's trainable elements (largest_unit_numel): a
    bucket is then at least that unit (up to 25 MiB), so each unit is gathered, twice a step,
    and reduced with one collective per FlatGroup, as FSDP does a unit; gpt-17m (blocks of
    6.8 MiB): 15 ms off a 2-rank stage 3 step of ~900 ms on 2 cores, in two same-job A/Bs
    (docs/measured.md). It changes only models whose units exceed 1/32 of them."""
    grads_mb = total_numel * elem_size / 2 ** 20
    mb = max(grads_mb / 32, min(SMALL_BUCKET_MB, grads_mb / 16), unit_numel * elem_size / 2 ** 20)
    return max(0.25, min(DEFAULT_BUCKET_MB, mb))


def largest_unit_numel(numels: Sequence[int], units: Sequence[int]) -> int:
    """The most trainable elements of one non-root stage-3 unit; numels[i] belongs to unit
    units[i] (0 = the root)."""
    per_unit: dict = {}
    for n, u in zip(numels, units):
        if u:
            per_unit[u] = per_unit.get(u, 0) + n
    return max(per_unit.values(), default=0)


def planned_ring_bytes(bucket_numels: Sequence[int], *, stage: int, world_size: int,
                       elem_size: int, max_in_flight: int = 2, gloo: bool = True,
                       offload: bool = False) -> int:
    """The bytes BufferRing settles at for one optimizer whose buckets have `bucket_numels`
    elements (reduce dtype of `elem_size` bytes), in a loop of one backward per step (the
    estimator's number; memory_report() gives the real one).

    Stage 0 reduces straight into its full gradient buffer (no ring). Stage 1 reduces each bucket of
    its local gradients once per step, up to max_in_flight at once, into a receive slice (1/N of a
    bucket; gloo's all-to-all also needs a full-bucket receive buffer, one per collective in
    flight). Stage 2 stages each bucket's gradients while backward fills it, so one more slot is
    being filled while max_in_flight are in flight; gloo sums its all-to-all's parts straight into
    the gradient shard, NCCL receives a slice. The all-gather of updated parameters needs no slot:
    it gathers in place (gloo by broadcasts; across nodes gloo's ring gathers a transient copy of
    each slice, max_in_flight at a time, not counted here). With offload every reduction receives
    its slice into the slot (the D2H copy reads it there), gloo too.
    """
    if stage == 0 or not bucket_numels:
        return 0
    largest = max(bucket_numels)
    gloo = gloo and world_size > 1
    part = -(-largest // world_size)  # this rank's reduced slice
    receive = largest if gloo else 0  # all-to-all receive buffer
    in_flight = min(len(bucket_numels), max_in_flight)  # each holds a receive buffer
    if stage == 1:  # the slice is received apart: the shard lives inside the input buffer
        per_slot, slots = part, in_flight
    else:  # staging, and gloo sums straight into the shard
        per_slot = largest + (part if offload or not gloo else 0)
        slots = min(len(bucket_numels), max_in_flight + 1)
    return (slots * per_slot + in_flight * receive) * elem_size
