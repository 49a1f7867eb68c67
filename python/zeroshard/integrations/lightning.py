"""ZeroStrategy: a PyTorch Lightning strategy that trains with a zeroshard optimizer.

    from zeroshard.integrations.lightning import ZeroStrategy
    class Module(pl.LightningModule):
        def configure_optimizers(self):
            return zeroshard.ZeroAdamW(self.parameters(), lr=1e-3, stage=2)  # stage 3: (self, ...)
    trainer = pl.Trainer(strategy=ZeroStrategy(), devices=N, ...)       # was strategy="ddp"
    trainer.fit(Module(), ckpt_path=...)                                # or strategy="zeroshard"

Owns the places where Lightning's DDPStrategy would do the data-parallel work itself or assume a
replicated optimizer (DeepSpeed's and FSDP's strategies take over the same ones):
- the model wrapper: no DistributedDataParallel, because the optimizer reduces the gradients
  itself during backward (`setup`);
- gradient accumulation: Lightning's `block_backward_sync` enters the optimizer's `no_sync()`;
- clipping: `gradient_clip_val` goes to the optimizer's `clip_grad_norm_` (the global norm over
  every shard, fused into the step); clipping by value is refused (`setup`, `_route_clipping`);
- checkpoints: the optimizer state is spread over the ranks, so every rank writes its shard to
  a zeroshard checkpoint next to Lightning's file, `<file>.zeroshard/` (SHARDS_SUFFIX), and
  Lightning's file keeps a marker in `optimizer_states`; at stage 3 its `state_dict` holds the
  whole weights, gathered on every rank (`save_checkpoint`, `load_checkpoint`, ...).

Everything else stays DDPStrategy's: process-group set-up, launching, samplers, barriers,
broadcasts and reductions of logged values. Knows Lightning's strategy hooks and zeroshard's
public API, nothing of zeroshard's internals. Imported only on demand: `import zeroshard` does
not import Lightning.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sys
from typing import Any, Dict, Mapping, Optional

import torch

import zeroshard
from zeroshard.checkpoint.sharded_files import unwrap_optimizer
from zeroshard.zero_optimizer import ZeroOptimizer


def _lightning():
    """The Lightning package the script uses: `pytorch_lightning`, or `lightning.pytorch` when
    only that one is installed or already imported (a strategy from one package is not a
    Strategy to the other's Trainer)."""
    if "lightning.pytorch" in sys.modules and "pytorch_lightning" not in sys.modules:
        return sys.modules["lightning.pytorch"]
    try:
        return importlib.import_module("pytorch_lightning")
    except ImportError:
        try:
            return importlib.import_module("lightning.pytorch")
        except ImportError:
            raise ImportError("zeroshard.integrations.lightning needs PyTorch Lightning: pip "
                              "install pytorch-lightning (or lightning)") from None


pl = _lightning()
_DDPStrategy = importlib.import_module(pl.__name__ + ".strategies").DDPStrategy
_StrategyRegistry = importlib.import_module(pl.__name__ + ".strategies").StrategyRegistry
_TrainerFn = importlib.import_module(pl.__name__ + ".trainer.states").TrainerFn
_sync_module_states = importlib.import_module(
    pl.__name__ + ".overrides.distributed")._sync_module_states
_MisconfigurationException = importlib.import_module(
    pl.__name__ + ".utilities.exceptions").MisconfigurationException

__all__ = ["ZeroStrategy", "SHARDS_SUFFIX", "shards_path"]

# Lightning's checkpoint file `epoch=3-step=400.ckpt` gets its optimizer shards (a
# zeroshard.checkpoint directory: every rank's shard, loadable at any world size and stage)
# in `epoch=3-step=400.ckpt.zeroshard/`.
SHARDS_SUFFIX = ".zeroshard"
# What Lightning's file holds in place of each optimizer's state dict.
_MARKER_KEY = "zeroshard_checkpoint"


def shards_path(checkpoint_path) -> str:
    """The directory of optimizer shards that belongs to Lightning checkpoint `checkpoint_path`."""
    return os.fspath(checkpoint_path) + SHARDS_SUFFIX


def _is_marker(optimizer_state: Any) -> bool:
    return isinstance(optimizer_state, Mapping) and _MARKER_KEY in optimizer_state


def _has_sharded_params(module: torch.nn.Module) -> bool:
    return any(isinstance(p, zeroshard.ShardedParameter) for p in module.parameters())


class ZeroStrategy(_DDPStrategy):
    """DDPStrategy without DistributedDataParallel, for a LightningModule whose
    `configure_optimizers` returns one zeroshard optimizer (ZeroAdamW, ZeroAdam, ZeroSGD) at any
    stage; at stage 3 it is given the module: `ZeroAdamW(self, stage=3, ...)` or
    `ZeroAdamW(groups, stage=3, module=self)`.

    Takes DDPStrategy's arguments except the ones that configure the DDP wrapper (comm hooks,
    model averaging, `find_unused_parameters`, `static_graph`...), which have nothing to act on:
    accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
    process_group_backend, timeout, start_method ("popen" launches like strategy="ddp").
    """

    strategy_name = "zeroshard"

    def __init__(self, accelerator=None, parallel_devices=None, cluster_environment=None,
                 checkpoint_io=None, precision_plugin=None,
                 process_group_backend: Optional[str] = None, timeout=None,
                 start_method: str = "popen", **ddp_kwargs: Any) -> None:
        if ddp_kwargs:
            raise TypeError(
                f"ZeroStrategy got {sorted(ddp_kwargs)}: these configure DDPStrategy's "
                "DistributedDataParallel wrapper (comm hooks, model averaging, "
                "find_unused_parameters, static_graph...), which ZeroStrategy does not use; "
                "zeroshard's optimizer reduces the gradients (a parameter without a gradient "
                "is skipped as torch.optim skips it)")
        timeout_kwargs = {} if timeout is None else {"timeout": timeout}
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin,
                         process_group_backend=process_group_backend, start_method=start_method,
                         **timeout_kwargs)
        self._loaded_shards = False  # load_checkpoint restored weights and optimizer from them

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        # DDPStrategy's would register "ddp", "ddp_spawn"... to this class.
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(cls.strategy_name, cls,
                                       description="DDP without its wrapper, for a zeroshard "
                                                   "optimizer (zeroshard.integrations.lightning)")

    # ---- the optimizer -----------------------------------------------------------------------

    @property
    def zero_optimizer(self) -> ZeroOptimizer:
        """The zeroshard optimizer that configure_optimizers returned (set up by fit)."""
        if not self.optimizers:
            raise RuntimeError("no optimizer yet: trainer.fit() builds it from "
                               "configure_optimizers")
        return unwrap_optimizer(self.optimizers[0])

    def setup_optimizers(self, trainer) -> None:
        super().setup_optimizers(trainer)
        given = [unwrap_optimizer(o) for o in self.optimizers]
        wrong = [type(o).__name__ for o in given if not isinstance(o, ZeroOptimizer)]
        if wrong:
            raise TypeError(
                f"ZeroStrategy trains with a zeroshard optimizer, but configure_optimizers "
                f"returned {', '.join(wrong)}. Return zeroshard.ZeroAdamW(self.parameters(), ...) "
                "(stage 3: ZeroAdamW(self, ..., stage=3)) or another zeroshard optimizer, or "
                "train a torch.optim optimizer with strategy=\"ddp\".")
        if len(given) != 1:
            # One zeroshard.checkpoint holds one optimizer with its model, as DeepSpeed's.
            raise ValueError(f"ZeroStrategy supports one optimizer, configure_optimizers returned "
                             f"{len(given)}: put the parameters in param groups of one zeroshard "
                             "optimizer")

    # ---- set-up and teardown -----------------------------------------------------------------

    def setup(self, trainer) -> None:
        # DDPStrategy.setup less its DDP wrapper, comm hooks and model averaging. Also not
        # `_optimizers_to_device`: zeroshard keeps its state where it belongs (on the device,
        # or in host memory with offload="cpu").
        self.accelerator.setup(trainer)
        fitting = trainer.state.fn == _TrainerFn.FITTING
        if fitting and self._layer_sync:
            self.model = self._layer_sync.apply(self.model)
        self.model = self.precision_plugin.convert_module(self.model)
        # Before the optimizer exists: it builds its flat buffers where the parameters are.
        self.model_to_device()
        if fitting:
            self._check_clipping(trainer)
            self.setup_optimizers(trainer)
        elif not _has_sharded_params(self.model):
            # Evaluating without an optimizer: DDPStrategy broadcasts rank 0's weights. A model
            # a stage-3 optimizer sharded is consistent by construction, and whole on no rank.
            _sync_module_states(self.model)
        self.setup_precision_plugin()
        self._route_clipping()

    def teardown(self) -> None:
        # As FSDPStrategy: the module and the optimizer stay where they are. Strategy.teardown
        # would move them to the CPU, under the optimizer's flat buffers (at stage 3 an error).
        pl_module = self.lightning_module
        if (pl_module is not None and pl_module._trainer is not None
                and pl_module._trainer.state.fn == _TrainerFn.FITTING and self._layer_sync):
            self.model = self._layer_sync.revert(self.model)
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    # ---- backward, accumulation, clipping ----------------------------------------------------

    def backward(self, closure_loss: torch.Tensor, optimizer, *args: Any, **kwargs: Any):
        # fp16 parameters (precision="16-true"): zeroshard divides the gradients by its loss
        # scale at step(), so the loss is scaled as opt.backward(loss) scales it.
        zero = unwrap_optimizer(self.optimizers[0]) if self.optimizers else None
        if isinstance(zero, ZeroOptimizer) and zero.scaler is not None:
            closure_loss = closure_loss.float() * zero.loss_scale
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    @contextlib.contextmanager
    def block_backward_sync(self):
        # Lightning enters this on the non-final micro-batches of accumulate_grad_batches (and
        # in LightningOptimizer.toggle_model(sync_grad=False)); DDPStrategy's looks for DDP.
        if not self.optimizers:
            yield None
            return
        with self.zero_optimizer.no_sync():
            yield None

    def _check_clipping(self, trainer) -> None:
        if trainer.gradient_clip_val and trainer.gradient_clip_algorithm == "value":
            raise _MisconfigurationException(_VALUE_CLIPPING)

    def _route_clipping(self) -> None:
        """Lightning clips through the precision plugin (`clip_gradients` from the module's
        `configure_gradient_clipping`); whichever plugin the Trainer chose (32-true, bf16-mixed,
        16-mixed...), its two clipping methods are replaced on this instance."""
        plugin = self.precision_plugin
        self._precision_plugin = plugin  # the base getter makes a new Precision() while unset

        def clip_grad_by_norm(optimizer, clip_val) -> None:
            # The global norm over every shard and rank, applied inside the step's kernel.
            zero = unwrap_optimizer(optimizer)
            if not isinstance(zero, ZeroOptimizer):
                raise TypeError(f"ZeroStrategy clips a zeroshard optimizer, got "
                                f"{type(zero).__name__}")
            zero.clip_grad_norm_(clip_val)

        def clip_grad_by_value(optimizer, clip_val) -> None:
            raise _MisconfigurationException(_VALUE_CLIPPING)

        plugin.clip_grad_by_norm = clip_grad_by_norm
        plugin.clip_grad_by_value = clip_grad_by_value

    # ---- checkpoints -------------------------------------------------------------------------

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # The shards load into the optimizer, which setup() builds (as DeepSpeed and FSDP).
        return True

    def lightning_module_state_dict(self) -> Dict[str, Any]:
        # Lightning's file keeps whole weights (load_from_checkpoint, inference). At stage 3
        # they are whole on no rank between steps: gathered here, on every rank (Lightning
        # calls this on every rank; a collective), as copies that outlive the block.
        module = self.lightning_module
        if not _has_sharded_params(module):
            return module.state_dict()
        with zeroshard.full_params(module):
            return module.state_dict()

    def optimizer_state(self, optimizer) -> Dict[str, Any]:
        # The state itself goes to every rank's shard file (save_checkpoint).
        zero = unwrap_optimizer(optimizer)
        return {_MARKER_KEY: "<checkpoint file>" + SHARDS_SUFFIX, "stage": zero.stage,
                "world_size": zero.world_size}

    def save_checkpoint(self, checkpoint: Dict[str, Any], filepath, storage_options=None) -> None:
        # Every rank calls this; rank 0's path names the checkpoint (as DeepSpeed's).
        filepath = self.broadcast(filepath)
        if self.optimizers and "optimizer_states" in checkpoint:  # not a weights-only save
            _check_local(filepath)
            # Shards first, Lightning's file last: a file that exists has its shards complete
            # (zeroshard.checkpoint commits atomically; a crash leaves the previous one).
            zeroshard.checkpoint.save(shards_path(filepath), model=self.lightning_module,
                                      optimizer=self.zero_optimizer)
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def remove_checkpoint(self, filepath) -> None:
        # ModelCheckpoint(save_top_k=...) drops old checkpoints: their shards go with them.
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            shutil.rmtree(shards_path(filepath), ignore_errors=True)

    def load_checkpoint(self, checkpoint_path,
                        weights_only: Optional[bool] = None) -> Dict[str, Any]:
        checkpoint_path = self.broadcast(checkpoint_path)
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._loaded_shards = False
        states = checkpoint.get("optimizer_states") or []
        fitting = self.lightning_module.trainer.state.fn == _TrainerFn.FITTING
        if fitting and self.optimizers and any(_is_marker(s) for s in states):
            # Weights and optimizer state from the shards, together (exact, fp32 masters
            # included; any world size). Lightning's own restore then skips both.
            zeroshard.checkpoint.load(_existing_shards(checkpoint_path),
                                      model=self.lightning_module, optimizer=self.zero_optimizer)
            self._loaded_shards = True
        return checkpoint

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self._loaded_shards:
            return
        # Lightning's whole weights (a checkpoint of strategy="ddp", or evaluation): at stage 3
        # load_state_dict writes each sharded parameter's part.
        super().load_model_state_dict(checkpoint, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self._loaded_shards:
            return
        # A torch.optim state dict (from strategy="ddp"): zeroshard loads it on every rank.
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            unwrap_optimizer(optimizer).load_state_dict(state)


_VALUE_CLIPPING = (
    "ZeroStrategy does not clip gradients by value: no rank holds a whole gradient, only its "
    "shard, and zeroshard clips the global norm. Use gradient_clip_algorithm=\"norm\" (the "
    "default) with gradient_clip_val, as DeepSpeed's strategy requires.")


def _check_local(filepath) -> None:
    if "://" in os.fspath(filepath):
        raise ValueError(f"ZeroStrategy writes the optimizer shards with zeroshard.checkpoint, to "
                         f"a local or mounted directory; {os.fspath(filepath)!r} is a URL. Save "
                         "to a shared file system path.")


def _existing_shards(checkpoint_path) -> str:
    """The shards of `checkpoint_path`, also through a link (ModelCheckpoint's save_last='link'
    makes last.ckpt a link to the newest checkpoint file)."""
    for candidate in (shards_path(checkpoint_path),
                      shards_path(os.path.realpath(os.fspath(checkpoint_path)))):
        if os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(
        f"{os.fspath(checkpoint_path)} was saved by ZeroStrategy, which keeps the optimizer "
        f"state in {shards_path(checkpoint_path)}/; that directory is missing. Copy it along with "
        "the file, or load only the weights (trainer.validate/test, or "
        "Module.load_from_checkpoint).")


ZeroStrategy.register_strategies(_StrategyRegistry)
