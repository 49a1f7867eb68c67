"""ZeroTrainer: a Hugging Face `transformers.Trainer` that trains with a zeroshard optimizer.

    from zeroshard.integrations.transformers import ZeroTrainer
    trainer = ZeroTrainer(model=model, args=args, train_dataset=ds, zero_stage=2)  # was Trainer
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)

Owns the three places where the Trainer (transformers 5.23, accelerate 1.15) would do the
data-parallel work itself or assume a replicated optimizer:
- the optimizer: `zeroshard.ZeroAdamW` in place of `torch.optim.AdamW`, built from the
  TrainingArguments with the Trainer's own param groups (`create_optimizer`);
- the model wrapper: accelerate must not wrap the model in DistributedDataParallel, because the
  optimizer reduces the gradients itself (`_wrap_model`);
- checkpoints: the optimizer state is spread over the ranks, so every rank saves and loads its
  shard (`_save_optimizer_and_scheduler`, `_load_optimizer_and_scheduler`).

Everything else stays on the Trainer's own code path, which zeroshard's optimizer serves as it
serves a plain training loop: gradient accumulation through accelerate's `no_sync(model)` (the
optimizer gives the model a `no_sync()`), clipping and the logged `grad_norm` through
`torch.nn.utils.clip_grad_norm_` on the optimizer's gradient handles, `model.zero_grad()`
after each step.

Knows the Trainer's and accelerate's hooks and zeroshard's public API, nothing of its internals.
Imported only on demand: `import zeroshard` does not import transformers.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
import transformers
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_pt_utils import reissue_pt_warnings

import zeroshard
from zeroshard.checkpoint.sharded_files import unwrap_optimizer as _unwrap_optimizer
from zeroshard.zero_optimizer import ZeroOptimizer

__all__ = ["ZeroTrainer", "ZeroTrainerMixin", "OPTIMIZER_SHARDS_DIR"]

# Sub-directory of a Trainer checkpoint (output_dir/checkpoint-N/) holding the zeroshard
# checkpoint: every rank's optimizer shard, loadable at any world size and stage.
OPTIMIZER_SHARDS_DIR = "zeroshard_optimizer"

# Keys the TrainingArguments own: setting them in zero_kwargs too would leave two sources.
_FROM_TRAINING_ARGS = {
    "lr": "TrainingArguments(learning_rate=...)",
    "betas": "TrainingArguments(adam_beta1=..., adam_beta2=...)",
    "eps": "TrainingArguments(adam_epsilon=...)",
    "weight_decay": "TrainingArguments(weight_decay=...)",
    "stage": "ZeroTrainer(zero_stage=...)",
}


class ZeroTrainerMixin:
    """The ZeroTrainer behaviour, for mixing into any Trainer subclass (e.g. trl's SFTTrainer):
    `class MyTrainer(ZeroTrainerMixin, SFTTrainer): pass`.

    zero_stage: 0, 1, 2 or 3 (see zeroshard.ZeroOptimizer; at 3 the model is passed as
    module= and saving gathers the whole weights on every rank, rank 0 writing). zero_kwargs: further ZeroAdamW
    arguments (bucket_mb, overlap, reduce_dtype, timeout_s, process_group...); the
    hyper-parameters come from the TrainingArguments as for the Trainer's AdamW. Both apply to
    the optimizer ZeroTrainer builds; an optimizer passed in `optimizers=(opt, None)` must be a
    zeroshard optimizer and keeps its own settings.
    """

    def __init__(self, *args, zero_stage: int = 2, zero_kwargs: Optional[Dict[str, Any]] = None,
                 **kwargs) -> None:
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
        if zero_kwargs is not None and not isinstance(zero_kwargs, dict):
            raise TypeError(f"zero_kwargs must be a dict of ZeroAdamW arguments, got "
                            f"{type(zero_kwargs).__name__}")
        zero_kwargs = dict(zero_kwargs or {})
        for key in zero_kwargs:
            if key in _FROM_TRAINING_ARGS:
                raise ValueError(f"zero_kwargs[{key!r}]: set it with {_FROM_TRAINING_ARGS[key]}, "
                                 "which ZeroTrainer reads as the Trainer does for its AdamW")
        self.zero_stage = zero_stage
        self.zero_kwargs = zero_kwargs
        super().__init__(*args, **kwargs)
        # Trainer.create_optimizer instantiates `optimizer_cls_and_kwargs`; ZeroTrainer sets it
        # to zeroshard's optimizer on every call, so remember what the user gave.
        self._user_optimizer_cls_and_kwargs = self.optimizer_cls_and_kwargs
        self._check_setup()

    def _check_setup(self) -> None:
        given = _unwrap_optimizer(self.optimizer)
        if given is not None and not isinstance(given, ZeroOptimizer):
            raise TypeError(
                f"ZeroTrainer trains with a zeroshard optimizer, got {type(given).__name__} in "
                "optimizers=(...). Pass a zeroshard optimizer (zeroshard.ZeroAdamW(...)) or none: "
                "ZeroTrainer then builds ZeroAdamW from the TrainingArguments.")
        user = self._user_optimizer_cls_and_kwargs
        if user is not None and not (isinstance(user[0], type)
                                     and issubclass(user[0], ZeroOptimizer)):
            raise TypeError(f"optimizer_cls_and_kwargs names {user[0]!r}; ZeroTrainer needs a "
                            "zeroshard optimizer class (zeroshard.ZeroAdamW, ZeroSGD...)")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or self.args.fsdp:
            raise ValueError("ZeroTrainer shards the optimizer with zeroshard; DeepSpeed and FSDP "
                             "shard it their own way. Drop the deepspeed/fsdp TrainingArguments "
                             "or use the plain Trainer with them.")
        if self.args.n_gpu > 1:
            raise ValueError(f"this process sees {self.args.n_gpu} GPUs and the Trainer would "
                             "use torch.nn.DataParallel; zeroshard runs one process per device: "
                             "launch with torchrun --nproc_per_node=N")

    @property
    def zero_optimizer(self) -> ZeroOptimizer:
        """The zeroshard optimizer (self.optimizer is accelerate's wrapper around it once
        training has started)."""
        optimizer = _unwrap_optimizer(self.optimizer)
        if optimizer is None:
            raise RuntimeError("no optimizer yet: train() creates it (create_optimizer())")
        return optimizer

    # ---- optimizer ---------------------------------------------------------------------------

    def zero_optimizer_cls_and_kwargs(self, model: torch.nn.Module) -> Tuple[type, Dict[str, Any]]:
        """The zeroshard optimizer class and arguments that replace what the TrainingArguments
        ask of the Trainer (AdamW's lr, betas, eps; weight decay comes with the param groups)."""
        # Stage 3 gathers parameters module by module: it needs the model itself.
        module = {"module": model} if self.zero_stage == 3 else {}
        if self._user_optimizer_cls_and_kwargs is not None:
            cls, kwargs = self._user_optimizer_cls_and_kwargs
            return cls, {"stage": self.zero_stage, **module, **self.zero_kwargs, **kwargs}
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        if cls is not torch.optim.AdamW:
            raise ValueError(
                f"TrainingArguments(optim={str(self.args.optim)!r}) asks for {cls.__name__}; "
                "ZeroTrainer replaces the Trainer's AdamW (optim='adamw_torch' or "
                "'adamw_torch_fused') with zeroshard.ZeroAdamW. For another zeroshard optimizer "
                "pass optimizer_cls_and_kwargs=(zeroshard.ZeroSGD, {...}).")
        kwargs = dict(kwargs)
        kwargs.pop("fused", None)  # zeroshard's update is one fused kernel already
        return zeroshard.ZeroAdamW, {**kwargs, "stage": self.zero_stage, **module,
                                     **self.zero_kwargs}

    def create_optimizer(self, model=None):
        # Trainer.create_optimizer builds the decay / no-decay param groups and instantiates
        # `optimizer_cls_and_kwargs`: handing it zeroshard's class keeps its grouping rules.
        if self.optimizer is None:
            self.optimizer_cls_and_kwargs = self.zero_optimizer_cls_and_kwargs(
                self.model if model is None else model)
        return super().create_optimizer(model)

    # ---- model wrapper -----------------------------------------------------------------------

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        # Trainer._prepare_for_training calls accelerator.prepare(model, optimizer) when
        # _wrap_model returns the model itself, and accelerate's prepare_model wraps it in
        # DistributedDataParallel in any multi-process run: DDP would reduce the gradients a
        # second time. accelerate's own evaluation_mode=True prepares the model without the
        # DDP wrap (autocast and torch.compile still applied) and marks it prepared, so the
        # Trainer's prepare(model, optimizer) then leaves it alone. device_placement=False:
        # the model is already on its device (Trainer.__init__ put it there) and the optimizer
        # holds its parameters; a .to() now would copy them.
        if not training:
            return super()._wrap_model(model, training, dataloader)
        if self.accelerator.unwrap_model(model, keep_torch_compile=False) is not model:
            return model  # prepared by an earlier train()
        return self.accelerator.prepare_model(model, device_placement=False, evaluation_mode=True)

    # ---- checkpoints -------------------------------------------------------------------------

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        # Every process calls save_model; the Trainer lets only rank 0 read the weights. At
        # stage 3 no rank holds them whole between steps: every rank gathers them (a
        # collective), then rank 0 writes them as the Trainer would.
        optimizer = _unwrap_optimizer(self.optimizer)
        if optimizer is None or getattr(optimizer, "units", None) is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        with optimizer.full_params():
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        if self.args.should_save:
            self._save(output_dir, state_dict=state_dict)
        return None

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # The Trainer saves optimizer.state_dict() on rank 0 only; here that is one shard of
        # many, so every rank writes its own (zeroshard.checkpoint: atomic, and loadable at any
        # world size). The scheduler is replicated: rank 0 writes it as the Trainer does.
        zeroshard.checkpoint.save(os.path.join(output_dir, OPTIMIZER_SHARDS_DIR),
                                  model=self.model, optimizer=self.zero_optimizer)
        if self.args.should_save:
            with warnings.catch_warnings(record=True) as caught:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
            reissue_pt_warnings(caught)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        if checkpoint is None:
            return
        shards = os.path.join(checkpoint, OPTIMIZER_SHARDS_DIR)
        if not os.path.isdir(shards):
            # A checkpoint of the plain Trainer: its optimizer.pt is in torch.optim's format,
            # which a zeroshard optimizer loads on every rank.
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        zeroshard.checkpoint.load(shards, model=self.model, optimizer=self.zero_optimizer)
        scheduler_file = os.path.join(checkpoint, SCHEDULER_NAME)
        if os.path.isfile(scheduler_file):
            with warnings.catch_warnings(record=True) as caught:
                self.lr_scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True))
            reissue_pt_warnings(caught)


class ZeroTrainer(ZeroTrainerMixin, transformers.Trainer):
    """transformers.Trainer training with zeroshard.ZeroAdamW at `zero_stage` (0, 1, 2 or 3)
    instead of DDP + torch.optim.AdamW; same arguments plus `zero_stage` and `zero_kwargs`."""
