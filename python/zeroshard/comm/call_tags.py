"""Call tags: the check that every rank of a group is making the same zeroshard collective.

Owns the 4-byte tag each rank all-gathers before a stage-3 gather or a reduction over sharded
weights, its encoding (what is gathered, for which phase), and the error that names both sides
when ranks differ. Knows torch.distributed and nothing of units or optimizers: callers say what
they gather.

[Note: one tag shape] Every tag exchange is the same collective (an all-gather of one float32 per
rank) whoever makes it, so when two ranks are in different zeroshard calls their tag exchanges
pair with each other, the mismatch is seen on every rank and each raises the same error. A data
collective is launched only after its tag matched: two ranks never pair collectives of different
sizes (gloo aborts the process on that, NCCL hangs). A float32 holds integers exactly up to
2**24 (NCCL reduces float types only, and gloo's all-gather is typed alike).
"""
from __future__ import annotations

import zlib
from typing import Callable, Optional, Sequence

import torch

UNIT, MODULE, REDUCTION = 0, 1, 2  # what is gathered or reduced
_KINDS = {UNIT: "gathered stage-3 unit", MODULE: "gathered sharded module",
          REDUCTION: "reduced sharded weights for"}
_INDEX_LIMIT = 1 << 19


def phase() -> int:
    """What the pass that gathers is for: bit 1 grad mode (a training forward); bit 0, set by
    the caller, backward."""
    return 2 if torch.is_grad_enabled() else 0


def encode(kind: int, index: int, phase_bits: int) -> int:
    return ((index % _INDEX_LIMIT) * 4 + kind) * 4 + phase_bits


def decode(code: int):
    return (code // 16) % _INDEX_LIMIT, (code // 4) % 4, code % 4


def index_of_name(name: str) -> int:
    return zlib.crc32(name.encode()) % _INDEX_LIMIT


def describe(code: int, name_of: Callable[[int, int], str]) -> str:
    index, kind, bits = decode(code)
    mode = ("backward" if bits & 1 else
            "a training forward (grad enabled)" if bits & 2 else "an evaluation forward (no_grad)")
    if kind == REDUCTION:
        return f"reduced sharded weights ({name_of(kind, index)})"
    return f"{_KINDS.get(kind, 'ran')} {name_of(kind, index)!r} in {mode}"


def check(tags: Sequence[int], mine: int, rank: int,
          name_of: Callable[[int, int], str]) -> None:
    """Raises on every rank when the gathered tags differ (they are the same list everywhere)."""
    if all(t == mine for t in tags):
        return
    first = tags[0]
    other = next(r for r, t in enumerate(tags) if t != first)
    kinds = {decode(t)[1] for t in tags}
    phases = {decode(t)[2] for t in tags}
    if len(kinds) == 1 and kinds != {REDUCTION} and len(phases) == 1:
        cause = ("the ranks ran their units in different orders (a branch that depends on the "
                 "rank's data or on the rank?). Every rank must call the same units in the same "
                 "order in each forward; make the branch agree across ranks, or put the "
                 "branching modules in one unit (units=) so they are gathered together.")
    else:
        cause = ("a forward, or a reduction over sharded weights, that not every rank runs "
                 "(evaluation or logging under `if rank == 0:`?). At stage 3 each rank holds "
                 "only its part of the weights, so running the model or reducing a weight is a "
                 "collective: run the evaluation on every rank (each on its share of the "
                 "batches), or gather the model whole on every rank first with "
                 "`with zeroshard.full_params(model):` (rank 0 may then work alone inside).")
    raise TagMismatchError(
        f"stage 3: rank 0 {describe(first, name_of)} while rank {other} "
        f"{describe(tags[other], name_of)}: {cause}")


class TagMismatchError(RuntimeError):
    """Ranks made different zeroshard collectives; raised on every rank alike."""


def collective_device(group, local_device: torch.device) -> torch.device:
    """Where a small collective over `group` runs: the communicator's rule for object
    collectives (CPU for gloo, also in a mixed group; the tensors' own GPU for NCCL)."""
    from .communicator import _object_collective_device
    device = _object_collective_device(group, local_device)
    if device is None:
        return torch.device("cpu")
    return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def exchange(group, code: int, device: torch.device, rank: int, world_size: int,
             name_of: Callable[[int, int], str], all_gather: Optional[Callable] = None) -> None:
    """All-gathers `code` over the group and checks it (one host sync). `all_gather(full,
    part)` defaults to torch.distributed's; the optimizer passes its communicator's."""
    if world_size == 1:
        return
    from .communicator import all_gather_single
    full = torch.empty(world_size, dtype=torch.float32, device=device)
    part = torch.full((1,), float(code), dtype=torch.float32, device=device)
    if all_gather is None:
        all_gather_single(full, part, group=group)
    else:
        all_gather(full, part)
    check([int(t) for t in full.tolist()], code, rank, name_of)
