"""ZeroAccelerator: an `accelerate.Accelerator` whose data-parallel work is zeroshard's.

    from zeroshard.integrations.accelerate import ZeroAccelerator
    accelerator = ZeroAccelerator(gradient_accumulation_steps=2)             # was Accelerator(...)
    optimizer = zeroshard.ZeroAdamW(model.parameters(), lr=3e-4, stage=2)    # was torch.optim.AdamW
    model, optimizer, train_dl, lr_scheduler = accelerator.prepare(model, optimizer, train_dl,
                                                                   lr_scheduler)
    # the loop as it was: accelerator.accumulate(model), accelerator.backward(loss),
    # accelerator.clip_grad_norm_(...), accelerator.save_state(dir), accelerator.load_state(dir)

Owns the four places where accelerate (1.15) would do the data-parallel work itself or assume a
replicated model and optimizer, as its DeepSpeed and FSDP code paths do for those engines:
- `prepare_model`: a model trained by a zeroshard optimizer is not wrapped in
  DistributedDataParallel (the optimizer reduces the gradients itself); device placement,
  autocast and torch.compile stay accelerate's;
- `clip_grad_norm_`: the optimizer's global norm over every shard (`opt.clip_grad_norm_`);
- `get_state_dict`: whole tensors at stage 3 too (a collective: every rank calls it, as with
  DeepSpeed ZeRO-3), so `save_pretrained(state_dict=accelerator.get_state_dict(model))` works;
- `save_state` / `load_state`: each zeroshard model and its optimizer go to a
  `zeroshard.checkpoint` in `<dir>/zeroshard_<i>/` (every rank writes its shard; it loads at
  another world size or stage); accelerate saves and restores the rest as usual (schedulers,
  dataloader positions, GradScaler, RNG states, registered objects).

Everything else (accumulation through the model's `no_sync()`, which zeroshard installs,
`sync_gradients`, the optimizer and scheduler wrappers, `unwrap_model`) is accelerate's own code,
which a zeroshard optimizer serves as it serves a plain loop. Models trained by a torch.optim
optimizer next to it keep accelerate's usual DDP wrapper.

Knows accelerate's Accelerator methods and zeroshard's public API. Imported only on demand.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional, Tuple

import torch
from accelerate import Accelerator

import zeroshard
from zeroshard.checkpoint.sharded_files import unwrap_optimizer
from zeroshard.sharding.owning_modules import NoSyncMethod
from zeroshard.sharded_params.sharded_tensor import ShardedParameter
from zeroshard.zero_optimizer import ZeroOptimizer

__all__ = ["ZeroAccelerator", "CHECKPOINT_DIR"]

CHECKPOINT_DIR = "zeroshard_{}"  # under a save_state directory, one per zeroshard model


def _bare(model: torch.nn.Module) -> torch.nn.Module:
    """The module under torch.compile's wrapper."""
    return getattr(model, "_orig_mod", model)


def _zero_optimizer_of(model: torch.nn.Module) -> Optional[ZeroOptimizer]:
    """The zeroshard optimizer that trains `model` (it installs its no_sync on the model)."""
    no_sync = getattr(_bare(model), "__dict__", {}).get("no_sync")
    if isinstance(no_sync, NoSyncMethod):
        return no_sync._optimizer()
    return None


def _is_zero_model(model: torch.nn.Module) -> bool:
    return _zero_optimizer_of(model) is not None or any(
        isinstance(p, ShardedParameter) for p in _bare(model).parameters())


class ZeroAccelerator(Accelerator):
    """accelerate.Accelerator (same constructor arguments) for models trained by zeroshard
    optimizers; see the module docstring for what differs."""

    def prepare_model(self, model: torch.nn.Module, device_placement: Optional[bool] = None,
                      evaluation_mode: bool = False):
        if _is_zero_model(model):
            # evaluation_mode: accelerate's path without the DDP wrapper (placement, autocast,
            # compile); the zeroshard optimizer does the data-parallel reduction.
            evaluation_mode = True
        return super().prepare_model(model, device_placement=device_placement,
                                     evaluation_mode=evaluation_mode)

    # ---- the zeroshard models and their optimizers -----------------------------------------

    def _zero_pairs(self) -> List[Tuple[torch.nn.Module, ZeroOptimizer]]:
        """(model, its zeroshard optimizer) for each prepared model a zeroshard optimizer trains,
        in prepare order."""
        pairs = []
        prepared = [unwrap_optimizer(o) for o in self._optimizers]
        for model in self._models:
            opt = _zero_optimizer_of(model)
            if opt is None:
                continue
            if all(opt is not p for p in prepared):
                raise ValueError(
                    "a model trained by a zeroshard optimizer was prepared, but not its optimizer: "
                    "pass the optimizer to accelerator.prepare() too, so that save_state and "
                    "clip_grad_norm_ reach it")
            pairs.append((_bare(model), opt))
        return pairs

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        """The global norm over every shard and rank, clipped inside the next step's kernel
        (zeroshard's `clip_grad_norm_`); other parameters go to accelerate's own."""
        parameters = list(parameters)
        ids = {id(p) for p in parameters}
        for model, opt in self._zero_pairs():
            mine = {id(p) for g in opt.param_groups for p in g["params"]}
            if ids and ids <= mine | {id(p) for p in model.parameters()}:
                self.unscale_gradients()  # a GradScaler's unscale_ first, as accelerate does
                return opt.clip_grad_norm_(max_norm, norm_type)
        return super().clip_grad_norm_(parameters, max_norm, norm_type)

    def get_state_dict(self, model, unwrap: bool = True):
        """Whole tensors also where parameters are sharded (stage 3): every rank must call it."""
        bare = _bare(self.unwrap_model(model) if unwrap else model)
        if not any(isinstance(p, ShardedParameter) for p in bare.parameters()):
            return super().get_state_dict(model, unwrap=unwrap)
        with zeroshard.full_params(bare):
            return {k: v.detach().clone() for k, v in bare.state_dict().items()}

    # ---- checkpoints -------------------------------------------------------------------------

    def save_state(self, output_dir: Optional[str] = None, safe_serialization: bool = True,
                   **save_model_func_kwargs):
        """accelerate's save_state for everything but the zeroshard models and optimizers, which
        every rank writes as zeroshard checkpoints in `<dir>/zeroshard_<i>/` (a collective)."""
        pairs = self._zero_pairs()
        if not pairs:
            return super().save_state(output_dir, safe_serialization, **save_model_func_kwargs)
        with self._without(pairs):
            location = super().save_state(output_dir, safe_serialization,
                                          **save_model_func_kwargs)
        for i, (model, opt) in enumerate(pairs):
            zeroshard.checkpoint.save(os.path.join(location, CHECKPOINT_DIR.format(i)),
                                      model=model, optimizer=opt)
        return location

    def load_state(self, input_dir: Optional[str] = None, load_kwargs: Optional[dict] = None,
                   **load_model_func_kwargs):
        """accelerate's load_state for the rest, then each zeroshard model and optimizer from its
        checkpoint (any world size or stage); every rank must call it."""
        pairs = self._zero_pairs()
        if not pairs:
            return super().load_state(input_dir, load_kwargs, **load_model_func_kwargs)
        input_dir = self._state_dir(input_dir)
        missing = [CHECKPOINT_DIR.format(i) for i in range(len(pairs))
                   if not os.path.isdir(os.path.join(input_dir, CHECKPOINT_DIR.format(i)))]
        if missing:
            raise ValueError(
                f"{input_dir} has no {', '.join(missing)}: it was not saved by "
                "ZeroAccelerator.save_state with these zeroshard optimizers (a stock Accelerator "
                "saves one rank's optimizer shard only). Load a checkpoint written by "
                "ZeroAccelerator, or start the optimizer anew.")
        with self._without(pairs):
            result = super().load_state(input_dir, load_kwargs, **load_model_func_kwargs)
        for i, (model, opt) in enumerate(pairs):
            zeroshard.checkpoint.load(os.path.join(input_dir, CHECKPOINT_DIR.format(i)),
                                      model=model, optimizer=opt)
        return result

    def _state_dir(self, input_dir: Optional[str]) -> str:
        """The directory load_state reads, found as accelerate finds it."""
        if input_dir is not None:
            input_dir = os.path.expanduser(input_dir)
            if not os.path.isdir(input_dir):
                raise ValueError(f"Tried to find {input_dir} but folder does not exist")
            return input_dir
        if not self.project_configuration.automatic_checkpoint_naming:
            raise ValueError("No input_dir provided and automatic checkpoint naming is disabled.")
        root = os.path.join(self.project_dir, "checkpoints")
        folders = [os.path.join(root, f) for f in os.listdir(root)]
        folders.sort(key=lambda f: [int(n) for n in re.findall(r"[\/]?([0-9]+)(?=[^\/]*$)", f)][0])
        return folders[-1]

    class _Hidden:
        def __init__(self, accelerator, pairs) -> None:
            self.accelerator, self.pairs = accelerator, pairs

        def __enter__(self):
            a = self.accelerator
            models = {id(m) for m, _ in self.pairs}
            opts = {id(o) for _, o in self.pairs}
            self.saved = (a._models, a._optimizers)
            a._models = [m for m in a._models if id(_bare(m)) not in models]
            a._optimizers = [o for o in a._optimizers if id(unwrap_optimizer(o)) not in opts]

        def __exit__(self, *exc) -> None:
            self.accelerator._models, self.accelerator._optimizers = self.saved

    def _without(self, pairs):
        """Inside: accelerate's lists of models and optimizers leave out the zeroshard ones."""
        return ZeroAccelerator._Hidden(self, pairs)
