"""PeerGuard: keeps one rank from waiting out the whole timeout for a peer that went elsewhere.

A script that saves a checkpoint under `if rank == 0:` sends rank 0 into a zeroshard call the
other ranks never make, while they block in a collective rank 0 will not join. Every zeroshard
call announces itself at the rendezvous (rendezvous.py); the guard polls it before a rank blocks
(`poll`) and while it waits on a bucket's collective inside backward (`wait`), and raises a
CollectiveCallError naming both calls instead of a timeout.
"""
from __future__ import annotations

import time

import torch

from .rendezvous import rendezvous_for

# How long a collective blocked in backward may stay unfinished after another rank entered its
# next zeroshard call before this rank concludes it went past that call (see wait).
NOT_AWAITED_GRACE_S = 2.0


class PeerGuard:
    def __init__(self, process_group, timeout_s: float, world_size: int,
                 device: torch.device, owner_name: str) -> None:
        self.process_group = process_group
        self.timeout_s = timeout_s
        self.world_size = world_size
        self.device = device
        self.owner_name = owner_name  # "ZeroAdamW": what the errors call the collectives' owner

    def poll(self, where: str) -> None:
        """Fails fast when another rank waits in a zeroshard call this rank did not make
        (checkpoint.save on rank 0 only), before this rank blocks in a collective."""
        if self.world_size > 1:
            rendezvous_for(self.process_group, self.timeout_s).poll(where)

    def wait(self, work) -> None:
        """Blocks until `work` completes (up to timeout_s; its wait() then raises), checking
        every 10 ms that no rank waits in a zeroshard call this rank went past. CUDA waits are
        stream joins and need no watching."""
        if self.world_size == 1 or self.device.type == "cuda":
            return
        rendezvous = rendezvous_for(self.process_group, self.timeout_s)
        where = f"a collective of {self.owner_name}"
        deadline = time.monotonic() + self.timeout_s
        pause, next_check, entered_since = 5e-5, 0.0, None
        while not work.is_completed() and time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_check:
                # A rank that finished its side of this collective may enter its next call
                # while this rank's side is still completing (gloo): only a collective still
                # not done NOT_AWAITED_GRACE_S later is one that rank never joins.
                if rendezvous.next_call_entered():
                    entered_since = now if entered_since is None else entered_since
                    if now - entered_since >= NOT_AWAITED_GRACE_S:
                        rendezvous.check_not_awaited(where)
                next_check = now + 0.01
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)
