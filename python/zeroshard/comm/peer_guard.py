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
# How often a rank waiting on a collective looks at the rendezvous.
CHECK_EVERY_S = 0.01
# The longest sleep between two looks at the collective: a stage 1/2 step waits on ~32 bucket
# gathers of ~1 ms each, and a 1 ms sleep would add up to most of one to each (measured: the
# gathers of gpt-17m's step took 38-41 ms with 1 ms, 32-36 ms with 0.2 ms).
MAX_PAUSE_S = 2e-4


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
        # The first look at the rendezvous (a store round trip, ~0.5 ms here) waits CHECK_EVERY_S:
        # most collectives finish sooner, and a stray peer is seen NOT_AWAITED_GRACE_S later
        # anyway.
        pause, entered_since = 5e-5, None
        next_check = time.monotonic() + CHECK_EVERY_S
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
                next_check = now + CHECK_EVERY_S
            time.sleep(pause)
            pause = min(2 * pause, MAX_PAUSE_S)
