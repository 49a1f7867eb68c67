"""BucketReducer: turns autograd's per-parameter gradients into reduced, averaged gradients.

Owns: the post-accumulate-grad hooks, which bucket is waiting for which parameter, the bucket
staging buffers and the collectives in flight. Knows FlatGroup's buffers and the Communicator;
knows nothing of optimizers.

Each backward, a hook copies a parameter's gradient into its bucket(s) and frees `p.grad`. When
every parameter overlapping a bucket has reported, the bucket's collective starts at once
(`overlap=True`) while backward goes on; buckets never completed (unused parameters) start at
the end of backward. `wait()` finishes them all and adds the results into `reduced_grads`.

Modes:
- "all_reduce" (stage 0): reduced_grads (full) += mean over ranks of the bucket.
- "reduce_scatter" (stage 2): reduced_grads (shard) += mean over ranks of this rank's slice.
- "reduce_scatter" with reduce_at_step=True (stage 1): backward only adds into `local_grads`;
  wait() reduce-scatters every bucket once per optimizer step.
Ranks pre-divide by world size and reduce with SUM (every backend has SUM; AVG is not universal).

Whether a backward reduces is decided once, when its first gradient arrives: not inside
`no_sync()`, and `sync_predicate()` (the optimizer's check of the model's
`require_backward_grad_sync`, DDP's switch that scripts set) must allow it.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Tuple

import torch
from torch.autograd import Variable

from .communicator import Communicator, Work
from .flat_group import FlatGroup


class _GroupState:
    """Per FlatGroup: which buckets still wait for parameters in the current backward."""

    def __init__(self, group: FlatGroup) -> None:
        layout = group.layout
        self.param_buckets: List[List[int]] = [[] for _ in group.params]
        self.expected = [0] * layout.num_buckets
        for b in range(layout.num_buckets):
            for p in layout.params_in_bucket(b):
                if group.params[p].numel() > 0:
                    self.param_buckets[p].append(b)
                    self.expected[b] += 1
        self.pending = list(self.expected)
        self.launched = [False] * layout.num_buckets
        self.staging: dict = {}  # bucket -> staging tensor for the current backward
        # Stage 0 reduces straight into reduced_grads while it holds nothing yet (no staging).
        self.direct = False

    def reset(self) -> None:
        self.pending = list(self.expected)
        self.launched = [False] * len(self.expected)


class BucketReducer:
    def __init__(self, groups: List[FlatGroup], comm: Communicator, *, mode: str,
                 overlap: bool = True, reduce_at_step: bool = False,
                 max_in_flight: int = 2) -> None:
        if mode not in ("all_reduce", "reduce_scatter"):
            raise ValueError(f"mode must be 'all_reduce' or 'reduce_scatter', got {mode!r}")
        self.comm = comm
        self.mode = mode
        self.overlap = overlap
        self.reduce_at_step = reduce_at_step
        # Buckets whose collective may be outstanding at once: bounds staging memory to a few
        # buckets (the oldest is finished before another starts), as DeepSpeed's IPG buckets do.
        self.max_in_flight = max(1, max_in_flight)
        self.in_flight: List[Tuple[Work, Callable[[], None]]] = []
        self.syncing = True
        self.round_sync = True  # the current backward reduces (decided at its first gradient)
        self.sync_predicate: Optional[Callable[[], bool]] = None
        self.callback_queued = False
        self.saw_grads = False  # some gradient arrived since the last consume()
        self.boundary_reduce_due = False  # stage 1: local grads not yet reduced
        self.staging_bytes = 0
        self.peak_staging_bytes = 0
        self.on_round_start: Optional[Callable[[], None]] = None
        self._handles = []
        self.groups, self.states = [], []
        self.add_groups(groups)

    def add_groups(self, groups: List[FlatGroup]) -> None:
        """Starts reducing the gradients of more FlatGroups (add_param_group)."""
        for group in groups:
            gi = len(self.groups)
            self.groups.append(group)
            self.states.append(_GroupState(group))
            for pi, p in enumerate(group.params):
                self._handles.append(p.register_post_accumulate_grad_hook(
                    self._make_hook(gi, pi)))

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
            Variable._execution_engine.queue_callback(self._on_backward_end)
        self.saw_grads = True
        self.boundary_reduce_due = self.boundary_reduce_due or self.reduce_at_step
        start, end = group.param_ranges[pi]
        flat = grad.detach().reshape(-1)
        accumulate_locally = (self.reduce_at_step or not self.round_sync
                              or group.local_grads is not None)
        if accumulate_locally:
            group.ensure_local_grads()[start:end].add_(flat)
        elif state.direct:
            group.reduced_grads[start:end].copy_(flat)
        else:
            for b in state.param_buckets[pi]:
                b_start, b_end = group.bucket_ranges[b]
                lo, hi = max(start, b_start), min(end, b_end)
                self._staging(gi, b)[lo - b_start:hi - b_start].copy_(flat[lo - start:hi - start])
        param.grad = None  # the bucket holds it now; keep peak memory at one gradient
        if self.round_sync and not self.reduce_at_step:
            for b in state.param_buckets[pi]:
                state.pending[b] -= 1
                if state.pending[b] == 0 and self.overlap:
                    self._launch(gi, b)

    def _staging(self, gi: int, b: int) -> torch.Tensor:
        state, group = self.states[gi], self.groups[gi]
        buf = state.staging.get(b)
        if buf is None:
            b_start, b_end = group.bucket_ranges[b]
            buf = torch.zeros(b_end - b_start, dtype=group.reduce_dtype, device=group.device)
            state.staging[b] = buf
            self.staging_bytes += buf.numel() * buf.element_size()
            self.peak_staging_bytes = max(self.peak_staging_bytes, self.staging_bytes)
        return buf

    def _on_backward_end(self) -> None:
        self.callback_queued = False
        if self.round_sync and not self.reduce_at_step:
            for gi, state in enumerate(self.states):
                for b in range(len(state.expected)):
                    if not state.launched[b]:
                        self._launch(gi, b)
        for group, state in zip(self.groups, self.states):
            if state.direct and any(state.launched):
                group.has_reduced = True
            state.direct = False
            state.reset()

    # ---- collectives -------------------------------------------------------------------------

    def _bucket_input(self, gi: int, b: int) -> Tuple[torch.Tensor, str]:
        """The tensor to reduce for bucket b and where it lives: "local" (a view of
        local_grads), "direct" (a view of reduced_grads) or "staging"."""
        group, state = self.groups[gi], self.states[gi]
        b_start, b_end = group.bucket_ranges[b]
        if group.local_grads is not None:
            return group.local_grads[b_start:b_end], "local"
        if state.direct:
            return group.reduced_grads[b_start:b_end], "direct"
        buf = state.staging.pop(b, None)
        if buf is None:  # no parameter of this bucket got a gradient this backward
            buf = torch.zeros(b_end - b_start, dtype=group.reduce_dtype, device=group.device)
        else:
            self.staging_bytes -= buf.numel() * buf.element_size()
        return buf, "staging"

    def _launch(self, gi: int, b: int) -> None:
        group, state = self.groups[gi], self.states[gi]
        state.launched[b] = True
        data, source = self._bucket_input(gi, b)
        if self.comm.world_size > 1:
            data.mul_(1.0 / self.comm.world_size)
        b_start, b_end = group.bucket_ranges[b]
        if self.mode == "all_reduce":
            work = self.comm.all_reduce(data)

            def finish() -> None:
                if source != "direct":
                    group.reduced_grads[b_start:b_end].add_(data)
                if source == "local":
                    data.zero_()
        else:
            s_start, s_end, shard_offset = group.bucket_slice(b)
            part = torch.empty(s_end - s_start, dtype=data.dtype, device=data.device)
            work = self.comm.reduce_scatter(part, data)

            def finish() -> None:
                group.reduced_grads[shard_offset:shard_offset + part.numel()].add_(part)
                if source == "local":
                    data.zero_()
        self.in_flight.append((work, finish))
        # Only staged buckets cost extra memory while in flight (stage 1 reduces views of
        # local_grads and stage 0 of reduced_grads), so only they are bounded.
        if source == "staging":
            self._retire_finished()

    def _retire_finished(self) -> None:
        """Finishes the oldest collectives that have already completed, freeing their staging
        buffers during backward. Never blocks: a blocking wait inside an autograd hook made
        gloo abort at process exit in our tests."""
        while self.in_flight and len(self.in_flight) > self.max_in_flight \
                and self.in_flight[0][0].is_completed():
            oldest, finish_oldest = self.in_flight.pop(0)
            oldest.wait()
            finish_oldest()

    def wait(self) -> None:
        """Finishes every reduction started since the last wait (and, at stage 1, starts them)."""
        if self.boundary_reduce_due:
            self.boundary_reduce_due = False
            for gi, group in enumerate(self.groups):
                for b in range(group.layout.num_buckets):
                    self._launch(gi, b)
        for work, finish in self.in_flight:
            work.wait()
            finish()
        self.in_flight = []

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
