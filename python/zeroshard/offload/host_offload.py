"""HostOffload: ZeRO-Offload's host side. With offload="cpu" this rank's optimizer shard (fp32
master, moments, reduced gradients) lives in host memory and the update runs on the CPU kernels.

Owns: the host buffers (pinned when the model is on a GPU, so copies are asynchronous DMA), the
device-to-host (D2H) and host-to-device (H2D) copy streams, the landing worker (one thread that
finishes each gradient bucket on the host while backward goes on), the per-bucket partial
gradient norms it computes, and the D2H/H2D byte counters. Knows FlatGroup's index spaces;
knows nothing of collectives or optimizer maths.

[Note: offload pipeline]
1. Backward: when a bucket's reduce-scatter is done, its reduced slice (a ring slot on the
   device, in the reduce dtype) is copied D2H on the D2H stream, in the landing dtype
   (`offload_grad_dtype`: by default bf16 for bf16 parameters, half the bytes of an fp32
   reduction, else the reduce dtype; cast on the D2H stream): straight into the pinned host
   gradient shard when it is the slice's first gradient since the last step and needs no cast
   on the host, else into one of two pinned landing buffers, upcast into the shard there. The
   ring slot records an event and is not written again before that copy is done (BufferRing's
   fence). The landing worker waits for the copy, copies or adds a landing buffer into the
   shard where one was used, and computes the slice's sum of squares and non-finite flag,
   while the device goes on with backward.
2. step() (or clip_grad_norm_): the landing worker is joined; the global norm and the fp16
   overflow check read the partial results (one small all-reduce). Only now is the update known
   (clip coefficient, skipped or not), so only now does it start.
3. Update: piece by piece on the CPU kernels (the core's thread pool, ZEROSHARD_NUM_THREADS),
   each writing the updated parameters in the model's dtype into one of two pinned staging
   buffers (a bucket slice each), whose H2D copy is queued at once on the H2D stream: piece
   k's copy overlaps piece k+1's update, and piece k+2 waits for piece k's copy before it
   writes that buffer again. fp32 parameters are copied from the fp32 host copy the kernel
   updated. The compute
   stream then waits for the H2D stream (stages 1/2 all-gather next; stage 3 gathers later).
On CPU tensors (tests, CPU training) the same buffers, copies and ordering are used; the copies
are synchronous, or late with ZEROSHARD_SIMULATE_ASYNC=1 (SideStream), so that tests see a
missing wait.

[Note: offload is exact] The update starts only once the clip coefficient and the overflow
decision are known, so offload computes what the same stage computes without it: the same CPU
kernels on the same values (bitwise on CPU; on a GPU the CPU kernel stands in for the CUDA one,
whose fp32 results may differ in the last bit), given the same gradients: a bf16 landing of an
fp32 reduction rounds each gradient to bf16 once on its way (offload_grad_dtype=torch.float32
keeps them whole). The gradient norm's partial sums are the same
per-bucket sums in the same order as without offload. What overlaps backward is the gradient's
way to the host and its norm; what overlaps the update is the parameters' way back. A one-step
delayed update (DeepSpeed's DPU) would overlap more and change the maths; it is not offered.
"""
from __future__ import annotations

import bisect
import mmap
import os
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import torch

from .. import _core, ops
from ..sharding.flat_group import FlatGroup
from ..comm.side_stream import SideStream, host_wait, is_done
from ..comm.simulated_async import poison

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _unregister_all(registered: List[Tuple[int, torch.Tensor]],
                    device: Optional[torch.device] = None) -> None:
    if registered and device is not None:
        try:  # a D2H or H2D copy may still be in flight into these pages: let it land first
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - at interpreter exit the CUDA context may be gone
            pass
    for address, _ in registered:
        try:
            _core.gpu.host_unregister(address)
        except Exception:  # noqa: BLE001 - at interpreter exit the CUDA context may be gone
            pass
    registered.clear()


def host_pages(nbytes: int) -> torch.Tensor:
    """uint8 host memory of its own, nbytes rounded up to whole pages, starting on a page (an
    anonymous mmap). The tensor starts where its storage starts, so torch's is_pinned() (which
    asks about the storage's address) sees the registration, and no other tensor shares a page
    of it (a second registration of a page would fail)."""
    span = max(1, -(-nbytes // PAGE_BYTES)) * PAGE_BYTES
    region = torch.frombuffer(mmap.mmap(-1, span), dtype=torch.uint8)  # keeps the mmap alive
    return region


def landing_dtype(param_dtype: torch.dtype, reduce_dtype: torch.dtype,
                  offload_grad_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """The dtype reduced gradients cross to the host in: offload_grad_dtype, else bf16 for bf16
    parameters (their gradients were bf16 before the reduction) and the reduce dtype otherwise
    (fp16 would overflow where a scaled fp32 gradient does not)."""
    if offload_grad_dtype is not None:
        return offload_grad_dtype
    return torch.bfloat16 if param_dtype == torch.bfloat16 else reduce_dtype


class HostOffload:
    def __init__(self, device: torch.device, grad_dtype: Optional[torch.dtype] = None) -> None:
        self.device = device
        self.grad_dtype = grad_dtype  # offload_grad_dtype; None: landing_dtype()'s default
        self._landing_dtype: Dict[int, torch.dtype] = {}  # id(fg) -> its gradients' landing dtype
        self.cuda = device.type == "cuda"
        self.d2h_bytes = self.h2d_bytes = 0
        self.d2h_copies = self.h2d_copies = 0
        # The worker waits on this device's events: it must make this device current, or its
        # first CUDA call opens a context on cuda:0 (every rank's, ~0.5 GiB each there).
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zeroshard-landing",
                                          initializer=self._bind_worker)
        self._landing: List[Future] = []
        # (dtype) -> two pinned landing buffers and the future last using each
        self._buffers: Dict[torch.dtype, List[torch.Tensor]] = {}
        self._buffer_use: Dict[Tuple[torch.dtype, int], Future] = {}
        self._next_buffer: Dict[torch.dtype, int] = {}
        self._landed: set = set()  # (id(fg), bucket) whose slice holds this step's gradient
        # (id(fg), bucket) -> (sum of squares as a 0-dim fp32 tensor, non-finite), or None
        # when the slice was accumulated from several backwards (then recomputed).
        self.partials: Dict[Tuple[int, int], Optional[Tuple[torch.Tensor, bool]]] = {}
        # Take each slice's norm as it lands only when this step will read norms (a clip in the
        # previous step, or fp16's overflow check): otherwise the landing pass would re-read
        # every gradient byte for nothing. A norm read anyway is taken at step time, the same
        # kernel on the same slices: exact either way. The optimizer sets it after each step.
        self.partials_wanted = True
        self.partials_taken = 0  # slices whose norm was taken at landing (tests read it)
        self.fp32_params: Dict[int, torch.Tensor] = {}  # id(fg) -> host copy of fp32 params
        # dtype -> two staging buffers for low-precision parameters on their way up, each
        # with the event of its last H2D copy (None: free); sized by add_group
        self.staging: Dict[torch.dtype, List[torch.Tensor]] = {}
        self._staging_done: Dict[Tuple[torch.dtype, int], object] = {}
        self._staging_next: Dict[torch.dtype, int] = {}
        self._staging_numel: Dict[torch.dtype, int] = {}
        self._staging_last: Tuple[torch.dtype, int] = (torch.float32, 0)  # the buffer in use
        self._slices: Dict[int, Tuple[List[int], List[Tuple[int, int, int]]]] = {}
        self._uploads_done = None  # the event of the last step's uploads
        # (address, backing tensor) of every page-locked range, unlocked when this goes away
        self._registered: List[Tuple[int, torch.Tensor]] = []
        weakref.finalize(self, _unregister_all, self._registered,
                         device if self.cuda else None)
        # time.perf_counter() when this step's first gradient slice had landed on the host
        # (the GPU test compares it with the end of backward on the device: the overlap).
        self.first_landed_at: Optional[float] = None
        # Kernel runs that started while the previous run's H2D copy was still in flight (the
        # GPU test's evidence that the update and the copies overlap), and that copy's event.
        self.uploads_overlapped = 0
        self._last_upload = None
        self.d2h_stream = SideStream(device, "d2h")
        self.h2d_stream = SideStream(device, "h2d")

    def _bind_worker(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)

    # ---- host memory -------------------------------------------------------------------------

    def empty(self, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A host tensor, page-locked by the core when the model is on a GPU. Not torch's
        pin_memory: its allocator rounds each block up to a power of two (a 6.3 GB master
        would take 8 GB); this pins exactly the pages of memory of its own (host_pages)."""
        if not self.cuda or n == 0:
            return torch.empty(n, dtype=dtype)
        nbytes = n * torch.tensor([], dtype=dtype).element_size()
        region = host_pages(nbytes)
        _core.gpu.host_register(region.data_ptr(), region.numel())
        self._registered.append((region.data_ptr(), region))
        return region[:nbytes].view(dtype)

    def zeros(self, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.empty(n, dtype).zero_()

    def shard_fp32(self, fg: FlatGroup) -> torch.Tensor:
        """A host fp32 copy of fg's parameter shard, filled slice by slice (a model that only
        just fits its device has no room for a shard-sized fp32 temporary there)."""
        return fg.copy_shard_into(self.empty(fg.shard_numel))

    def add_group(self, fg: FlatGroup) -> None:
        """Host buffers of one FlatGroup: for fp32 parameters an fp32 copy of the shard (the
        kernel updates it, then it is copied to the device); for bf16/fp16 the two staging
        buffers of its dtype, grown to its largest bucket slice (every rank's slice of a bucket
        is the bucket over the world size, so every rank holds the same bytes)."""
        if fg.dtype == torch.float32:
            self.fp32_params[id(fg)] = self.shard_fp32(fg)
        else:
            largest = max((-(-(e - s) // fg.world_size) for s, e in fg.bucket_ranges), default=0)
            if largest > self._staging_numel.get(fg.dtype, 0):
                self._staging_numel[fg.dtype] = largest
                self.staging[fg.dtype] = [self.empty(largest, fg.dtype) for _ in range(2)]
        slices = [s for s in fg.shard_slices() if s[1] > s[0]]
        self._slices[id(fg)] = ([s0 for _, _, s0 in slices], slices)
        self._landing_dtype[id(fg)] = landing_dtype(fg.dtype, fg.reduce_dtype, self.grad_dtype)

    def staging_buffer(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        """The next of dtype's two staging buffers (its first n elements), once the H2D copy
        that last read it is done."""
        index = self._staging_next.get(dtype, 0)
        self._staging_next[dtype] = 1 - index
        host_wait(self._staging_done.pop((dtype, index), None))
        buffer = self.staging[dtype][index]
        poison(buffer)  # simulated asynchrony: free now, whatever still reads it reads NaN
        if buffer.numel() < n:
            raise AssertionError(f"a kernel run of {n} elements does not fit the staging buffer "
                                 f"of {buffer.numel()}: runs lie inside one bucket slice")
        self._staging_last = (dtype, index)
        return buffer[:n]

    def master(self, fg: FlatGroup, state: dict) -> torch.Tensor:
        return state["master"] if "master" in state else self.fp32_params[id(fg)]

    def nbytes(self) -> Dict[str, int]:
        """Host bytes beyond the optimizer state: fp32 parameter copies, staging, landing."""
        copies = sum(t.numel() * t.element_size() for t in self.fp32_params.values())
        staging = sum(t.numel() * t.element_size() for bufs in self.staging.values()
                      for t in bufs)
        landing = sum(t.numel() * t.element_size() for bufs in self._buffers.values()
                      for t in bufs)
        return {"master_params": copies, "staging": staging + landing}

    # ---- gradients: device to host -----------------------------------------------------------

    def land(self, fg: FlatGroup, bucket: int, shard: torch.Tensor, part: torch.Tensor,
             after=None):
        """Bucket `bucket`'s reduced slice `part` (device) goes into `shard` (host gradient
        shard view), once the event `after` (the collective that wrote `part`) is done; without
        one, once the caller's stream's work so far is. Returns the event after which `part`
        may be overwritten (None where the copy is done already). See [Note: offload
        pipeline]."""
        key = (id(fg), bucket)
        fresh = key not in self._landed
        self._landed.add(key)
        n = part.numel()
        dtype = self._landing_dtype.get(id(fg), part.dtype)
        self.d2h_bytes += n * dtype.itemsize
        self.d2h_copies += 1
        direct = fresh and dtype == shard.dtype  # straight into the shard
        buffer, index = (None, None) if direct else self._landing_buffer(dtype, n)
        target = shard if direct else buffer

        def copy() -> None:  # on the D2H stream: the cast too, after the collective
            target.copy_(part if part.dtype == dtype else part.to(dtype),
                         non_blocking=self.cuda)
        if after is None:  # with one: the collective only, not the backward queued since
            self.d2h_stream.follow_caller()
        event = self.d2h_stream.enqueue(copy, after=after)
        future = self._worker.submit(self._after_landing, key, event, shard, buffer, fresh)
        self._landing.append(future)
        if index is not None:
            self._buffer_use[(dtype, index)] = future
        return event

    def _landing_buffer(self, dtype: torch.dtype, n: int):
        """One of two pinned landing buffers, after the worker is done with its last use."""
        bufs = self._buffers.setdefault(dtype, [])
        index = self._next_buffer.get(dtype, 0)
        self._next_buffer[dtype] = 1 - index
        previous = self._buffer_use.pop((dtype, index), None)
        if previous is not None:
            previous.result()
        if len(bufs) <= index:
            bufs.append(self.zeros(n, dtype))
        elif bufs[index].numel() < n:
            bufs[index] = self.zeros(n, dtype)
        return bufs[index][:n], index

    def _after_landing(self, key, event, shard: torch.Tensor,
                       buffer: Optional[torch.Tensor], fresh: bool) -> None:
        self._wait_landed(event)
        if self.first_landed_at is None:
            self.first_landed_at = time.perf_counter()
        if buffer is not None and fresh:  # landed in another dtype: upcast into the shard
            shard.copy_(buffer)
            buffer = None
        if buffer is None and self.partials_wanted:
            flag = torch.zeros(1, dtype=torch.int32)
            total = ops.l2_norm_sq(shard, nonfinite=flag)
            self.partials[key] = (total, bool(flag.item()))
            self.partials_taken += 1
        elif buffer is None:
            self.partials[key] = None  # no norm wanted: taken at step time if one is read
        else:  # accumulated over several backwards: the norm is taken at step time
            shard.add_(buffer)
            self.partials[key] = None

    @staticmethod
    def _wait_landed(event) -> None:
        """The worker's wait for a D2H copy (into the shard or a landing buffer) to land."""
        host_wait(event)

    def finish_landing(self) -> None:
        """Waits until every gradient slice sent to the host has landed (raising a worker's
        error here)."""
        landing, self._landing = self._landing, []
        for future in landing:
            future.result()
        self._buffer_use.clear()

    def forget_grads(self) -> None:
        """A step or zero_grad() consumed the host gradients."""
        self.finish_landing()
        self._landed.clear()
        self.partials.clear()
        self.first_landed_at = None

    def partial(self, fg: FlatGroup, bucket: int):
        return self.partials.get((id(fg), bucket))

    # ---- parameters: host to device ----------------------------------------------------------

    def before_update(self) -> None:
        """The update is about to write the host fp32 parameter copies: the previous step's
        uploads from them must be done, and the uploads of this one must follow what the
        device has queued (backward may still read the parameters)."""
        host_wait(self._uploads_done)
        self._uploads_done = None
        self.h2d_stream.follow_caller()

    def upload(self, fg: FlatGroup, start: int, n: int,
               staged: Optional[torch.Tensor] = None) -> None:
        """Copies the updated parameters at shard positions [start, start + n) (inside one
        shard slice) to the device: from `staged` (the staging buffer the kernel wrote, for
        low-precision parameters) or from the fp32 host copy."""
        starts, slices = self._slices[id(fg)]
        i = bisect.bisect_right(starts, start) - 1
        b0, b1, s0 = slices[i]
        if start + n > s0 + (b1 - b0):
            raise AssertionError("an upload must lie inside one shard slice")
        offset = b0 + (start - s0)
        dst = fg.param_values(offset, offset + n, start)
        src = staged if staged is not None else self.fp32_params[id(fg)][start:start + n]
        self.h2d_bytes += n * dst.element_size()
        self.h2d_copies += 1
        done = self.h2d_stream.enqueue(lambda: dst.copy_(src, non_blocking=self.cuda))
        if staged is not None:  # the buffer is written again after this copy only
            self._staging_done[self._staging_last] = done
        self._last_upload = done

    def kernel_starting(self) -> None:
        """Called before each kernel run of the update: counts the runs that start while the
        previous run's parameters are still on their way to the device."""
        if not is_done(self._last_upload):
            self.uploads_overlapped += 1

    def after_update(self) -> None:
        """The device's next work (the all-gather, the next forward) follows the uploads."""
        self.h2d_stream.join_caller()
        self._uploads_done = self.h2d_stream.record()

    def stats(self) -> Dict[str, Dict[str, int]]:
        return {"d2h": {"copies": self.d2h_copies, "bytes": self.d2h_bytes},
                "h2d": {"copies": self.h2d_copies, "bytes": self.h2d_bytes}}

    def reset_stats(self) -> None:
        self.d2h_bytes = self.h2d_bytes = self.d2h_copies = self.h2d_copies = 0
