"""DeferredUpdate: stage 3's offloaded host update, run on a worker thread while the next forward
runs, each unit's parameters awaited only where the forward first gathers them.

[Note: deferred update] With offload="cpu" the update is the CPU kernels over this rank's host
shard (host_offload.py, [Note: offload pipeline]); nothing on the device needs it until the next
forward gathers a unit. So at stage 3, once step() has settled everything the update depends on
(every gradient landed, the clip coefficient, the overflow decision, each param group's
hyperparameters as they are now), it hands the update to one worker thread, in the order the
units ran in the last forward, and returns. Per FlatGroup the worker runs the same kernels on the
same values as step() would (exact: the same bits), queues its uploads, zeroes its host gradient
shard and marks the group done with the upload's event. The next forward's gather of a unit
waits for its own groups only (ParamUnits.before_gather): the update of later units goes on
beside the forward of earlier ones, the CPU kernels releasing the GIL.

Everything else that reads or writes parameters, master or optimizer state waits for the whole
update first (ZeroOptimizer.settle(): backward's first gradient, step, clip_grad_norm_, state
dicts, checkpoints, full_params, data ops on sharded parameters such as an EMA's lerp_, deepcopy),
so a script sees what a synchronous step would have left. An error on the worker is raised by
the next wait.
"""
from __future__ import annotations

import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..comm import simulated_async
from ..comm.side_stream import caller_wait


def _bind(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)  # see HostOffload._bind_worker


class DeferredUpdate:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zeroshard-update",
                                            initializer=_bind, initargs=(device,))
        # an optimizer that goes away takes its idle worker thread with it
        weakref.finalize(self, self._executor.shutdown, wait=False)
        self._future: Optional[Future] = None
        # id(FlatGroup) -> [done (threading.Event), the event of its last upload, updated]
        self._groups: Dict[int, list] = {}
        self._final = None  # the event after every upload of the update
        self.returned_early = 0  # updates step() returned before (tests read it)

    @property
    def pending(self) -> bool:
        return self._future is not None

    def start(self, jobs: Sequence[Tuple[object, Callable[[], None]]],
              record_upload: Callable[[], object]) -> None:
        """Runs each (group, job) in order on the worker; after a job, `record_upload()` gives
        the event its group's first use waits for."""
        if self._future is not None:
            raise AssertionError("a deferred update is already running")
        simulated = simulated_async.applies_to(self.device)
        groups = self._groups = {id(fg): [threading.Event(), None, False] for fg, _ in jobs}

        def run() -> None:
            try:
                torch.set_grad_enabled(False)  # as inside step(); grad mode is per thread
                for fg, job in jobs:
                    if simulated:
                        simulated_async.pause()
                    job()
                    entry = groups[id(fg)]
                    entry[1], entry[2] = record_upload(), True
                    entry[0].set()
                self._final = record_upload()
            finally:  # on an error too: a waiter wakes and raises it from the future
                for entry in groups.values():
                    entry[0].set()
        self._future = self._executor.submit(run)
        if not self._future.done():
            self.returned_early += 1

    def wait_for(self, groups: List[object]) -> None:
        """The caller's next work sees these groups' updated parameters."""
        if self._future is None:
            return
        for fg in groups:
            entry = self._groups.get(id(fg))
            if entry is None:
                continue
            entry[0].wait()
            if not entry[2]:  # the worker failed before this group: raise its error
                self.wait_all()
            caller_wait(entry[1], self.device)

    def wait_all(self) -> bool:
        """Waits for the whole update; returns whether one was pending."""
        future, self._future = self._future, None
        if future is None:
            return False
        try:
            future.result()
        finally:
            self._groups = {}
        caller_wait(self._final, self.device)
        self._final = None
        return True


def update_jobs(flat_groups, shard_state, param_groups, units, step_group: Callable,
                grad_scale: float, updated: List[List[bool]], zero_grads: bool):
    """The deferred update's (group, job) list: each flat group's update with its param
    group's hyperparameters as they are now (a scheduler may change them next), in the
    order the units ran in the last forward (the root's groups first: the forward gathers the
    root first); with zero_grads each group's host gradients zeroed after its update (the main
    thread must not touch them while the worker runs)."""
    last_forward = units.record or units.previous
    order = {index: i for i, index in enumerate(last_forward)}

    def position(k: int) -> tuple:
        u = units.unit_of_group.get(id(flat_groups[k]))
        return (u is None or not u.is_root, order.get(u.index if u else -1, len(order)), k)
    jobs = []
    for k in sorted(range(len(flat_groups)), key=position):
        fg, state, got = flat_groups[k], shard_state[k], updated[k]
        group = dict(param_groups[fg.group_index])

        def job(fg=fg, state=state, got=got, group=group) -> None:
            if any(got):
                step_group(fg, state, group, grad_scale, got)
            if zero_grads:
                fg.zero_grads()
        jobs.append((fg, job))
    return jobs
