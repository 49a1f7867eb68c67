"""ShardedTensor: a tensor whose shape is the whole parameter's and whose data is this rank's part.

Owns: the ShardSpec (which elements of a whole tensor each rank holds), the tensor classes a
stage-3 parameter takes between gathers (`ShardedParameter`) and the values derived from one
(`ShardedTensor`: `p.data`, `p.detach()`, `p.clone()`, an EMA's shadow), and what each torch
operation means on them (sharded_ops.py). Knows torch.distributed (reductions and gathers are
collectives over the spec's group); knows nothing of optimizers, units or buckets: an owner
(the stage-3 optimizer) may attach an fp32 master to a shard and a `full_params` context.

[Note: sharded parameters] Between gathers a stage-3 parameter is the same nn.Parameter object
the model and the optimizer hold, with its class switched to ShardedParameter and its torch data
an empty placeholder. Its Python-level face is the whole parameter's: `shape`, `numel()`, `dtype`
and `device` are the whole tensor's. Its values are `local`, this rank's pieces of the flattened
whole (`spec.pieces`: element ranges, sorted), a view of the optimizer's shard when it has one.
Every torch operation on it reaches `__torch_function__` (sharded_ops.py), which either gives
the answer the whole tensor would give, working on the pieces (elementwise in-place and
out-of-place ops, inits, reductions, copies), or raises ShardedAccessError naming the parameter
and `zeroshard.full_params(model)`. Nothing is a silent no-op. Gathering switches the class back
to nn.Parameter and points the data at the whole tensor; freeing switches it again. The class
switch (not a wrapper) keeps the object's identity, so optimizer param groups, `model.parameters()`
and autograd's saved tensors keep working across gathers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..comm.communicator import all_gather_single

__all__ = ["ShardSpec", "ShardedTensor", "ShardedParameter", "ShardedAccessError",
           "is_sharded", "shard_of", "make_sharded", "unmake_sharded", "raw"]

Pieces = Tuple[Tuple[int, int], ...]


class ShardedAccessError(RuntimeError):
    """An operation needs the whole value of a parameter that stage 3 keeps sharded."""


@dataclass(frozen=True, eq=False)
class ShardSpec:
    """Which elements of a whole tensor (flattened, row-major) each rank of `group` holds."""
    shape: torch.Size
    rank_pieces: Tuple[Pieces, ...]  # per rank: sorted, disjoint element ranges [start, end)
    rank: int
    group: Optional[dist.ProcessGroup]
    name: str

    @property
    def world_size(self) -> int:
        return len(self.rank_pieces)

    @property
    def pieces(self) -> Pieces:
        return self.rank_pieces[self.rank]

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def local_numel(self, rank: Optional[int] = None) -> int:
        pieces = self.rank_pieces[self.rank if rank is None else rank]
        return sum(end - start for start, end in pieces)

    def same_layout(self, other: "ShardSpec") -> bool:
        return self is other or (self.shape == other.shape
                                 and self.rank_pieces == other.rank_pieces)

    def renamed(self, name: str) -> "ShardSpec":
        return ShardSpec(self.shape, self.rank_pieces, self.rank, self.group, name)

    def take(self, whole: torch.Tensor, rank: Optional[int] = None) -> torch.Tensor:
        """This rank's elements of a whole tensor (any shape of numel elements), flat."""
        flat = whole.reshape(-1)
        pieces = self.rank_pieces[self.rank if rank is None else rank]
        if len(pieces) == 1:
            return flat[pieces[0][0]:pieces[0][1]]
        if not pieces:
            return flat[:0]
        return torch.cat([flat[a:b] for a, b in pieces])

    def place(self, local: torch.Tensor, whole_flat: torch.Tensor,
              rank: Optional[int] = None) -> None:
        """Writes a rank's elements into a flat whole tensor."""
        at = 0
        for a, b in self.rank_pieces[self.rank if rank is None else rank]:
            whole_flat[a:b].copy_(local[at:at + (b - a)])
            at += b - a

    @staticmethod
    def even(shape: torch.Size, world_size: int, rank: int, group, name: str) -> "ShardSpec":
        """Rank r holds elements [r*c, (r+1)*c) of the whole, c = ceil(numel / world_size)."""
        n = shape.numel()
        c = -(-n // world_size)
        pieces = tuple(((min(r * c, n), min((r + 1) * c, n)),) if min(r * c, n) < min((r + 1) * c, n)
                       else () for r in range(world_size))
        return ShardSpec(torch.Size(shape), pieces, rank, group, name)


class Shard:
    """What a sharded tensor holds: its spec, its local values and, for a parameter the stage-3
    optimizer owns, how to reach the fp32 master of the same elements and the optimizer."""
    __slots__ = ("spec", "local", "master", "owner")

    def __init__(self, spec: ShardSpec, local: torch.Tensor,
                 master: Optional[Callable[[], Optional[torch.Tensor]]] = None,
                 owner=None) -> None:
        if local.dim() != 1 or local.numel() != spec.local_numel():
            raise ValueError(f"{spec.name}: a shard's local values must be flat with "
                             f"{spec.local_numel()} elements, got shape {tuple(local.shape)}")
        self.spec, self.local, self.master, self.owner = spec, local, master, owner

    def master_values(self) -> Optional[torch.Tensor]:
        return self.master() if self.master is not None else None


def raw():
    """Inside: torch operations on sharded tensors act on their placeholders (zeroshard's own
    bookkeeping: storage checks, `p.data = ...` while gathering)."""
    return torch._C.DisableTorchFunctionSubclass()


def _placeholder(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=dtype, device=device)


def _no_handler(func, args, kwargs):
    raise RuntimeError("zeroshard.sharded_params.sharded_ops was not imported: import zeroshard first")


# What every torch call on a ShardedTensor does: sharded_ops.handle, which registers itself on
# import (zeroshard/__init__ imports it), so that this file need not import the ops it serves.
_torch_function_handler = _no_handler


def set_torch_function_handler(handler) -> None:
    global _torch_function_handler
    _torch_function_handler = handler


class ShardedTensor(torch.Tensor):
    """Values shaped like a whole tensor whose elements are spread over the ranks (see the
    note). Made from a sharded parameter (`p.data`, `p.detach()`, `p.clone()`, `p * 2`...)."""

    _zs: Shard

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with raw():
            return _torch_function_handler(func, args, kwargs or {})

    def __repr__(self, *args, **kwargs) -> str:
        spec = self._zs.spec
        return (f"ShardedTensor({spec.name}: shape {tuple(spec.shape)}, {self._zs.local.dtype} "
                f"on {self._zs.local.device}; this rank holds {spec.local_numel()} of "
                f"{spec.numel} elements — `with zeroshard.full_params(model):` shows it whole)")

    def __reduce_ex__(self, protocol):
        spec = self._zs.spec
        raise ShardedAccessError(
            f"{spec.name} is sharded across {spec.world_size} ranks by zeroshard stage 3, so it "
            "cannot be pickled (torch.save of a model, a state_dict or a parameter saves this "
            "rank's part only). Save with zeroshard.checkpoint.save(path, model=model, "
            "optimizer=opt) or zeroshard.export, or take whole tensors on every rank inside "
            "`with zeroshard.full_params(model): sd = model.state_dict()`.")

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        parameter = isinstance(self, ShardedParameter)
        with raw():
            copy = make_sharded(parameter, self._zs.spec, self._zs.local.clone(),
                                requires_grad=self.requires_grad)
        if parameter and self._zs_base is not torch.nn.Parameter:  # a library's own class
            copy._zs_base = self._zs_base
            copy.__class__ = _sharded_class(self._zs_base)
        memo[id(self)] = copy
        return copy


class ShardedParameter(ShardedTensor, torch.nn.Parameter):
    """A stage-3 (or sharded_init) parameter between gathers; see [Note: sharded parameters]."""

    _zs_base: type  # the class it has while gathered (nn.Parameter or a subclass of it)


def is_sharded(t) -> bool:
    return isinstance(t, ShardedTensor)


def shard_of(t) -> Optional[Shard]:
    return t._zs if isinstance(t, ShardedTensor) else None


def make_sharded(parameter: bool, spec: ShardSpec, local: torch.Tensor, *,
                 requires_grad: bool = False, master=None, owner=None) -> ShardedTensor:
    """A new sharded tensor (a ShardedParameter when `parameter`) over `local`."""
    with raw():
        t = torch.Tensor._make_subclass(ShardedParameter if parameter else ShardedTensor,
                                        _placeholder(local.dtype, local.device), requires_grad)
    t._zs = Shard(spec, local, master, owner)
    if parameter:
        t._zs_base = torch.nn.Parameter
    return t


def shard_parameter(p: torch.nn.Parameter, shard: Shard,
                    placeholder: Optional[torch.Tensor] = None) -> None:
    """Turns the parameter object `p` into a ShardedParameter over `shard` (its data becomes an
    empty placeholder: whatever it viewed may be freed)."""
    with raw():
        if not isinstance(p, ShardedParameter):
            p._zs_base = type(p)
        p.data = placeholder if placeholder is not None else _placeholder(p.dtype, p.device)
        p._zs = shard
        if not isinstance(p, ShardedParameter):
            p.__class__ = _sharded_class(p._zs_base)


def unmake_sharded(p: torch.nn.Parameter, data: torch.Tensor, forget: bool = False) -> None:
    """Makes `p` an ordinary parameter over `data` (a whole tensor). forget=True drops its shard
    record too (the optimizer adopted it elsewhere)."""
    with raw():
        if isinstance(p, ShardedParameter):
            p.__class__ = p._zs_base
        p.data = data
        if forget:
            for attr in ("_zs", "_zs_base"):
                if attr in p.__dict__:
                    delattr(p, attr)


_SHARDED_CLASSES = {torch.nn.Parameter: ShardedParameter}


def _sharded_class(base: type) -> type:
    """ShardedParameter for nn.Parameter; for a subclass of it (a library's own parameter
    type), a class deriving from both, so isinstance checks against it keep holding."""
    cls = _SHARDED_CLASSES.get(base)
    if cls is None:
        cls = type("Sharded" + base.__name__, (ShardedParameter, base), {})
        _SHARDED_CLASSES[base] = cls
    return cls


def whole_shape(t: torch.Tensor) -> torch.Size:
    shard = shard_of(t)
    return shard.spec.shape if shard is not None else t.shape


# ---- gathering (collectives over the spec's group) ----------------------------------------------

def _even_chunk(spec: ShardSpec) -> Optional[int]:
    """c when rank r holds exactly elements [r*c, min((r+1)*c, numel)) (sharded_init's layout):
    an all-gather of c elements a rank then lands every element in place."""
    n = spec.numel
    c = -(-n // spec.world_size) if spec.world_size else 0
    for r, pieces in enumerate(spec.rank_pieces):
        start, end = min(r * c, n), min((r + 1) * c, n)
        if (pieces != ((start, end),)) if end > start else pieces:
            return None
    return c


def gather_whole(tensors: Sequence[ShardedTensor]) -> List[torch.Tensor]:
    """The whole values of sharded tensors of one group and device, in one all-gather: each rank
    sends its locals packed (padded to the longest rank's), then every whole is unpacked. One
    tensor in sharded_init's even layout is gathered in place: one whole-sized temporary."""
    if not tensors:
        return []
    shards = [t._zs for t in tensors]
    spec0 = shards[0].spec
    dtype, device = shards[0].local.dtype, shards[0].local.device
    world = spec0.world_size
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    chunk = _even_chunk(spec0) if len(shards) == 1 and distributed else None
    if chunk is not None:
        received = torch.empty(chunk * world, dtype=dtype, device=device)
        send = shards[0].local
        if send.numel() != chunk:  # the last rank's shorter piece, padded
            send = torch.zeros(chunk, dtype=dtype, device=device)
            send[:shards[0].local.numel()].copy_(shards[0].local)
        all_gather_single(received, send, group=spec0.group)
        return [received[:spec0.numel].view(spec0.shape)]
    wholes = [torch.empty(s.spec.shape, dtype=dtype, device=device) for s in shards]
    if not distributed:
        for s, w in zip(shards, wholes):
            s.spec.place(s.local, w.view(-1))
        return wholes
    lengths = [sum(s.spec.local_numel(r) for s in shards) for r in range(world)]
    longest = max(lengths)
    send = torch.zeros(longest, dtype=dtype, device=device)
    packed = [s.local.to(dtype) for s in shards if s.local.numel()]
    if packed:
        cat = torch.cat(packed) if len(packed) > 1 else packed[0]
        send[:cat.numel()].copy_(cat)
    received = torch.empty(longest * world, dtype=dtype, device=device)
    all_gather_single(received, send, group=spec0.group)
    for r in range(world):
        at = r * longest
        for s, w in zip(shards, wholes):
            n = s.spec.local_numel(r)
            s.spec.place(received[at:at + n], w.view(-1), rank=r)
            at += n
    return wholes
