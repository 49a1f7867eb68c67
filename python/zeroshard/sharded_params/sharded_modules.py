"""Sharded modules without an optimizer: gathered module by module in their forward, and whole
on demand with `zeroshard.full_params(module)`.

Owns the forward hooks that make a module whose parameters are sharded but owned by no optimizer
run (a model built under sharded_init and never trained here: a frozen teacher, a DPO reference
model; a `copy.deepcopy` of a stage-3 model: an EMA, an SWA average), and `full_params`, which
makes any module's sharded parameters whole on every rank. Parameters a stage-3 optimizer owns
are its units' business (param_units.py); `full_params` delegates them to the optimizer.

[Note: standalone gathers] Before a module's forward, its own sharded parameters are gathered
whole (one all-gather per module and dtype, after a call tag, see call_tags.py) and become
ordinary parameters; after it they are sharded again, or, when autograd will need them for the
gradient of the module's inputs, once that gradient is computed. The hooks are stateless objects,
so `copy.deepcopy(model)` and pickling carry them to a copy, where they serve the copy's
parameters. A standalone sharded parameter has no optimizer, so it cannot train: a forward that
would record a gradient for it raises, saying to freeze it or run under no_grad.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Dict, List

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten

from ..comm import call_tags
from .sharded_tensor import (ShardedAccessError, ShardedParameter, gather_whole, raw,
                             shard_parameter, unmake_sharded)

_GATHERED = "_zs_gathered"  # module attribute: its parameters gathered by the hook


def _standalone_params(module: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for p in module._parameters.values()
            if isinstance(p, ShardedParameter) and p._zs.owner is None]


def _gather(params: List[torch.nn.Parameter], where: str) -> None:
    """Makes standalone sharded parameters whole (a collective over their group), keeping their
    shard records so they can be sharded again."""
    if not params:
        return
    spec = params[0]._zs.spec
    if spec.world_size > 1 and dist.is_available() and dist.is_initialized():
        device = call_tags.collective_device(spec.group, params[0]._zs.local.device)
        code = call_tags.encode(call_tags.MODULE, call_tags.index_of_name(where),
                                call_tags.phase())
        call_tags.exchange(spec.group, code, device, spec.rank, spec.world_size,
                           lambda kind, index: where if index == call_tags.index_of_name(where)
                           else f"another module (tag {index})")
    by_kind: Dict[tuple, list] = OrderedDict()
    for p in params:
        by_kind.setdefault((p._zs.local.dtype, p._zs.local.device), []).append(p)
    for group in by_kind.values():
        for p, whole in zip(group, gather_whole(group)):
            unmake_sharded(p, whole)


def _reshard(params: List[torch.nn.Parameter]) -> None:
    for p in params:
        if not isinstance(p, ShardedParameter) and "_zs" in p.__dict__:
            shard_parameter(p, p._zs)


class GatherBeforeForward:
    """Forward pre-hook: gathers the module's own standalone sharded parameters."""

    @torch.compiler.disable  # a collective: never traced
    def __call__(self, module: torch.nn.Module, args) -> None:
        params = _standalone_params(module)
        if not params:
            return
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            name = next(p for p in params if p.requires_grad)._zs.spec.name
            raise ShardedAccessError(
                f"{name} is sharded by zeroshard and belongs to no optimizer, so it cannot be "
                "trained, yet this forward records its gradient. Run the model under "
                "torch.no_grad() (an EMA, a teacher, a reference model), freeze it with "
                "model.requires_grad_(False), or give the model to a stage-3 optimizer.")
        with raw():
            _gather(params, params[0]._zs.spec.name.rsplit(".", 1)[0] or "<module>")
        module.__dict__[_GATHERED] = params


class ReshardAfterForward:
    """Forward hook: shards them again, or once the gradient of the inputs is computed."""

    @torch.compiler.disable
    def __call__(self, module: torch.nn.Module, args, output) -> None:
        params = module.__dict__.pop(_GATHERED, None)
        if not params:
            return
        inputs = [t for t in tree_flatten(args)[0]
                  if isinstance(t, torch.Tensor) and t.requires_grad]
        if torch.is_grad_enabled() and inputs:
            torch.autograd.graph.register_multi_grad_hook(
                inputs, lambda grads, params=params: _reshard(params), mode="all")
            return
        _reshard(params)


def install_gather_hooks(module: torch.nn.Module, recurse: bool = True) -> None:
    """Every submodule (or only `module`) that holds parameters of its own gets the pair of
    hooks, once."""
    for m in (module.modules() if recurse else [module]):
        if m.__dict__.get("_zs_gather_hooks") or not any(
                p is not None for p in m._parameters.values()):
            continue
        m.register_forward_pre_hook(GatherBeforeForward())
        m.register_forward_hook(ReshardAfterForward())
        m.__dict__["_zs_gather_hooks"] = True


@contextlib.contextmanager
def full_params(module: torch.nn.Module, writeback: bool = False):
    """Inside the block every sharded parameter of `module` is whole on every rank (a collective:
    every rank must enter it). writeback=True keeps the changes made inside (into the shards and
    the optimizer's fp32 masters); otherwise they are dropped when the block ends. Parameters a
    stage-3 optimizer owns are gathered by `optimizer.full_params`; others (sharded_init, copies)
    here. On a module with no sharded parameter it does nothing."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"full_params takes the model (an nn.Module), got {type(module).__name__}")
    params = list(OrderedDict.fromkeys(module.parameters()))
    optimizers = []
    for p in params:
        shard = p.__dict__.get("_zs")
        owner = shard.owner() if shard is not None and shard.owner is not None else None
        if owner is not None and all(o is not owner for o in optimizers):
            optimizers.append(owner)
    standalone = [p for p in params if isinstance(p, ShardedParameter) and p._zs.owner is None]
    with contextlib.ExitStack() as stack:
        for opt in optimizers:
            stack.enter_context(opt.full_params(writeback=writeback))
        with raw():
            _gather(standalone, "zeroshard.full_params")
        try:
            yield module
            if writeback:
                with raw(), torch.no_grad():
                    for p in standalone:
                        p._zs.local.copy_(p._zs.spec.take(p.data))
        finally:
            _reshard(standalone)
