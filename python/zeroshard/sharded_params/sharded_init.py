"""sharded_init: build a model bigger than one rank, each module sharded as soon as it is built.

    with zeroshard.sharded_init():
        model = GPT(cfg)
    opt = zeroshard.ZeroAdamW(model, stage=3)   # adopts the shards

Owns: the hooks and the torch-function mode active inside the block, sharding each parameter
into a ShardedParameter (sharded_tensor.py) that holds this rank's even slice of its elements,
and gathering a parameter whole again (for the optimizer's adoption, or for an operation that
needs it). Knows nothing of optimizers, units or buckets. After the block the model is a
sharded model: each module gathers its parameters for its forward (sharded_modules.py), so it
runs without an optimizer (a frozen teacher, a reference model) on every rank.

[Note: construction by shards] Every rank runs the same construction code with the same seed
(as DeepSpeed's zero.Init requires). When a module is assigned into its parent (nn.Module's
module-registration hook: its __init__ is over), its parameters are broadcast from rank 0 (so
every rank keeps rank 0's weights, as the optimizer's construction broadcast would give) and
each rank keeps only its slice: elements [r*c, (r+1)*c) of the flattened parameter, c =
ceil(numel / N). The parameter itself becomes a ShardedParameter over that slice. Parameters the root module
registers itself are sharded when the block ends. Peak memory is then about one module (the
largest child) plus the shards, not the model.

Code that initialises weights after its children are built (`self.apply(self._init_weights)`,
a `reset_parameters()` over named_parameters) still sees whole parameters: inside the block a
torch-function mode answers shape queries with the whole shape, makes `p.data` the parameter,
and runs any other operation on a whole temporary: gathered from the ranks' slices (one
all-gather) unless the operation overwrites every element anyway (copy_, fill_, zero_, the
random fills and torch.nn.init's functions), after which in-place results go back to the
slice. So initialisation consumes the random generator exactly as an unsharded construction
does, and the weights are identical to it.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Union

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from ..comm.comm_groups import resolved_shard_size
from ..comm.topology import shard_groups, topology_of
from ..comm.topology_options import TopologyOptions
from . import sharded_modules
from .sharded_tensor import (Shard, ShardSpec, ShardedParameter, gather_whole as _gather_whole,
                             raw, shard_parameter, unmake_sharded)
from .sharded_tensor import whole_shape  # noqa: F401  (part of this module's interface)

# Operations (as methods or torch.nn.init functions) that write every element of their first
# argument without reading it: no gather is needed before them.
_OVERWRITES = {"copy_", "zero_", "fill_", "normal_", "uniform_", "bernoulli_", "exponential_",
               "random_", "log_normal_", "cauchy_", "geometric_", "zeros_", "ones_",
               "constant_", "trunc_normal_", "xavier_uniform_", "xavier_normal_",
               "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_", "eye_",
               "dirac_"}
_SHAPE_QUERIES = {"size", "numel", "dim", "__len__", "nelement", "ndimension"}
# Calls about the parameter object itself, not its values.
_PASS_THROUGH = {"requires_grad_", "register_hook", "register_post_accumulate_grad_hook",
                 "__hash__", "__repr__", "__format__", "__reduce_ex__", "__deepcopy__"}


def record_of(p: torch.Tensor) -> Optional[Shard]:
    """The shard of a parameter sharded by sharded_init (not yet adopted by an optimizer)."""
    if isinstance(p, ShardedParameter) and p._zs.owner is None:
        return p._zs
    return None


def is_sharded(p: torch.Tensor) -> bool:
    return record_of(p) is not None


def _shard(p: torch.nn.Parameter, group, world_size: int, rank: int, name: str) -> None:
    with raw():
        if isinstance(p, ShardedParameter) or p.numel() == 0 or p.device.type == "meta":
            return
        with torch.no_grad():
            if world_size > 1:
                whole = p.detach().contiguous()
                src = dist.get_global_rank(group, 0) if group is not None else 0
                dist.broadcast(whole, src=src, group=group)
            else:
                whole = p.detach()
            spec = ShardSpec.even(p.shape, world_size, rank, group, name)
            local = spec.take(whole).clone()
    shard_parameter(p, Shard(spec, local))


def gather_whole(p: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The whole value of a sharded parameter (a collective over its group), written into `out`
    (flat, numel elements) when given."""
    with raw():
        (whole,) = _gather_whole([p])
        if out is not None:
            out.copy_(whole.reshape(-1))
            return out
        return whole


def unshard(p: torch.Tensor) -> None:
    """Makes a sharded parameter whole again (a collective), forgetting its record."""
    if is_sharded(p):
        unmake_sharded(p, gather_whole(p), forget=True)


def release(p: torch.Tensor) -> None:
    """Forgets the record of a parameter whose whole value now lives elsewhere (the caller
    points its data there next)."""
    if is_sharded(p):
        with raw():
            unmake_sharded(p, torch.empty(0, dtype=p.dtype, device=p.device), forget=True)


class _WholeParams(TorchFunctionMode):
    """Inside sharded_init: operations on sharded parameters see them whole (see the note)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sharded = {}
        tree_map(lambda a: sharded.setdefault(id(a), a)
                 if isinstance(a, torch.Tensor) and is_sharded(a) else None, (args, kwargs))
        if not sharded:
            return func(*args, **kwargs)
        target = args[0] if args else None
        descriptor = getattr(getattr(func, "__self__", None), "__name__", None)
        name = getattr(func, "__name__", "")
        if descriptor is not None and is_sharded(target):  # a property: p.shape, p.data...
            if name == "__get__" and descriptor in ("shape", "ndim", "data"):
                shape = record_of(target).spec.shape
                return shape if descriptor == "shape" else (
                    len(shape) if descriptor == "ndim" else target)
            if name == "__set__" and descriptor == "data":  # p.data = value: into the slice
                self._assign(target, args[1])
                return None
            with raw():
                return func(*args, **kwargs)
        if name in _PASS_THROUGH:
            return func(*args, **kwargs)
        if name in _SHAPE_QUERIES and is_sharded(target) and len(args) <= 2 and not kwargs:
            with torch._C.DisableTorchFunction():
                probe = torch.empty(record_of(target).spec.shape, device="meta")
                return getattr(probe, name)(*args[1:])
        temps = {}
        for key, p in sharded.items():
            record = record_of(p)
            if p is target and name in _OVERWRITES:
                temps[key] = torch.empty(record.spec.shape, dtype=record.local.dtype,
                                         device=record.local.device)
            else:
                temps[key] = gather_whole(p).clone()
        swap = lambda a: temps.get(id(a), a) if isinstance(a, torch.Tensor) else a  # noqa: E731
        with raw():
            result = func(*tree_map(swap, args), **tree_map(swap, kwargs))
        for key, p in sharded.items():  # in-place changes go back to the slices
            record = record_of(p)
            with torch.no_grad(), raw():
                record.local.copy_(record.spec.take(temps[key]))
        back = {id(temps[key]): p for key, p in sharded.items()}
        return tree_map(lambda r: back.get(id(r), r) if isinstance(r, torch.Tensor) else r,
                        result)

    @staticmethod
    def _assign(p: torch.Tensor, value: torch.Tensor) -> None:
        if value is p:  # p.data = p.to(its own dtype): Module._apply's no-op conversion
            return
        record = record_of(p)
        if is_sharded(value):
            value = gather_whole(value)
        if value.shape != record.spec.shape or value.dtype != record.local.dtype or \
                value.device != record.local.device:
            raise RuntimeError(
                f"inside zeroshard.sharded_init a parameter of shape {tuple(record.spec.shape)} "
                f"({record.local.dtype} on {record.local.device}) was given data of shape "
                f"{tuple(value.shape)} ({value.dtype} on {value.device}): a sharded parameter "
                "cannot change shape, dtype or device while the model is built. Call .to() "
                "or .half() after the block, before building the optimizer.")
        with torch.no_grad(), raw():
            record.local.copy_(record.spec.take(value.detach()))


def _shard_group_of(shard_size, node_size, process_group):
    """This rank's shard group for shard_size= (as the optimizer builds it, checked as it
    checks it), or None where the shard group is the whole world."""
    TopologyOptions(node_size=node_size, shard_size=shard_size).check(
        stage=3, reshard_after_forward=True)
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    k = resolved_shard_size(shard_size, world, topology_of(world, node_size).node_size,
                            stage=3, process_group=process_group)
    return None if k == world else shard_groups(world, k)[0]


@contextlib.contextmanager
def sharded_init(process_group: Optional[dist.ProcessGroup] = None, *,
                 shard_size: Union[None, int, str] = None, node_size: Optional[int] = None):
    """Inside the block each module's parameters are sharded across the ranks of
    `process_group` (default: the world) as soon as the module is built; see [Note:
    construction by shards]. Every rank must run the same construction. Build the stage-3
    optimizer on the model afterwards: it adopts the shards (other stages gather them whole).
    For a hybrid-sharded optimizer pass it the same shard_size (and node_size): the
    parameters are then sharded within its shard groups."""
    if shard_size is not None:
        process_group = _shard_group_of(shard_size, node_size, process_group)
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size(process_group)
        rank = dist.get_rank(process_group)
    else:
        world_size, rank = 1, 0
    created: List[tuple] = []  # (name, parameter)
    holders: List[torch.nn.Module] = []  # modules that registered parameters

    def on_module(parent, name, child):
        if child is not None:
            for pname, p in child.named_parameters():
                _shard(p, process_group, world_size, rank, f"{name}.{pname}")
        return None

    def on_parameter(module, name, param):
        if param is not None:
            created.append((name, param))
            holders.append(module)
        return None

    module_hook = torch.nn.modules.module.register_module_module_registration_hook(on_module)
    param_hook = torch.nn.modules.module.register_module_parameter_registration_hook(
        on_parameter)
    try:
        with _WholeParams():
            yield
            for name, p in created:  # the root's own parameters, and any module never registered
                _shard(p, process_group, world_size, rank, name)
            for m in dict.fromkeys(holders):  # run without an optimizer: gather per module
                sharded_modules.install_gather_hooks(m, recurse=False)
    finally:
        module_hook.remove()
        param_hook.remove()
