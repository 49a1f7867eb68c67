"""NcclCommunicator: CUDA tensors through the core's NCCL communicator, on its own stream.

The GPU implementation of communicator.py's interface, chosen by `make_communicator()` for CUDA
tensors. The communicator is bootstrapped through the process group (the unique id travels by
`broadcast_object_list`); every collective is enqueued on a dedicated stream and returns a
`_CudaWork` whose wait() joins the caller's stream to it by an event, with no host sync; a
watchdog thread (nccl_watchdog.py) turns a collective that never finishes into
CollectiveTimeout. Bytes are counted with the same ring model as the gloo path.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from .. import _core
from .communicator import Communicator, Work, _dtype, _object_collective_device


class _CudaWork(Work):
    """Collectives launched on the communicator's stream, done when `event` is. wait() joins the
    caller's stream to it (no host wait) after asking the watchdog whether the communicator was
    aborted: a collective that never finishes surfaces as CollectiveTimeout, not a hang."""

    def __init__(self, event: torch.cuda.Event, device: torch.device,
                 check: Callable[[], None]) -> None:
        self._event = event
        self._device = device
        self._check = check

    def wait(self) -> None:
        self._check()
        # Join, don't block: the caller's stream waits for the comm stream's event.
        torch.cuda.current_stream(self._device).wait_event(self._event)

    def is_completed(self) -> bool:
        return self._event.query()

    @property
    def done_event(self):
        return self._event


class _LaunchRecord:
    """is_done for the watchdog, tracked before the launch: false until the completion event is
    recorded (a blocking NCCL call can itself wait for a missing peer while it connects). Queried
    on the watchdog's thread under the communicator's device, as every CUDA call of ours is:
    a thread's current device starts as GPU 0, and a CUDA call there would create a context on
    GPU 0 on every rank."""

    __slots__ = ("event", "device", "abandoned")

    def __init__(self, device: Optional[torch.device] = None) -> None:
        self.event: Optional[torch.cuda.Event] = None
        self.device = device
        self.abandoned = False  # the launch raised: nothing is in flight to wait for

    def is_done(self) -> bool:
        if self.abandoned:
            return True
        if self.event is None:
            return False
        if self.device is None:
            return self.event.query()
        with torch.cuda.device(self.device):
            return self.event.query()


def _on_device(device: torch.device, fn: Callable):
    """fn, called with `device` current (see _LaunchRecord)."""
    def call(*args):
        with torch.cuda.device(device):
            return fn(*args)
    return call


def _make_watchdog(comm, rank: int, timeout_s: float, device: Optional[torch.device] = None):
    """The watchdog of [Note: NCCL watchdog] (nccl_watchdog.py), or None where that module is
    missing (then collectives are unguarded after init, as before it existed)."""
    try:
        from .nccl_watchdog import Watchdog
    except ImportError:
        return None
    abort = comm.abort if device is None else _on_device(device, comm.abort)
    return Watchdog(timeout_s=timeout_s, rank=rank, abort=abort, async_error=comm.async_error)


def _cuda_device(device: torch.device) -> torch.device:
    """`device` with its index: a bare "cuda" means the current device, as torch reads it."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"NcclCommunicator needs a CUDA device, got {device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.device("cuda", index)


def _teardown_nccl(watchdog, comm_box: list, device: torch.device) -> None:
    """Close the watchdog, then finalize and destroy the communicator (bounded by its timeout;
    see NcclCommunicator.destroy in the core). Runs at close(), garbage collection or exit."""
    if watchdog is not None:
        watchdog.close()
    if not comm_box:
        return
    comm = comm_box.pop()
    try:
        _on_device(device, comm.destroy)()
    except Exception as e:  # at exit nothing can act on it; say what was left behind
        warnings.warn(f"zeroshard: NCCL communicator teardown: {e}", RuntimeWarning,
                      stacklevel=2)


class NcclCommunicator(Communicator):
    """CUDA tensors through the core's NCCL communicator on a dedicated stream.

    Collectives enqueue and return at once (a blocking NCCL communicator, called without the
    GIL; see [Note: blocking communicator] in nccl_communicator.hpp); a watchdog thread
    enforces timeout_s on each (see [Note: NCCL watchdog] in nccl_watchdog.py)."""

    def __init__(self, group: Optional[dist.ProcessGroup], device: torch.device,
                 timeout_s: float) -> None:
        super().__init__()
        from ..env import nccl_library_path

        self.group = group
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        # The parameters' device, never torch's current device: a script that does not call
        # torch.cuda.set_device still gets one GPU per rank.
        self.device = _cuda_device(device)
        _core.gpu.load_nccl(nccl_library_path())
        uid = [_core.gpu.nccl_unique_id() if self.rank == 0 else None]
        if self.world_size > 1:
            src = dist.get_global_rank(group, 0) if group is not None else 0
            dist.broadcast_object_list(uid, src=src, group=group,
                                       device=_object_collective_device(group, self.device))
        # Every CUDA/NCCL call of ours runs with self.device current (torch's device guard puts
        # the previous one back without creating a context there), so that neither NCCL's nor
        # our own save/restore of the current device touches GPU 0 on every rank.
        with torch.cuda.device(self.device):
            self._comm = _core.gpu.NcclCommunicator(uid[0], self.rank, self.world_size,
                                                    self.device.index, float(timeout_s))
            self.stream = torch.cuda.Stream(device=self.device)
        self._watchdog = _make_watchdog(self._comm, self.rank, float(timeout_s), self.device)
        self._comm_box = [self._comm]
        self._finalizer = weakref.finalize(self, _teardown_nccl, self._watchdog, self._comm_box,
                                           self.device)

    def close(self) -> None:
        """Stop the watchdog and destroy the NCCL communicator (also done at exit). Idempotent."""
        self._finalizer()

    def _check(self) -> None:
        if self._watchdog is not None:
            self._watchdog.check()

    def _launch(self, kind: str, counted: Sequence[torch.Tensor], fn,
                tensors: Sequence[torch.Tensor]) -> Work:
        """fn(stream) enqueues the collective; `tensors` are recorded on the communication stream
        (the allocator keeps them until it is done with them)."""
        self._check()
        if not self._comm_box:
            raise RuntimeError(f"{kind}: this NcclCommunicator was closed")
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # inputs were written on the caller's stream
        for t in tensors:
            t.record_stream(self.stream)  # keep the allocator from reusing them early
        record = _LaunchRecord(self.device)
        if self._watchdog is not None:
            self._watchdog.track(kind, record.is_done)
        try:
            with torch.cuda.device(self.device):
                fn(self.stream.cuda_stream)
        except BaseException:
            # A launch that raised left nothing in flight: its record must not later make the
            # watchdog abort a healthy communicator.
            record.abandoned = True
            raise
        for t in counted:
            self._count(kind, t)
        done = torch.cuda.Event()
        done.record(self.stream)
        record.event = done
        return _CudaWork(done, self.device, self._check)

    def control_all_reduce(self, tensor, op=dist.ReduceOp.SUM):
        self.stats.control_bytes += tensor.numel() * tensor.element_size()
        if self.world_size > 1:
            # torch's NCCL communicator runs this, not ours: ordered after every collective of
            # ours already queued (torch's stream waits on the caller's, which waits on ours).
            # NCCL documents that kernels of two communicators running at once can deadlock.
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def all_reduce(self, full):
        code = _dtype(full)
        return self._launch("all_reduce", [full], lambda s: self._comm.all_reduce(
            full.data_ptr(), full.data_ptr(), full.numel(), code, _core.gpu.ReduceOp.sum, s),
            [full])

    def reduce_scatter(self, part, full, scratch=None, accumulate=False):
        self._check_split(part, full, self.world_size)
        if accumulate:
            raise ValueError("NCCL reduce-scatters into a separate part; add it after the wait")
        code = _dtype(full)
        return self._launch("reduce_scatter", [full], lambda s: self._comm.reduce_scatter(
            full.data_ptr(), part.data_ptr(), part.numel(), code, _core.gpu.ReduceOp.sum, s),
            [part, full])

    def all_gather(self, full, part):
        return self.all_gather_buckets([(full, part)])

    def all_gather_buckets(self, pairs, record_outputs=True):
        pairs = list(pairs)
        for full, part in pairs:
            self._check_split(part, full, self.world_size)
        if not pairs:
            return Work()
        codes = [_dtype(full) for full, _ in pairs]

        def launch(stream: int) -> None:
            # One NCCL group: one launch for all buckets of the step instead of one per bucket.
            self._comm.group_start()
            try:
                for (full, part), code in zip(pairs, codes):
                    self._comm.all_gather(part.data_ptr(), full.data_ptr(), part.numel(), code,
                                          stream)
            finally:
                self._comm.group_end()

        recorded = [t for full, part in pairs for t in ((full, part) if record_outputs else (part,))]
        return self._launch("all_gather", [full for full, _ in pairs], launch, recorded)

    def broadcast(self, tensor, root=0):
        code = _dtype(tensor)
        return self._launch("broadcast", [tensor], lambda s: self._comm.broadcast(
            tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), code, root, s), [tensor])

    def all_to_all(self, received, sent):
        self._check_split(sent, received, 1)
        if sent.numel() % self.world_size:
            raise ValueError(f"all_to_all sends {sent.numel()} elements, not a whole number "
                             f"of parts for {self.world_size} ranks")
        code = _dtype(sent)
        work = self._launch("all_to_all", [], lambda s: self._comm.all_to_all(
            sent.data_ptr(), received.data_ptr(), sent.numel() // self.world_size, code, s),
            [received, sent])
        self._count("reduce_scatter", sent)  # as the gloo one: qgZ's hops are reduce-scatters
        return work
