"""Finding the nn.Modules that hold an optimizer's parameters, and DDP wrappers around them.

Owns the one expensive look at the live objects (gc) that tells the optimizer which models its
parameters belong to: so it can broadcast their buffers at construction as DDP does, honour the
switches scripts set on them (`model.require_backward_grad_sync`, `model.no_sync()`), and refuse
a DistributedDataParallel wrapper that would reduce the same gradients a second time. Knows
nothing of buffers, buckets or collectives.
"""
from __future__ import annotations

import contextlib
import gc
import weakref
from typing import Dict, Iterable, List, Optional

import torch


def root_modules(params: Iterable[torch.Tensor]) -> List[torch.nn.Module]:
    """The outermost live modules whose parameters include any of `params` (DDP excluded)."""
    ids = {id(p) for p in params}
    ddp_type = torch.nn.parallel.DistributedDataParallel
    parents: Dict[int, List[torch.nn.Module]] = {}
    owners = []
    modules = [o for o in _live_objects() if isinstance(o, torch.nn.Module)]
    for m in modules:
        if isinstance(m, ddp_type):
            continue
        for child in m._modules.values():
            if child is not None:
                parents.setdefault(id(child), []).append(m)
        if any(id(p) in ids for p in m._parameters.values() if p is not None):
            owners.append(m)
    roots, seen = [], set()
    stack = list(owners)
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        ups = parents.get(id(m))
        if ups:
            stack.extend(ups)
        else:
            roots.append(m)
    return roots


def ddp_wrapper_name(params: Iterable[torch.Tensor], names: Dict[int, str]) -> Optional[str]:
    """The name of one of `params` that a live DistributedDataParallel module wraps, or None.
    DDP leaves no mark on its parameters, so this looks at every live DDP module."""
    mine = {id(p) for p in params}
    for obj in _live_objects():
        if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
            for name, p in obj.module.named_parameters():
                if id(p) in mine:
                    return names.get(id(p), name)
    return None


def _live_objects() -> list:
    """Every live nn.Module. type(), not isinstance(): isinstance reads __class__, which on
    some deprecated torch objects (torch.distributed.reduce_op) emits a FutureWarning."""
    return [o for o in gc.get_objects() if issubclass(type(o), torch.nn.Module)]


class NoSyncMethod:
    """Installed as `model.no_sync` on a root module that has none, so that code written for
    DDP (`with model.no_sync():`, accelerate's and the HF Trainer's gradient accumulation)
    skips zeroshard's reduction as it would skip DDP's. Holds the optimizer weakly and pickles
    or deep-copies to a plain no-op, so saving or copying the model never drags the optimizer
    along."""

    def __init__(self, optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)

    def __call__(self):
        optimizer = self._optimizer()
        return optimizer.no_sync() if optimizer is not None else contextlib.nullcontext()

    def __reduce__(self):
        return (_no_sync_placeholder, ())

    def __deepcopy__(self, memo):
        return _no_sync_placeholder()


def _no_sync_placeholder():
    return contextlib.nullcontext


def install_no_sync(modules, optimizer) -> None:
    """model.no_sync for each root module that has none (or an earlier optimizer's)."""
    for m in modules:
        current = getattr(m, "no_sync", None)
        if current is None or isinstance(current, NoSyncMethod):
            m.no_sync = NoSyncMethod(optimizer)


def models_want_sync(modules) -> bool:
    """DDP's switch, which scripts set on the model for gradient accumulation."""
    return all(getattr(m, "require_backward_grad_sync", True) for m in modules)
