"""What an optimizer was given: torch.optim's params argument (a module, tensors, (name, tensor)
pairs or group dicts) turned into param groups with a readable name for every tensor, and the
refusals that protect the flat buffers before anything is built (a parameter listed twice, a
model wrapped in DistributedDataParallel, parameters on several devices or of an untrained dtype). Knows nothing of stages, buckets or collectives.
"""
from __future__ import annotations

from typing import Dict

import torch

from .owning_modules import ddp_wrapper_name


def split_names(params) -> tuple:
    """Accepts a module, tensors, (name, tensor) pairs or group dicts; returns torch.optim's
    param list/groups plus a name for every tensor (for error messages)."""
    if isinstance(params, torch.nn.Module):
        if isinstance(params, torch.nn.parallel.DistributedDataParallel):
            raise ValueError("the model is wrapped in DistributedDataParallel: zeroshard reduces "
                             "gradients itself, so DDP would reduce them twice. Pass the bare "
                             "module's parameters (ddp_model.module.parameters()).")
        params = params.named_parameters()
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or dicts, not a single tensor")
    items = list(params)
    if not items:
        raise ValueError("the optimizer got an empty parameter list")
    names: Dict[int, str] = {}

    def strip(seq, prefix):
        out = []
        for i, item in enumerate(seq):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                names[id(item[1])] = item[0]
                out.append(item[1])
            else:
                names.setdefault(id(item), f"{prefix}[{i}] (shape {tuple(getattr(item, 'shape', ()))})")
                out.append(item)
        return out

    if isinstance(items[0], dict):
        groups = []
        for gi, g in enumerate(items):
            g = dict(g)
            ps = g["params"]
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            g["params"] = strip(ps, f"param_groups[{gi}].params")
            groups.append(g)
        return groups, names
    return strip(items, "params"), names


def reject_ddp_wrapped(params, names: Dict[int, str], *, after: bool = False) -> None:
    """A DistributedDataParallel module already all-reduces these parameters' gradients; a
    second reduction by zeroshard would be wasted traffic at best (and DDP would reduce the
    zeros left by zeroshard's hooks)."""
    name = ddp_wrapper_name(params, names)
    if name is not None:
        when = ("was wrapped in DistributedDataParallel after the optimizer was built"
                if after else "belongs to a model wrapped in DistributedDataParallel")
        raise ValueError(
            f"{name} {when}, which reduces its gradients a second time. Drop the DDP wrapper: "
            f"zeroshard's optimizer does the data-parallel reduction itself. {_framework_hint()}")


def _framework_hint() -> str:
    """Where the wrapper comes from, judged by the frameworks loaded, and zeroshard's way
    through each."""
    import sys
    hints = []
    if "transformers" in sys.modules:
        hints.append("with the Hugging Face Trainer use "
                     "zeroshard.integrations.transformers.ZeroTrainer")
    if "accelerate" in sys.modules:
        hints.append("with accelerate use zeroshard.integrations.accelerate.ZeroAccelerator in "
                     "place of accelerate.Accelerator")
    if "pytorch_lightning" in sys.modules or "lightning" in sys.modules:
        hints.append("with Lightning use Trainer(strategy=zeroshard.integrations.lightning."
                     "ZeroStrategy())")
    if not hints:
        return "Remove the `DistributedDataParallel(model)` call from the script."
    return "(" + "; ".join(hints) + "; in a loop of your own remove the DDP(model) call.)"


def reject_duplicates(params, names: Dict[int, str]) -> None:
    """torch.optim only warns about a parameter listed twice; sharding it twice would corrupt it."""
    flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) \
        else list(params)
    seen = set()
    for p in flat:
        if id(p) in seen:
            raise ValueError(f"{names.get(id(p), 'a parameter')} is given twice (in one list or "
                             "in two param groups); list each parameter once")
        seen.add(id(p))


TRAINABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_dtypes(params, names: Dict[int, str]) -> None:
    for p in params:
        if p.dtype not in TRAINABLE_DTYPES:
            raise TypeError(f"{names[id(p)]} has dtype {p.dtype}; zeroshard trains "
                            "float32, bfloat16 and float16 parameters")


def device_of(trainable, names: Dict[int, str]) -> torch.device:
    """The one device of the trainable parameters (one optimizer serves one device), after
    checking there are some and their dtypes are ones zeroshard trains."""
    if not trainable:
        raise ValueError("no parameter requires grad: nothing to optimize")
    devices = {p.device for p in trainable}
    if len(devices) > 1:
        raise ValueError(f"parameters are on several devices {sorted(map(str, devices))}; "
                         "one optimizer serves one device (move the model first)")
    check_dtypes(trainable, names)
    return devices.pop()


def check_new_group(new, names: Dict[int, str], device: torch.device, has_scaler: bool,
                    flat_groups) -> None:
    """add_param_group's trainable parameters: on the optimizer's device, of a trained dtype,
    and float16 only where loss scaling was set up at construction."""
    for p in new:
        if p.device != device:
            raise ValueError(f"{names[id(p)]} is on {p.device}, the optimizer's other "
                             f"parameters on {device}")
    check_dtypes(new, names)
    if not has_scaler and any(p.dtype == torch.float16 for p in new) and any(
            fg.dtype != torch.float16 for fg in flat_groups):
        raise ValueError("float16 parameters need loss scaling set up at construction; "
                         "construct the optimizer with them instead of add_param_group()")


def name_from_modules(names: Dict[int, str], modules) -> None:
    """Placeholder names ("params[3] (shape ...)") become the models' parameter names."""
    for m in modules:
        for name, p in m.named_parameters(remove_duplicate=False):
            current = names.get(id(p))
            if current is not None and current.startswith(("params[", "param_groups[")):
                names[id(p)] = name
