"""Agreement among a process group's ranks that they are all making the same zeroshard call.

    rendezvous = rendezvous_for(process_group, timeout_s)
    rendezvous.enter("zeroshard.checkpoint.save")  # every rank, before the call's collectives
    infos = rendezvous.all_gather_object(info)      # object collectives, with the timeout
    rendezvous_for(process_group, timeout_s).poll("ZeroAdamW.step")  # training side: cheap

Owns, per process group, the sequence of calls zeroshard makes outside the training step
(checkpoint save/load, consolidated state dicts), the marks in the torch.distributed store that
tell a waiting rank which ranks are missing, and object collectives that time out. Knows
nothing of optimizers or checkpoints: callers name their op.

[Note: one-rank calls] torch's object collectives (all_gather_object, broadcast_object_list)
have no timeout, so `save()` under `if rank == 0:` used to hang rank 0 forever while rank 1 blamed
a dead peer. Now each such call begins with enter(op): the rank marks its arrival under the
group's next sequence number and waits for every rank's mark.

Each poll() adds one to this rank's poll counter for the next sequence number (one store.add:
the whole cost in the training step). The first rank to enter an op records how often it had
polled since its previous op, then adds _ENTERED to every rank's counter for that sequence
number. So whichever comes first is seen by the other:
- a rank that had already polled more often than the entering rank has gone past the point of
  the call (it trains on, or waits in the next step's collective): enter() raises at once;
- a rank that polls afterwards gets a counter >= _ENTERED back: once it has polled more often
  than the entering rank, it raises at once and marks the op abandoned, and the waiting ranks
  raise at once too.
A rank merely late (at stage 0 a rank can finish step N and enter save() while its peer is still
in step N) has not polled more often, and is left alone. This needs every rank to poll equally
often between two ops, as SPMD training code does (the polls sit in optimizer.step() and clip on
every rank). A rank that neither enters nor polls (idle, or blocked elsewhere) leaves the
waiting ranks to raise when timeout_s passes, naming the missing ranks.
"""
from __future__ import annotations

import json
import pickle
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from .communicator import CollectiveTimeout, _TorchWork, all_gather_single

__all__ = ["Rendezvous", "rendezvous_for", "CollectiveCallError"]

_ENTERED = 1 << 40  # added to poll counters when an op is entered; far above any poll count
_FIRST_WAIT_S, _LONGEST_WAIT_S = 0.002, 0.05  # store polling interval while waiting in enter()


class CollectiveCallError(CollectiveTimeout):
    """The ranks of a process group are not making the same zeroshard call: one waits in a call
    (checkpoint.save, load...) that another rank did not make, or they made different calls.
    The message names the call, the ranks that made it and those that did not."""


class _GroupProgress:
    """What one process group's ranks have entered and polled; shared by every Rendezvous of
    the group so that the sequence numbers stay one sequence whatever the timeout."""

    def __init__(self, group: Optional[dist.ProcessGroup], rank: int, world_size: int,
                 store: Optional[dist.Store]) -> None:
        self.group, self.rank, self.world_size, self.store = group, rank, world_size, store
        self.entered = 0  # sequence number of the last op this rank entered
        self.polls = 0  # since this rank's last enter()
        self.current_op = "zeroshard object collective"
        self.broken: Optional[str] = None  # why the ranks are out of step, once they are
        self.device: Optional[torch.device] = None  # the rank's GPU, for NCCL object collectives


_progress_by_group: Dict[Any, _GroupProgress] = {}


def bind_rendezvous_device(process_group: Optional[dist.ProcessGroup],
                           device: torch.device) -> None:
    """The GPU this rank's object collectives of the group use (an optimizer's device): a
    script that never calls torch.cuda.set_device has cuda:0 current on every rank."""
    rendezvous = rendezvous_for(process_group, 1.0)
    progress = getattr(rendezvous, "_progress", None)
    if progress is not None:
        progress.device = device


def rendezvous_for(process_group: Optional[dist.ProcessGroup], timeout_s: float) -> "Rendezvous":
    """The Rendezvous of `process_group` (None: the default group) with this timeout. Without
    torch.distributed, or at world size 1, every method is a no-op."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialised")
        return Rendezvous(_GroupProgress(None, 0, 1, None), float(timeout_s))
    group = process_group
    if group is None:
        group = dist.distributed_c10d._get_default_group()
    progress = _progress_by_group.get(group)  # keyed by the object: a re-initialised group is new
    if progress is None:
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("this rank is not a member of process_group; only its members may "
                             "make zeroshard calls over it")
        progress = _GroupProgress(process_group, rank, dist.get_world_size(group),
                                  _group_store(group))
        _progress_by_group[group] = progress
    return Rendezvous(progress, float(timeout_s))


def _group_store(group: dist.ProcessGroup) -> Optional[dist.Store]:
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: enter()/poll() fall back to the timeouts alone
        return None
    return dist.PrefixStore(f"zeroshard/rendezvous/{group.group_name}/", store)


def _ranks(ranks: List[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"


def _store_failed(where: str, rank: int, error: Exception) -> str:
    return (f"the torch.distributed store stopped answering on rank {rank} in {where}: "
            f"{str(error).strip()[:200]}. The rank hosting it (usually rank 0) probably died; "
            "check the other ranks' logs.")


def _short(op: str) -> str:
    return op.rsplit(".", 1)[-1] + "()"


class Rendezvous:
    """enter()/poll() over one process group's store, and object collectives with a timeout."""

    def __init__(self, progress: _GroupProgress, timeout_s: float) -> None:
        self._progress = progress
        self.timeout_s = timeout_s

    @property
    def rank(self) -> int:
        return self._progress.rank

    @property
    def world_size(self) -> int:
        return self._progress.world_size

    # ---- agreeing on the call ---------------------------------------------------------------

    def enter(self, op: str) -> None:
        """Waits until every rank of the group has entered `op` as its next zeroshard call.
        Raises CollectiveCallError at once if a rank went on to something else or made another
        call, or when timeout_s passes, naming the ranks that did not call `op`."""
        if not isinstance(op, str) or not op:
            raise ValueError(f"op must be the name of the call, e.g. 'zeroshard.checkpoint.save', "
                             f"got {op!r}")
        p = self._progress
        if p.world_size == 1:
            return
        if p.broken is not None:
            raise CollectiveCallError(f"{op} cannot run on rank {p.rank}: an earlier zeroshard "
                                      f"call left the ranks out of step ({p.broken}); restart "
                                      "the job")
        p.entered += 1
        p.current_op = op
        if p.store is None:
            return  # timeout-only: the object collectives that follow still time out
        try:
            self._enter(op)
        except CollectiveCallError:
            raise
        except RuntimeError as e:  # the store is gone: its host rank probably died
            p.broken = f"the store failed in {op}"
            raise CollectiveTimeout(_store_failed(op, p.rank, e)) from e

    def _enter(self, op: str) -> None:
        p = self._progress
        seq, store = p.entered, p.store
        polls, p.polls = p.polls, 0
        mine = json.dumps({"op": op, "rank": p.rank, "polls": polls})
        first = json.loads(store.compare_set(f"{seq}/op", "", mine))
        if first["rank"] == p.rank:  # the first to enter: tell pollers, find ranks gone past
            gone = [r for r in range(p.world_size) if r != p.rank and
                    store.add(f"{seq}/polls{r}", _ENTERED) - _ENTERED > polls]
            if gone:
                why = f"{_ranks(gone)} went on past it without calling it"
                self._abandon(seq, why)
                p.broken = why
                raise CollectiveCallError(
                    f"{op} was called on rank {p.rank} but {why} (they are already in a later "
                    f"training step): every rank must call {_short(op)}, not only rank {p.rank}")
        if first["op"] != op:
            message = (f"rank {p.rank} called {op} while rank {first['rank']} called "
                       f"{first['op']} at the same point: every rank must make the same zeroshard "
                       "calls (checkpoint save/load, full_state_dict...) in the same order")
            self._abandon(seq, f"rank {p.rank} called {op} instead")
            p.broken = message
            raise CollectiveCallError(message)
        store.set(f"{seq}/rank{p.rank}", "1")
        arrived = store.add(f"{seq}/arrived", 1)
        deadline = time.monotonic() + self.timeout_s
        wait = _FIRST_WAIT_S
        while True:
            # Checked once more after everyone arrived: a rank may have given up meanwhile.
            if store.check([f"{seq}/abandoned"]):
                abandoned = json.loads(store.get(f"{seq}/abandoned"))
                p.broken = f"{op} was abandoned: {abandoned['why']}"
                if abandoned["gave_up"]:  # this rank came too late
                    raise CollectiveCallError(
                        f"{op} came too late on rank {p.rank}: {abandoned['why']}; every rank "
                        f"must call {_short(op)} within timeout_s of the others")
                came = _ranks(self._arrived(seq))
                raise CollectiveCallError(f"{op} was called on {came} but {abandoned['why']}: "
                                          f"every rank must call {_short(op)}, not only {came}")
            if arrived >= p.world_size:
                return
            if time.monotonic() > deadline:
                came = self._arrived(seq)
                missing = [r for r in range(p.world_size) if r not in came]
                self._abandon(seq, f"{_ranks(came)} gave up waiting for it after "
                                   f"{self.timeout_s:g} s", gave_up=True)
                p.broken = f"ranks {missing} did not call {op}"
                raise CollectiveCallError(
                    f"{op} was called on {_ranks(came)} but ranks {missing} did not call it within "
                    f"{self.timeout_s:g} s: every rank must call {_short(op)}, not only "
                    f"{_ranks(came)} (raised on rank {p.rank}; if those ranks are only slower, "
                    "raise timeout_s)")
            time.sleep(wait)
            wait = min(2 * wait, _LONGEST_WAIT_S)
            arrived = store.add(f"{seq}/arrived", 0)

    def poll(self, where: str) -> None:
        """Raises CollectiveCallError at once if another rank waits in a zeroshard call that this
        rank has gone past without making (see [Note: one-rank calls]); one store.add."""
        p = self._progress
        if p.world_size == 1 or p.store is None:
            return
        p.polls += 1
        try:
            self._poll(where)
        except CollectiveCallError:
            raise
        except RuntimeError as e:  # the store is gone: its host rank probably died
            raise CollectiveTimeout(_store_failed(where, p.rank, e)) from e

    def _poll(self, where: str) -> None:
        p, seq = self._progress, self._progress.entered + 1
        if p.store.add(f"{seq}/polls{p.rank}", 1) < _ENTERED:
            return  # no rank has entered the next op
        first = json.loads(p.store.get(f"{seq}/op"))
        if p.polls <= first["polls"]:
            return  # this rank has not yet reached the point where the other rank made the call
        waiting = f"rank {first['rank']} is waiting in {first['op']}"
        if p.store.check([f"{seq}/abandoned"]):
            why = json.loads(p.store.get(f"{seq}/abandoned"))["why"]
            waiting = f"rank {first['rank']} called {first['op']} ({why})"
        self._went_past(seq, first, waiting, where)

    def _went_past(self, seq: int, first: Dict[str, Any], waiting: str, where: str) -> None:
        """Marks op `seq` abandoned because this rank reached `where` instead, and raises."""
        p = self._progress
        self._abandon(seq, f"rank {p.rank} reached {where} instead")
        p.broken = f"rank {p.rank} skipped {first['op']}"
        raise CollectiveCallError(
            f"{waiting}, which every rank must "
            f"call; this rank ({p.rank}) reached {where} instead. Call {_short(first['op'])} on "
            f"every rank, not only on rank {first['rank']}")

    def next_call_entered(self) -> bool:
        """Whether another rank has entered this rank's next zeroshard call (read only)."""
        p = self._progress
        if p.world_size == 1 or p.store is None:
            return False
        try:
            return p.store.add(f"{p.entered + 1}/polls{p.rank}", 0) >= _ENTERED
        except RuntimeError as e:  # the store is gone: its host rank probably died
            raise CollectiveTimeout(_store_failed("a collective", p.rank, e)) from e

    def check_not_awaited(self, where: str) -> None:
        """For a rank blocked in a training collective (a bucket's reduce-scatter inside
        backward): raises CollectiveCallError if another rank has entered the next zeroshard
        call. Such a rank cannot finish that call before this collective, which it would first
        have to join, so this rank went past the call. Reads only (store.add of 0): the poll
        counts of [Note: one-rank calls] stay equal across ranks."""
        p = self._progress
        if p.world_size == 1 or p.store is None:
            return
        seq = p.entered + 1
        try:
            if p.store.add(f"{seq}/polls{p.rank}", 0) < _ENTERED:
                return
            first = json.loads(p.store.get(f"{seq}/op"))
        except RuntimeError as e:  # the store is gone: its host rank probably died
            raise CollectiveTimeout(_store_failed(where, p.rank, e)) from e
        self._went_past(seq, first, f"rank {first['rank']} is waiting in {first['op']}", where)

    def _abandon(self, seq: int, why: str, gave_up: bool = False) -> None:
        reason = json.dumps({"why": why, "gave_up": gave_up})
        self._progress.store.compare_set(f"{seq}/abandoned", "", reason)  # the first one stays

    def _arrived(self, seq: int) -> List[int]:
        store = self._progress.store
        return [r for r in range(self._progress.world_size) if store.check([f"{seq}/rank{r}"])]

    # ---- object collectives with a timeout --------------------------------------------------

    def all_gather_object(self, obj: Any) -> List[Any]:
        """Every rank's `obj`, by rank; CollectiveTimeout after timeout_s if a rank is missing."""
        p = self._progress
        if p.world_size == 1:
            return [obj]
        device = self._device()
        data = _to_bytes(obj, device)
        sizes = torch.empty(p.world_size, dtype=torch.int64, device=device)
        self._wait("all_gather_object", all_gather_single(
            sizes, torch.tensor([data.numel()], dtype=torch.int64, device=device),
            group=p.group, async_op=True))
        sizes = sizes.tolist()
        longest = max(sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[:data.numel()] = data
        everyone = torch.empty(p.world_size * longest, dtype=torch.uint8, device=device)
        self._wait("all_gather_object", all_gather_single(
            everyone, padded, group=p.group, async_op=True))
        everyone = everyone.cpu()
        return [_from_bytes(everyone[r * longest:r * longest + n]) for r, n in enumerate(sizes)]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` of group rank `src` on every rank; CollectiveTimeout after timeout_s."""
        p = self._progress
        if p.world_size == 1:
            return obj
        if not 0 <= src < p.world_size:
            raise ValueError(f"src must be a rank of the group (0..{p.world_size - 1}), got {src}")
        device = self._device()
        root = dist.get_global_rank(p.group, src) if p.group is not None else src
        data = _to_bytes(obj, device) if p.rank == src else None
        size = torch.tensor([data.numel() if data is not None else 0], dtype=torch.int64,
                            device=device)
        self._wait("broadcast_object", dist.broadcast(size, src=root, group=p.group,
                                                             async_op=True))
        if data is None:
            data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
        self._wait("broadcast_object", dist.broadcast(data, src=root, group=p.group,
                                                      async_op=True))
        return obj if p.rank == src else _from_bytes(data.cpu())

    def _device(self) -> torch.device:
        # NCCL moves only CUDA tensors; gloo (and gloo-for-CPU mixed groups) CPU ones.
        backend = str(dist.get_backend(self._progress.group))
        if backend == "nccl":
            if self._progress.device is not None:
                return self._progress.device
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _wait(self, what: str, handle) -> None:
        _TorchWork(handle, f"{what} in {self._progress.current_op}", self._progress.rank,
                   self.timeout_s).wait()


def _to_bytes(obj: Any, device: torch.device) -> torch.Tensor:
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    return data.to(device)


def _from_bytes(data: torch.Tensor) -> Any:
    return pickle.loads(data.numpy().tobytes())
