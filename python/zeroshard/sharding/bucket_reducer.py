"""BucketReducer: turns autograd's per-parameter gradients into reduced, averaged gradients.

Owns: the post-accumulate-grad hooks, which bucket is waiting for which parameter, the
collectives in flight and the BufferRing their buffers come from. Knows FlatGroup's buffers and
the Communicator; knows nothing of optimizers.

Each backward, a hook copies a parameter's gradient into its bucket(s) and frees `p.grad`. When
every parameter overlapping a bucket has reported, the bucket's collective starts at once
(`overlap=True`) while backward goes on; buckets never completed (unused parameters) start at
the end of backward. `wait()` finishes them all and adds the results into `reduced_grads`.

Modes:
- "all_reduce" (stage 0): reduced_grads (full) += mean over ranks of the bucket.
- "reduce_scatter" (stage 2): reduced_grads (shard) += mean over ranks of this rank's slice.
- stage 1 (groups that reduce in place, flat_group.py's [Note: stage 1 shard in place]): as
  "reduce_scatter" from `local_grads`, launched last bucket first whatever order the buckets
  complete in; a second backward before the step moves the reduced shard aside (`carrying`):
  it and later ones only add into `local_grads`, and wait() reduces every bucket once.
- hybrid sharding (`reduce_over`): as "reduce_scatter" within the shard group, then each
  reduced slice all-reduced across the replicas before it is added into the shard.
Ranks pre-divide by the number of ranks averaged over and reduce with SUM (every backend has
SUM; AVG is not universal).

[Note: bounded buffers] Every collective that needs memory of its own (a staged bucket, the receive
slice of a reduce-scatter) holds one BufferRing slot from its first gradient until its wait, and on
gloo one of the ring's all-to-all receive buffers from its launch until its wait. At most
`max_in_flight` of them are outstanding: starting another first waits for the oldest (on CUDA that
wait is a stream join, not a host sync), and a bucket needing a slot when none is free waits for the
oldest too. Slots are allocated on first use and reused every step, so per-rank communication memory
is a few buckets, fixed after the first step. In-place all-reduces of views (stage 0) hold no slot
and are not bounded.

[Note: launch order] Collectives must start in the same order on every rank, and the order in
which buckets complete depends on the graph: a head used on some ranks only (or a branch one
rank takes) completes its bucket early on one rank and only at the end of backward on another.
So buckets start in one fixed order, `sequence` (last flat group's last bucket first: gradients
arrive roughly in reverse order of the parameters), as DDP reduces its buckets in order: a
complete bucket starts once every bucket before it in the sequence has; the end of backward
starts the rest, in sequence order. That guess is wrong where gradients arrive in another order
(stage 3's root unit: the head's gradient comes first, the embedding's last), and a complete
bucket waiting for its turn holds a ring slot. So, as DDP rebuilds its buckets, the end of the
first synchronised backward replaces the sequence with the order in which rank 0's buckets
completed (one small control all-reduce; every rank adopts rank 0's order).

Whether a backward reduces is decided once, when its first gradient arrives: not inside
`no_sync()`, and `sync_predicate()` (the optimizer's check of the model's
`require_backward_grad_sync`, DDP's switch that scripts set) must allow it.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd import Variable

from .buffer_ring import BufferRing, Slot
from ..comm.communicator import Communicator, Work
from .flat_group import FlatGroup
from .quantized_reduce import QuantizedReduceScatter
from ..comm.side_stream import caller_wait


class _GroupState:
    """Per FlatGroup: which buckets still wait for parameters in the current backward."""

    def __init__(self, group: FlatGroup) -> None:
        layout = group.layout
        self.param_buckets: List[List[int]] = [[] for _ in group.params]
        self.expected = [0] * layout.num_buckets
        for b in range(layout.num_buckets):
            for p in layout.params_in_bucket(b):
                if group.shapes[p].numel() > 0:  # whole shapes (stage 3 placeholders)
                    self.param_buckets[p].append(b)
                    self.expected[b] += 1
        self.pending = list(self.expected)
        self.launched = [False] * layout.num_buckets
        self.staging: dict = {}  # bucket -> (slot, staging view) for the current backward
        # Stage 0 reduces straight into reduced_grads while it holds nothing yet (no staging).
        self.direct = False

    def reset(self) -> None:
        self.pending = list(self.expected)
        self.launched = [False] * len(self.expected)


class BucketReducer:
    def __init__(self, groups: List[FlatGroup], comm: Communicator, *, mode: str,
                 overlap: bool = True,
                 max_in_flight: int = 2) -> None:
        if mode not in ("all_reduce", "reduce_scatter"):
            raise ValueError(f"mode must be 'all_reduce' or 'reduce_scatter', got {mode!r}")
        self.comm = comm
        self.mode = mode
        self.overlap = overlap
        # Collectives holding ring buffers that may be outstanding at once (see [Note: bounded
        # buffers]), as DeepSpeed bounds its IPG buckets.
        self.max_in_flight = max(1, max_in_flight)
        # (work, finish, slot or None), oldest first
        self.in_flight: List[Tuple[Work, Callable[[], None], Optional[Slot]]] = []
        self.peak_in_flight = 0  # most slot-holding collectives outstanding at once
        self.rings: dict = {}  # (dtype, device) -> BufferRing
        self.syncing = True
        self.round_sync = True  # the current backward reduces (decided at its first gradient)
        self.sync_predicate: Optional[Callable[[], bool]] = None
        self.callback_queued = False
        self.saw_grads = False  # some gradient arrived since the last consume()
        # Stage 1, a second backward since the step: local grads reduced at the step (wait())
        self.carrying = False
        self.on_round_start: Optional[Callable[[], None]] = None
        # Stage 3's units: told when a bucket's reduction starts (its unit may then be freed).
        self.on_launch: Optional[Callable[[FlatGroup], None]] = None
        # offload="cpu": reduced slices go to the host through it (see host_offload.py).
        self.offload = None
        # Called instead of blocking outright on a collective not yet complete (the optimizer
        # watches there for a rank that waits in a call this rank went past).
        self.wait_guard: Optional[Callable[[Work], None]] = None
        # Hybrid sharding (replicate_over): each reduced slice is all-reduced across the
        # replicas before it is added into the shard; averaging covers every rank.
        self.replica_comm: Optional[Communicator] = None
        self.control_comm = comm  # whose rank 0 decides the launch order
        self.average_over = comm.world_size
        # qgZ (quantized_reduce.py): each bucket's reduce-scatter through two quantized hops
        self.quantized_reduce = None
        self._handles = []
        self.groups, self.states = [], []
        # got[g][j]: parameter j of group g got a gradient on this rank (in any micro-step)
        # since the last forget_grads() (step or zero_grad): the optimizer skips, as torch.optim
        # does, a parameter that got none on any rank.
        self.got: List[List[bool]] = []
        # See [Note: launch order]: (group, bucket) in the order their collectives start, and
        # how many of them have started in the current backward.
        self.sequence: List[Tuple[int, int]] = []
        self.next_in_sequence = 0
        self.completed: List[Tuple[int, int]] = []  # this backward's buckets, as completed
        self.sequence_learned = False
        self._trim_due = False
        self.add_groups(groups)

    def add_groups(self, groups: List[FlatGroup]) -> None:
        """Starts reducing the gradients of more FlatGroups (add_param_group)."""
        for group in groups:
            gi = len(self.groups)
            self.groups.append(group)
            self.states.append(_GroupState(group))
            self.got.append([False] * len(group.params))
            for pi, p in enumerate(group.params):
                self._handles.append(p.register_post_accumulate_grad_hook(
                    self._make_hook(gi, pi)))
        self.sequence = [(gi, b) for gi in reversed(range(len(self.groups)))
                         for b in reversed(range(self.groups[gi].layout.num_buckets))]
        self.sequence_learned = False

    def reduce_over(self, groups, options) -> None:
        """The communicators of comm_groups.CommGroups. Hybrid sharding: `comm` is the shard
        group's; each bucket's reduce-scatter is followed by an all-reduce of its slice across
        the replicas, gradients are averaged over every rank, and every rank (not each shard
        group's rank 0) decides the launch order, so that replica all-reduces pair the same
        buckets. qgZ (options.quantize_grads): each reduce-scatter in two quantized hops."""
        self.replica_comm = groups.replica_comm
        self.control_comm = groups.world_comm
        self.average_over = groups.average_over
        if options.quantize_grads is not None and groups.node_comm is not None:
            self.quantized_reduce = QuantizedReduceScatter(groups.node_comm, groups.cross_comm,
                                                           bits=options.grad_bits)

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- backward ----------------------------------------------------------------------------

    def _make_hook(self, gi: int, pi: int):
        def hook(param: torch.Tensor) -> None:
            self._on_grad_ready(gi, pi, param)
        return hook

    def _on_grad_ready(self, gi: int, pi: int, param: torch.Tensor) -> None:
        group, state = self.groups[gi], self.states[gi]
        grad = param.grad
        if grad is None:
            return
        if grad.is_sparse:
            raise RuntimeError(f"{group.names[pi]} produced a sparse gradient; zeroshard reduces "
                               "dense flat buffers only (use sparse=False in nn.Embedding)")
        if not self.callback_queued:
            self.callback_queued = True
            self.round_sync = self.syncing and (self.sync_predicate is None
                                                or bool(self.sync_predicate()))
            if not self.saw_grads and self.on_round_start is not None:
                self.on_round_start()
            for g, st in zip(self.groups, self.states):
                st.direct = (self.mode == "all_reduce" and self.round_sync and not g.has_reduced
                             and g.local_grads is None)
            if any(g.local_grads is not None for g in self.groups):
                # An earlier backward's collectives may still read (stage 0: and write)
                # local_grads, which this backward's gradients are about to be added into.
                while self.in_flight:
                    self._retire_oldest()
            self._carry_reduced_shards()
            Variable._execution_engine.queue_callback(self._on_backward_end)
        self.saw_grads = True
        self.got[gi][pi] = True
        start, end = group.param_ranges[pi]
        flat = grad.detach().reshape(-1)
        accumulate_locally = (self.carrying or not self.round_sync
                              or group.local_grads is not None)
        if accumulate_locally:
            # this backward's other buckets may be reduced already: only a read shard is final
            if group.shard_in_local and group.reduced_read:
                raise RuntimeError(
                    f"a gradient of {group.names[pi]} arrived after this step's gradients were "
                    "reduced (clip_grad_norm_ or GradScaler.unscale_ reduce them at stage 1) "
                    "and before step() or zero_grad(): stage 1 keeps the reduced shard inside "
                    "its accumulation buffer. Finish the step first, or accumulate all "
                    "micro-batches before clipping, or use stage 2.")
            group.dirty_buckets.update(state.param_buckets[pi])
            group.ensure_local_grads()[start:end].add_(flat)
        elif state.direct:
            group.reduced_grads[start:end].copy_(flat)
        else:
            # Bucket by bucket, each launched as soon as it is complete: a parameter spanning
            # many buckets (an embedding) then needs a slot or two, not one per bucket. Last
            # bucket first, as the launch sequence has them.
            scale = self._prescale(group)
            for b in reversed(state.param_buckets[pi]):
                b_start, b_end = group.bucket_ranges[b]
                lo, hi = max(start, b_start), min(end, b_end)
                into = self._staging(gi, b)[lo - b_start:hi - b_start]
                if scale is None:
                    into.copy_(flat[lo - start:hi - start])
                else:  # the copy and _launch's averaging in one pass over the gradient
                    torch.mul(flat[lo - start:hi - start], scale, out=into)
                self._count_down(gi, b)
            param.grad = None
            return
        param.grad = None  # the bucket holds it now; keep peak memory at one gradient
        if self.round_sync and not self.carrying:
            for b in reversed(state.param_buckets[pi]):
                self._count_down(gi, b)

    def _carry_reduced_shards(self) -> None:
        """A backward begins. Where an earlier one since the step already reduced a stage-1
        group in place (and nobody read the result yet), that shard moves aside (`carried`,
        added back at wait()) and this and later backwards are reduced at the step:
        local_grads must hold unreduced gradients only."""
        if not any(g.reduces_in_place for g in self.groups) or self.carrying:
            return
        for group in self.groups:  # (the earlier backward's collectives are finished)
            if group.reduces_in_place and group.shard_in_local and not group.reduced_read:
                group.carried = group.reduced_grads.clone()
                group.zero_local_grads()
                group.shard_in_local = False
                self.carrying = True

    def _count_down(self, gi: int, b: int) -> None:
        state = self.states[gi]
        state.pending[b] -= 1
        if state.pending[b] == 0 and not self.sequence_learned:
            self.completed.append((gi, b))
        if state.pending[b] == 0 and self.overlap:
            self._launch_in_order(until_complete=True)

    def _launch_in_order(self, until_complete: bool) -> None:
        """Starts the buckets next in `sequence`: while they are complete (until_complete), or
        all of them (the end of backward). See [Note: launch order]."""
        while self.next_in_sequence < len(self.sequence):
            gi, b = self.sequence[self.next_in_sequence]
            state = self.states[gi]
            if until_complete and state.pending[b] > 0:
                return
            self.next_in_sequence += 1
            if not state.launched[b]:
                self._launch(gi, b)

    def _learn_sequence(self) -> None:
        """See [Note: launch order]: rank 0's completion order becomes everyone's sequence."""
        done = set(self.completed)
        order = self.completed + [x for x in self.sequence if x not in done]
        control = self.control_comm
        if control.world_size > 1:
            position = {x: i for i, x in enumerate(self.sequence)}
            ranks = torch.tensor([position[x] + 1 for x in order], dtype=torch.int32)
            if control.rank != 0:
                ranks.zero_()
            device = self.groups[0].device if self.groups else torch.device("cpu")
            ranks = control.control_all_reduce(ranks.to(device), dist.ReduceOp.MAX).cpu()
            order = [self.sequence[int(i) - 1] for i in ranks.tolist()]
        self.sequence = order
        self.sequence_learned = True
        self._trim_due = True  # once this backward's collectives are done, see wait()

    def _prescale(self, group: FlatGroup) -> Optional[float]:
        """The averaging factor a gradient is multiplied by as it is copied into its staging
        slot, or None: nothing to average, or a gradient of another dtype than the reduction's
        (it is cast first and averaged in the reduction's dtype at _launch)."""
        if self.average_over == 1 or group.dtype != group.reduce_dtype:
            return None
        return 1.0 / self.average_over

    def _staging(self, gi: int, b: int) -> torch.Tensor:
        state, group = self.states[gi], self.groups[gi]
        entry = state.staging.get(b)
        if entry is None:
            b_start, b_end = group.bucket_ranges[b]
            slot = self._acquire_slot(group)
            entry = (slot, slot.view("staging", b_end - b_start, zero=True))
            state.staging[b] = entry
        return entry[1]

    # ---- ring buffers ------------------------------------------------------------------------

    def _ring(self, group: FlatGroup) -> BufferRing:
        key = (group.reduce_dtype, group.device)
        ring = self.rings.get(key)
        if ring is None:
            ring = self.rings[key] = BufferRing(group.reduce_dtype, group.device)
        # Sized for the largest bucket of any group up front: a later, larger bucket would
        # reallocate (stage 3 has many groups; their first slots would differ in size).
        largest = max((e - s for g in self.groups for s, e in g.bucket_ranges), default=0)
        ring.reserve("staging", largest)
        ring.reserve("recv", largest)
        ring.reserve("part", -(-largest // max(1, self.comm.world_size)))
        return ring

    def _acquire_slot(self, group: FlatGroup) -> Slot:
        """A free slot. While none is free and collectives hold slots, the oldest is waited for
        first once the ring has max_in_flight + 1 slots (one bucket filling while max_in_flight
        are reduced). A new slot otherwise: the ring grows past that, once, only when more
        buckets than that fill at the same time (gradients arriving out of the launch order)."""
        ring = self._ring(group)
        slot = ring.acquire_free()
        while slot is None and self._slots_in_flight() > 0 and (
                len(ring.slots) > self.max_in_flight):
            self._retire_oldest()
            slot = ring.acquire_free()
        if slot is None:
            return ring.new_slot()
        if slot.fence is not None:  # an offload copy may still read it: writes wait for it
            caller_wait(slot.fence, group.device)
            slot.fence = None
        slot.poison()  # simulated asynchrony: a collective or copy still reading it reads NaN
        return slot

    def _slots_in_flight(self) -> int:
        return sum(entry[2] is not None for entry in self.in_flight)

    def _track(self, work: Work, finish: Callable[[], None], slot: Optional[Slot]) -> None:
        self.in_flight.append((work, finish, slot))
        self.peak_in_flight = max(self.peak_in_flight, self._slots_in_flight())

    def _bound_in_flight(self) -> None:
        while self._slots_in_flight() >= self.max_in_flight:
            self._retire_oldest()

    def _retire_oldest(self) -> None:
        work, finish, slot = self.in_flight.pop(0)
        if self.wait_guard is not None and not work.is_completed():
            self.wait_guard(work)
        work.wait()
        if slot is not None and slot.scratch is not None:  # the exchange is over
            slot.ring.release_scratch(slot.scratch)
            slot.scratch = None
        then = finish()
        if isinstance(then, tuple):  # a second collective on the same buffers (replica all-reduce)
            self.in_flight.append((then[0], then[1], slot))
            return
        if slot is not None:
            slot.ring.release(slot)

    @property
    def comm_buffer_bytes(self) -> int:
        """Bytes held by the ring buffers (allocated once, kept)."""
        return sum(ring.nbytes() for ring in self.rings.values())

    def _on_backward_end(self) -> None:
        self.callback_queued = False
        if self.round_sync and not self.carrying:
            self._launch_in_order(until_complete=False)
            # In-place groups keep the last-bucket-first order ([Note: stage 1 shard in place])
            if not self.sequence_learned and not any(g.reduces_in_place for g in self.groups):
                self._learn_sequence()
        self.completed = []
        self.next_in_sequence = 0
        for group, state in zip(self.groups, self.states):
            if state.direct and any(state.launched):
                group.has_reduced = True
            state.direct = False
            state.reset()

    # ---- collectives -------------------------------------------------------------------------

    def _bucket_input(self, gi: int, b: int) -> Tuple[torch.Tensor, str, Optional[Slot]]:
        """The tensor to reduce for bucket b, where it lives ("local": a view of local_grads,
        "direct": a view of reduced_grads, or "staging") and the ring slot it holds."""
        group, state = self.groups[gi], self.states[gi]
        b_start, b_end = group.bucket_ranges[b]
        if group.local_grads is not None:
            return group.local_grads[b_start:b_end], "local", None
        if state.direct:
            return group.reduced_grads[b_start:b_end], "direct", None
        entry = state.staging.pop(b, None)
        if entry is None:  # no parameter of this bucket got a gradient this backward
            slot = self._acquire_slot(group)
            return slot.view("staging", b_end - b_start, zero=True), "staging", slot
        return entry[1], "staging", entry[0]

    def _launch(self, gi: int, b: int) -> None:
        group, state = self.groups[gi], self.states[gi]
        state.launched[b] = True
        data, source, slot = self._bucket_input(gi, b)
        averaged_in_copy = source == "staging" and self._prescale(group) is not None
        if self.average_over > 1 and not averaged_in_copy:
            data.mul_(1.0 / self.average_over)
        b_start, b_end = group.bucket_ranges[b]
        # gloo sums its all-to-all's parts straight into the shard (no part buffer), except
        # where the shard lives inside the input buffer (stage 1): there the bucket is zeroed
        # once its collective is done, and then the slice is written.
        in_place = source == "local" and group.reduces_in_place
        into_shard = (self.mode == "reduce_scatter" and self.comm.reduce_scatter_needs_scratch
                      and not in_place and self.offload is None and self.replica_comm is None
                      and self.quantized_reduce is None)
        if self.mode == "reduce_scatter" and slot is None:
            self._bound_in_flight()  # first: the slot the oldest frees is the one to take
            slot = self._acquire_slot(group)
        elif slot is not None:  # see [Note: bounded buffers]
            self._bound_in_flight()
        if self.mode == "all_reduce":
            work = self.comm.all_reduce(data)

            def finish() -> None:
                if source != "direct":
                    group.reduced_grads[b_start:b_end].add_(data)
                if source == "local":
                    data.zero_()
                    group.dirty_buckets.discard(b)
        else:
            s_start, s_end, shard_offset = group.bucket_slice(b)
            shard = group.reduced_grads[shard_offset:shard_offset + (s_end - s_start)]
            scratch = None
            if self.comm.reduce_scatter_needs_scratch and self.quantized_reduce is None:
                slot.scratch = slot.ring.acquire_scratch(data.numel())  # released at its wait
                scratch = slot.scratch[:data.numel()]
            if self.quantized_reduce is not None:
                part = slot.view("part", s_end - s_start)
                work = self.quantized_reduce.reduce_scatter(part, data)
            elif into_shard:
                work = self.comm.reduce_scatter(shard, data, accumulate=True, scratch=scratch)
            else:
                part = slot.view("part", s_end - s_start)
                work = self.comm.reduce_scatter(part, data, scratch=scratch)

            def add_into_shard(written_by: Work) -> None:
                if self.offload is not None:  # to the host shard, while backward goes on
                    fence = self.offload.land(group, b, shard, part, after=written_by.done_event)
                    if fence is not None:
                        slot.fence = fence
                elif not into_shard:
                    shard.add_(part)

            def finish():
                if source == "local":
                    data.zero_()
                    group.dirty_buckets.discard(b)
                if in_place:
                    group.shard_in_local = True
                if self.replica_comm is not None:  # hybrid: then across the replicas
                    across = self.replica_comm.all_reduce(part)
                    return across, lambda: add_into_shard(across)
                add_into_shard(work)
        self._track(work, finish, slot)
        if self.on_launch is not None:
            self.on_launch(group)

    def wait(self) -> None:
        """Finishes every reduction started since the last wait (and, after a carried shard,
        starts them: last bucket first, as in backward)."""
        if self.carrying:
            for gi, b in self.sequence:
                self._launch(gi, b)
            for state in self.states:  # the next backward launches its buckets afresh
                state.reset()
        while self.in_flight:
            self._retire_oldest()
        self.carrying = False
        for group in self.groups:
            if group.carried is not None:
                group.reduced_grads.add_(group.carried)
                group.carried = None
            if group.shard_in_local:
                group.reduced_read = True  # read now: no later gradient may join it
        if self._trim_due:  # the ring grew while the launch order was a guess
            self._trim_due = False
            if self.offload is not None:  # a trimmed slot's memory may still be copied from
                self.offload.finish_landing()
            for ring in self.rings.values():
                ring.trim(self.max_in_flight + 1)

    def all_gather_shards(self) -> None:
        """After a stage 1/2 update: every rank's updated slice of every bucket gathered into
        the flat parameters, in place (this rank's slice of a bucket is where the update wrote
        it). Where the backend gathers in place (NCCL, world size 1) all buckets go in one
        grouped call; on gloo each bucket is gathered by broadcasts (all_gather_in_place), all
        started, then waited. A gloo group spanning nodes gathers by gloo's ring instead,
        which copies the slice: at most max_in_flight of those at once. (Starting each
        bucket's gather as soon as the update had written its slice was measured too: on 2
        cores it was 4-7 ms a step slower, the broadcasts competing with the update.)"""
        if not self.comm.all_gather_needs_private_input:
            pairs = []
            for group in self.groups:
                for b, (b_start, b_end) in enumerate(group.bucket_ranges):
                    s_start, s_end, _ = group.bucket_slice(b)
                    pairs.append((group.flat_param[b_start:b_end],
                                  group.flat_param[s_start:s_end]))
            self.comm.all_gather_buckets(pairs).wait()
            return
        for group in self.groups:
            for b, (b_start, b_end) in enumerate(group.bucket_ranges):
                s_start, s_end, _ = group.bucket_slice(b)
                if s_start - b_start != self.comm.rank * (s_end - s_start):  # the layout's rule
                    raise AssertionError(f"bucket {b}: this rank's slice is not slice "
                                         f"{self.comm.rank} of the bucket")
                while self.comm.all_gather_in_place_copies and (
                        len(self.in_flight) >= self.max_in_flight):
                    self._retire_oldest()  # each holds a copy of its slice until done
                self._track(self.comm.all_gather_in_place(group.flat_param[b_start:b_end]),
                            lambda: None, None)
        while self.in_flight:
            self._retire_oldest()

    def forget_grads(self) -> None:
        """A step or zero_grad() consumed the gradients: no parameter has one any more."""
        for flags in self.got:
            flags[:] = [False] * len(flags)

    def consume(self) -> bool:
        """Marks the reduced gradients as used (by a step); returns whether there were any."""
        had = self.saw_grads
        self.saw_grads = False
        return had

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally with no communication inside this context."""
        previous = self.syncing
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = previous
