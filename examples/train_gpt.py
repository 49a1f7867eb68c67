"""Train the example GPT (examples/gpt.py) on synthetic tokens with zeroshard or a torch baseline.

    torchrun --nproc_per_node=2 examples/train_gpt.py --device cpu --model tiny --stage 2
    python examples/train_gpt.py --optimizer ddp --steps 50          # world size 1, no torchrun

Owns the training loop: process-group setup, the per-optimizer ways to accumulate, clip and step
(`ZeroshardSetup`, `DDPSetup`, `TorchZeroSetup`, `DeepSpeedSetup`), the progress line, and the
closing comparison of this rank's memory: ZeRO's formula, zeroshard's estimate, the optimizer's
report and the measured peak. `--batch-size` is per rank and micro-batch, so one optimizer step
sees batch_size * micro_batches * world_size sequences. DeepSpeed is optional: only
`--optimizer deepspeed` imports it (bench/bench_train.py's comparison rows).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import resource
import sys
import time
from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpt  # noqa: E402  (the example's model, next to this file)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MiB = 2 ** 20


# ---------------------------------------------------------------- arguments and process group

def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=["zeroshard", "ddp", "torch-zero", "deepspeed"],
                        default="zeroshard", help="ddp = torch DDP + AdamW (the baseline); "
                        "torch-zero = DDP + torch ZeroRedundancyOptimizer(AdamW); deepspeed = "
                        "DeepSpeed's ZeRO engine + torch AdamW (fp32, needs deepspeed)")
    parser.add_argument("--stage", type=int, default=None,
                        help="ZeRO stage: 0|1|2|3 for --optimizer zeroshard or deepspeed "
                             "(default 2)")
    parser.add_argument("--offload", choices=["none", "cpu"], default="none",
                        help="cpu: optimizer state, reduced gradients and the update in host "
                             "memory (ZeRO-Offload; zeroshard stages 1-3, or deepspeed)")
    parser.add_argument("--offload-grad-dtype", choices=["default", "fp32", "bf16"],
                        default="default",
                        help="with --offload cpu (zeroshard): the dtype gradients cross to the "
                             "host in (default: bf16 for bf16 parameters, else fp32)")
    parser.add_argument("--shard-size", default=None,
                        help="zeroshard: shard within groups of this many ranks (or 'node') and "
                             "replicate across them (hybrid sharding)")
    parser.add_argument("--node-size", type=int, default=None,
                        help="zeroshard: ranks a node (default: torchrun's LOCAL_WORLD_SIZE)")
    parser.add_argument("--quantize-weights", choices=["int8"], default=None,
                        help="zeroshard stage 3: int8 forward all-gathers (ZeRO++ qwZ)")
    parser.add_argument("--quantize-grads", choices=["int8", "int4"], default=None,
                        help="zeroshard: quantized two-hop gradient reduce-scatter (ZeRO++ qgZ)")
    parser.add_argument("--secondary-shard", choices=["node"], default=None,
                        help="zeroshard stage 3: backward gathers inside the node (ZeRO++ hpZ)")
    parser.add_argument("--model", default="tiny", help=f"one of {sorted(gpt.PRESETS)}")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="zeroshard: dtype of the model's params (fp32 master inside the "
                             "optimizer); ddp/torch-zero: fp32 params under torch.autocast")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank and "
                                                                  "micro-batch")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: the preset's)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None,
                        help="linear warm-up steps before the cosine decay (default steps//10)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0, help="max grad norm; 0 = no clipping")
    parser.add_argument("--bucket-mb", type=float, default=None,
                        help="gradient bucket size in MiB (default: zeroshard's automatic size, "
                             "25 MiB or 1/32 of the gradients if smaller, up to 1/16 below 4 MiB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=None,
                        help="steps between progress lines (default steps//10)")
    parser.add_argument("--metrics-json", default=None,
                        help="rank 0 writes step times, losses and every rank's memory here")
    args = parser.parse_args(argv)

    for name in ("steps", "micro_batches", "batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.seq_len is not None and args.seq_len <= 0:
        parser.error("--seq-len must be positive")
    if args.lr <= 0 or args.clip < 0 or args.weight_decay < 0 or (
            args.bucket_mb is not None and args.bucket_mb <= 0):
        parser.error("--lr and --bucket-mb must be positive; --clip and --weight-decay >= 0")
    if args.model not in gpt.PRESETS:
        parser.error(f"--model {args.model!r} is unknown; pick one of {sorted(gpt.PRESETS)}")
    if args.optimizer in ("zeroshard", "deepspeed"):
        args.stage = 2 if args.stage is None else args.stage
        stages = (0, 1, 2, 3)
        if args.stage not in stages:
            parser.error(f"--stage must be one of {stages} for --optimizer {args.optimizer}, "
                         f"got {args.stage}")
    elif args.stage is not None:
        parser.error(f"--stage applies to --optimizer zeroshard or deepspeed, not "
                     f"{args.optimizer}")
    if args.offload == "cpu" and not (args.optimizer in ("zeroshard", "deepspeed")
                                      and args.stage in (1, 2, 3)):
        parser.error("--offload cpu needs --optimizer zeroshard or deepspeed at --stage 1, 2 "
                     "or 3 (stage 0 and the torch baselines replicate the optimizer state)")
    if args.optimizer == "deepspeed" and args.dtype != "fp32":
        parser.error("--optimizer deepspeed runs in fp32 only (its comparison rows); drop --dtype")
    args.warmup = args.steps // 10 if args.warmup is None else args.warmup
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be in [0, --steps), got {args.warmup}")
    args.log_every = max(1, args.steps // 10) if args.log_every is None else args.log_every
    if args.log_every <= 0:
        parser.error("--log-every must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU; use --device cpu")
    return args


def init_distributed(device_kind: str):
    """(rank, world_size, device). Under torchrun: a gloo (CPU) or nccl (CUDA) group. Run as a
    plain script: world size 1 and no process group at all."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_kind)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
        # Every optimizer path (the DDP baselines too) gets zeroshard's guard against gloo's
        # abort at interpreter exit ([Note: gloo at exit] in zeroshard/comm/communicator.py).
        try:
            from zeroshard.comm.communicator import register_exit_drain
        except ImportError:  # the torch baselines also run where zeroshard is not built
            pass
        else:
            register_exit_drain()
    return dist.get_rank(), dist.get_world_size(), device


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict]:
    """Decay matrices and embeddings; leave biases and LayerNorm gains alone (GPT-2 practice)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one bucket count once)."""
    seen = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# ---------------------------------------------------------------- one setup per --optimizer

def zero_plus_plus(args) -> dict:
    """The topology-aware options given on the command line (hybrid sharding, ZeRO++)."""
    shard = args.shard_size
    options = {"shard_size": int(shard) if shard and shard.isdigit() else shard,
               "node_size": args.node_size, "quantize_weights": args.quantize_weights,
               "quantize_grads": args.quantize_grads, "secondary_shard": args.secondary_shard}
    return {k: v for k, v in options.items() if v is not None}


class ZeroshardSetup:
    """zeroshard.ZeroAdamW on the plain model: no DDP wrapper, the optimizer reduces gradients.
    At stage 3 the optimizer also owns the parameters: it gathers each block (unit) around its
    forward and backward, and outside them every parameter is sharded (whole shape, this rank's
    part of the data); the script reads whole weights only inside `whole_params()` (the
    optimizer's full_params())."""

    library = "zeroshard"  # imported before the start RSS is read (see train)

    def __init__(self, args, model, world_size: int) -> None:
        import zeroshard  # only this path needs the compiled package

        self.stage = args.stage
        self.fp16 = args.dtype == "fp16"
        self.model = model.to(DTYPES[args.dtype])
        self.forward_module = self.model  # no wrapper: the optimizer's hooks reduce grads
        # Stage 3 gathers parameters module by module, so it needs the model next to the
        # groups (the groups read p.dim() here, while the parameters are still whole).
        module = {"module": self.model} if args.stage == 3 else {}
        self.optimizer = zeroshard.ZeroAdamW(
            param_groups(self.model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95),
            eps=1e-8, weight_decay=args.weight_decay, stage=args.stage,
            bucket_mb=args.bucket_mb, offload=None if args.offload == "none" else args.offload,
            **({"offload_grad_dtype": {"fp32": torch.float32, "bf16": torch.bfloat16}[
                args.offload_grad_dtype]} if args.offload_grad_dtype != "default" else {}),
            **module, **zero_plus_plus(args))
        self.offload = args.offload == "cpu"
        self.skipped_steps = 0

    def accumulation_context(self, last_micro_batch: bool):
        return contextlib.nullcontext() if last_micro_batch else self.optimizer.no_sync()

    def autocast(self):
        return contextlib.nullcontext()  # the params already are in --dtype

    def backward(self, loss: torch.Tensor) -> None:
        if self.fp16:
            self.optimizer.backward(loss)
        else:
            loss.backward()

    def clip_and_step(self, max_norm: float) -> None:
        if max_norm > 0:
            self.optimizer.clip_grad_norm_(max_norm)
        self.optimizer.step()
        self.skipped_steps += int(self.optimizer.last_step_skipped)

    def whole_params(self):
        """Every parameter whole on every rank inside (a collective at stage 3: every rank
        enters it); changes made inside are discarded."""
        return self.optimizer.full_params()

    def memory(self) -> Dict[str, int]:
        return dict(self.optimizer.memory_report())

    def label(self) -> str:
        return f"zeroshard ZeroAdamW stage {self.stage}" + (" + CPU offload" if self.offload
                                                           else "")


class DDPSetup:
    """torch DDP + torch.optim.AdamW, fp32 params; bf16/fp16 through torch.autocast (+GradScaler
    for fp16). gradient_as_bucket_view=True keeps one grad copy: the strongest DDP baseline."""

    library = None

    def __init__(self, args, model, world_size: int) -> None:
        self.model = model
        self.device_type = next(model.parameters()).device.type
        self.dtype = DTYPES[args.dtype]
        self.forward_module = model
        if dist.is_initialized():
            # Forward must go through the wrapper: DDP arms its reducer (and no_sync) there.
            self.forward_module = torch.nn.parallel.DistributedDataParallel(
                model, gradient_as_bucket_view=True)
        self.optimizer = self.make_optimizer(args, model)
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=args.dtype == "fp16")
        self.skipped_steps = 0

    def make_optimizer(self, args, model):
        return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                 betas=(0.9, 0.95), eps=1e-8, weight_decay=args.weight_decay)

    def accumulation_context(self, last_micro_batch: bool):
        if last_micro_batch or self.forward_module is self.model:
            return contextlib.nullcontext()
        return self.forward_module.no_sync()

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def clip_and_step(self, max_norm: float) -> None:
        if max_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.is_enabled() and self.scaler.get_scale() < scale_before:
            self.skipped_steps += 1  # GradScaler shrinks the scale only when it skipped

    def whole_params(self):
        return contextlib.nullcontext()  # every rank holds the whole model

    def optimizer_state_tensors(self) -> List[torch.Tensor]:
        return [t for state in self.optimizer.state.values() for t in state.values()
                if torch.is_tensor(t)]

    def memory(self) -> Dict[str, int]:
        params = list(self.model.parameters())
        report = {"model_params": storage_bytes(params),
                  "grads": storage_bytes(p.grad for p in params if p.grad is not None),
                  "master_params": 0,
                  "optimizer_state": storage_bytes(self.optimizer_state_tensors()),
                  "comm_buffers": 0}
        report["total"] = sum(report.values())
        return report

    def label(self) -> str:
        return "torch DDP + AdamW"


class TorchZeroSetup(DDPSetup):
    """DDP + torch.distributed.optim.ZeroRedundancyOptimizer(AdamW): torch's own ZeRO-1."""

    def make_optimizer(self, args, model):
        if not dist.is_initialized():
            raise RuntimeError("--optimizer torch-zero needs a process group: launch with "
                               "torchrun (--nproc_per_node=1 is fine)")
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(
            param_groups(model, args.weight_decay), optimizer_class=torch.optim.AdamW,
            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=args.weight_decay)

    def optimizer_state_tensors(self) -> List[torch.Tensor]:
        local = self.optimizer.optim  # this rank's AdamW over its partition
        return [t for state in local.state.values() for t in state.values() if torch.is_tensor(t)]

    def label(self) -> str:
        return "torch DDP + ZeroRedundancyOptimizer(AdamW)"


class DeepSpeedSetup:
    """DeepSpeed's engine at its ZeRO stage with torch.optim.AdamW as the client optimizer, fp32:
    the benchmark's comparison rows. Same hyperparameters, clipping, schedule and bucket size as
    ZeroshardSetup; gloo or nccl from the process group init_distributed made."""

    library = "deepspeed"

    def __init__(self, args, model, world_size: int) -> None:
        if not dist.is_initialized():
            raise RuntimeError("--optimizer deepspeed needs a process group: launch with "
                               "torchrun (--nproc_per_node=1 is fine)")
        import deepspeed  # optional: only this path needs it

        self.stage = args.stage
        self.model = model
        # The client, not DeepSpeed's fused Adam: DeepSpeed's ops are not built on CPU. With
        # --offload cpu DeepSpeed wants its own CPU Adam (JIT-built on first use).
        self.offload = args.offload == "cpu"
        if self.offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            self.optimizer = DeepSpeedCPUAdam(
                param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95),
                eps=1e-8, weight_decay=args.weight_decay, adamw_mode=True)
        else:
            self.optimizer = torch.optim.AdamW(
                param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95),
                eps=1e-8, weight_decay=args.weight_decay)
        bucket_mb = args.bucket_mb
        if bucket_mb is None:  # the size zeroshard picks for this model, so the rows compare
            from zeroshard.sharding.buffer_ring import auto_bucket_mb
            bucket_mb = auto_bucket_mb(sum(p.numel() for p in model.parameters()), 4)
        bucket_elems = int(bucket_mb * MiB) // 4  # fp32 elements, as --bucket-mb is for us
        config = {
            "train_micro_batch_size_per_gpu": args.batch_size,
            "gradient_accumulation_steps": args.micro_batches,
            "gradient_clipping": args.clip,  # global norm, as clip_grad_norm_; 0 = none
            "zero_optimization": {"stage": args.stage, "reduce_bucket_size": bucket_elems,
                                  "allgather_bucket_size": bucket_elems,
                                  **({"offload_optimizer": {"device": "cpu"}}
                                     if self.offload else {})},
            "zero_allow_untested_optimizer": True,  # a torch optimizer, not a DeepSpeed one
            "steps_per_print": 2 ** 31 - 1,
        }
        # DeepSpeed joins the existing process group; its ZeRO wrapper keeps the client's
        # param_group dicts (swapping in its flat fp32 shards), so the lr scheduler built on
        # self.optimizer steers DeepSpeed's steps and zero_grad on it is harmless.
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                    config=config)
        self.forward_module = self.engine
        self.skipped_steps = 0  # fp32: no loss scaler, no skipped steps

    def accumulation_context(self, last_micro_batch: bool):
        # The loop steps once per global step: DeepSpeed's documented manual-boundary pattern.
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already divided the loss

    def clip_and_step(self, max_norm: float) -> None:
        self.engine.step()  # clips to the config's gradient_clipping (= --clip) and zeroes grads

    def whole_params(self):
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed  # ZeRO-3 partitions the parameters: gather them (every rank enters)
        return deepspeed.zero.GatheredParameters(list(self.model.parameters()))

    def memory(self) -> Dict[str, int]:
        """Bytes of the tensors alive after the step (DeepSpeed frees its gradient partitions
        in step(), so grads are mostly 0 here; the measured peak holds them)."""
        # Stage 3 leaves each parameter empty and keeps this rank's partition in ds_tensor.
        params = [getattr(p, "ds_tensor", p) for p in self.model.parameters()]
        master = [p for group in self.optimizer.param_groups for p in group["params"]]
        grads = [t.grad for t in list(self.model.parameters()) + master if t.grad is not None]
        buffers = getattr(self.engine.optimizer, "ipg_buffer", None) or []
        report = {"model_params": storage_bytes(params), "grads": storage_bytes(grads),
                  "master_params": storage_bytes(master),
                  "optimizer_state": storage_bytes(
                      t for state in self.optimizer.state.values() for t in state.values()
                      if torch.is_tensor(t)),
                  "comm_buffers": storage_bytes(buffers)}
        report["total"] = sum(report.values())
        return report

    def label(self) -> str:
        return (f"DeepSpeed ZeRO-{self.stage} engine + "
                + ("CPU offload, DeepSpeedCPUAdam" if self.offload else "torch AdamW"))


SETUPS = {"zeroshard": ZeroshardSetup, "ddp": DDPSetup, "torch-zero": TorchZeroSetup,
          "deepspeed": DeepSpeedSetup}


# ---------------------------------------------------------------- reporting

# The ZeRO stage whose formula describes a torch baseline's model states.
BASELINE_STAGES = {"ddp": 0, "torch-zero": 1}


def expected_memory(args, param_numels: List[int], world: int, device: torch.device,
                    model: Optional[torch.nn.Module] = None) -> Dict:
    """This rank's model-state bytes before training, from zeroshard.estimate: ZeRO's closed
    form for the run's stage (DDP = stage 0, torch's ZeroRedundancyOptimizer = stage 1) and the
    estimator's count for zeroshard at that stage. Fields the estimator cannot give are None,
    with the reason in "note". At stage 3 the estimator also needs each parameter's unit, which
    it reads from `model` (still whole: called before the optimizer partitions it)."""
    stage = BASELINE_STAGES.get(args.optimizer, args.stage)
    dtype = args.dtype if args.optimizer == "zeroshard" else "fp32"  # autocast keeps fp32 params
    numel = sum(param_numels)
    ddp_world = world
    secondary = {}
    if args.optimizer == "zeroshard":
        # hybrid sharding holds what plain ZeRO holds at world size k; hpZ adds a node's copy
        from zeroshard.comm.topology import topology_of  # the optimizer's node rule
        node = topology_of(world, getattr(args, "node_size", None)).node_size
        shard_size = getattr(args, "shard_size", None)
        if shard_size is not None:
            world = node if shard_size == "node" else int(shard_size)
        if getattr(args, "secondary_shard", None):
            secondary = {"secondary_shard_ranks": node}
    expected = {"stage": stage, "dtype": dtype, "formula": "n/a", "formula_bytes": None,
                "ddp_formula_bytes": None, "estimate_bytes": None, "estimate": None, "note": ""}
    try:
        from zeroshard import estimate
    except ImportError as error:  # the torch baselines also run where zeroshard is not built
        expected["note"] = f"zeroshard.estimate is not importable: {error}"
        return expected
    expected["ddp_formula_bytes"] = estimate.zero_formula_bytes(numel, world_size=ddp_world,
                                                                stage=0)
    try:
        expected["formula"] = estimate.formula_text(stage, dtype)
        expected["formula_bytes"] = estimate.zero_formula_bytes(numel, world_size=world,
                                                                stage=stage, dtype=dtype)
    except ValueError:
        if stage != 3:
            raise
        expected["formula"], expected["formula_bytes"] = stage3_formula(estimate, numel, world,
                                                                        dtype)
    unit_args = {}
    if stage == 3 and model is not None and hasattr(estimate, "param_units_of"):
        unit_args["units"] = estimate.param_units_of(model)
    try:
        states = estimate.estimate_model_states(
            param_numels, world_size=world, stage=stage, dtype=dtype, bucket_mb=args.bucket_mb,
            backend="nccl" if device.type == "cuda" else "gloo",
            offload=getattr(args, "offload", "none"), **unit_args, **secondary)
    except ValueError as error:  # an estimator without stage 3 yet: the cell stays None
        expected["note"] = f"zeroshard.estimate: {error}"
        return expected
    expected["estimate"], expected["estimate_bytes"] = states, states["total"]
    if args.micro_batches > 1 and stage in (0, 2, 3):
        expected["note"] = ("the estimate leaves out the full-size gradient buffer that no_sync "
                            "accumulation adds at stages 0, 2 and 3")
    return expected


def stage3_formula(estimate, numel: int, world: int, dtype: str):
    """(text, bytes per rank) of ZeRO-3's closed form, for an estimator without stage 3: every
    model state partitioned, i.e. stage 0's bytes per parameter over N (fp32 Adam 16Ψ/N)."""
    per_param = estimate.zero_formula_bytes(1, world_size=1, stage=0, dtype=dtype)
    return f"{per_param}Ψ/N", -(-per_param * numel // world)


def current_rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as statm:  # Linux: sizes in pages; the 2nd is resident
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def device_peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()


def measured_peak_bytes(memory: Dict, device: torch.device) -> int:
    """The optimizer's own measurement when its report has one, else this script's."""
    measured = memory.get("measured")
    if isinstance(measured, dict) and "peak_bytes" in measured:
        return int(measured["peak_bytes"])
    return device_peak_bytes(device)


def mib(value: Optional[int], digits: int = 2) -> str:
    return "n/a" if value is None else f"{value / MiB:.{digits}f}"


def global_mean(value: torch.Tensor, world_size: int) -> float:
    value = value.detach().float().clone()
    if world_size > 1:
        dist.all_reduce(value)
    return float(value) / world_size if value.dim() == 0 else (value / world_size).tolist()


def progress_line(step: int, steps: int, loss: float, lr: float, tokens_per_s: float,
                  state_bytes: int, peak_bytes: int, device: torch.device) -> str:
    width = 20
    filled = int(width * step / steps)
    peak_name = "cuda peak" if device.type == "cuda" else "peak RSS"
    return (f"step {step:>{len(str(steps))}}/{steps} [{'#' * filled}{'.' * (width - filled)}] "
            f"loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | "
            f"model state {state_bytes / MiB:.2f} MiB | {peak_name} {peak_bytes / MiB:.0f} MiB")


def expected_line(expected: Dict) -> str:
    return (f"memory per rank, MiB: formula {expected['formula']} "
            f"{mib(expected['formula_bytes'])} | estimate {mib(expected['estimate_bytes'])}"
            + (f"  ({expected['note']})" if expected["note"] else ""))


def closing_report(args, setup, memory: Dict, expected: Dict, peak_bytes: int, numel: int,
                   world: int, rank: int, device: torch.device, first_loss: float,
                   final_loss: float, floor: float, checksum: float) -> str:
    # memory_report() may hold non-byte entries (its nested "measured"): only ints are bytes.
    parts = " | ".join(f"{k} {v / MiB:.2f}" for k, v in memory.items()
                       if k != "total" and isinstance(v, int))
    source = "memory_report()" if args.optimizer == "zeroshard" else "tensor storages"
    report = mib(memory["total"]) if args.optimizer == "zeroshard" else "-"
    peak_name = "cuda peak" if device.type == "cuda" else "peak RSS"
    return "\n".join([
        f"== memory on rank {rank} of N={world}: Ψ={numel:,} params, --dtype {args.dtype}, "
        f"{setup.label()} ==",
        f"  MiB: formula {expected['formula']} {mib(expected['formula_bytes'])} "
        f"(DDP 16Ψ {mib(expected['ddp_formula_bytes'])}) | estimate "
        f"{mib(expected['estimate_bytes'])} | report {report} | {peak_name} "
        f"{peak_bytes / MiB:.1f} (whole process)",
        f"  measured this rank ({source}): {memory['total'] / MiB:.2f} MiB  [MiB: {parts}]",
        f"final loss {final_loss:.4f} (first step {first_loss:.4f}; synthetic-data floor "
        f"~{floor:.3f} nats); skipped steps {setup.skipped_steps}",
        f"final parameter checksum {checksum:.10e} (sum of every whole parameter, in fp64)",
    ])


def param_checksum(setup, model: torch.nn.Module, shapes: List[tuple]) -> float:
    """The fp64 sum of every parameter, read whole (inside the setup's whole_params(), a
    collective where parameters are partitioned: every rank calls this). Checks each parameter
    has its recorded shape there and is an ordinary tensor, so a sharded stage-3 parameter
    cannot pass for a whole weight."""
    with setup.whole_params(), torch.no_grad():
        params = list(model.parameters())
        found = [tuple(p.shape) for p in params]
        sharded = [type(p).__name__ for p in params if type(p).__name__.startswith("Sharded")]
        if found != shapes or sharded:
            raise RuntimeError(f"whole parameters have shapes {found[:3]}..., not the recorded "
                               f"{shapes[:3]}... (still sharded: {sharded[:3]})")
        return float(sum(p.detach().double().sum() for p in params))


# ---------------------------------------------------------------- training loop

def make_scheduler(optimizer, args):
    """Linear warm-up to --lr, then cosine decay to a tenth of it, with torch's schedulers."""
    sched = torch.optim.lr_scheduler
    cosine = sched.CosineAnnealingLR(optimizer, T_max=args.steps - args.warmup,
                                     eta_min=args.lr * 0.1)
    if args.warmup == 0:
        return cosine
    warmup = sched.LinearLR(optimizer, start_factor=1.0 / (args.warmup + 1), end_factor=1.0,
                            total_iters=args.warmup)
    return sched.SequentialLR(optimizer, [warmup, cosine], milestones=[args.warmup])


def train(args) -> int:
    rank, world, device = init_distributed(args.device)
    config = gpt.preset(args.model)
    seq_len = config.default_seq_len if args.seq_len is None else args.seq_len
    if seq_len > config.block_size:
        raise ValueError(f"--seq-len {seq_len} exceeds model {args.model}'s block_size "
                         f"{config.block_size}")
    if SETUPS[args.optimizer].library:
        importlib.import_module(SETUPS[args.optimizer].library)
    # The process before the model exists (torch and the optimizer's library loaded): the part
    # of the peak RSS that no optimizer choice can save.
    start_rss = current_rss_bytes()
    model = gpt.GPT(config, seed=args.seed).to(device)
    # Shapes and counts recorded before a setup flattens or partitions the parameters (DeepSpeed
    # does; zeroshard's stage 3 keeps them sharded between steps).
    param_shapes = [tuple(p.shape) for p in model.parameters()]
    numel = model.num_parameters()
    expected = expected_memory(args, [math.prod(shape) for shape in param_shapes], world, device,
                               model)
    setup = SETUPS[args.optimizer](args, model, world)
    scheduler = make_scheduler(setup.optimizer, args)
    data = gpt.MarkovTokenStream(config.vocab_size, seed=args.seed + 1)
    global_batch = args.batch_size * world * args.micro_batches  # sequences per step
    tokens_per_step = global_batch * seq_len
    if rank == 0:
        print(f"{setup.label()} | model {args.model} ({numel:,} params) | world {world} on "
              f"{device} | {args.dtype} | global batch {global_batch} x "
              f"{seq_len} tokens ({args.micro_batches} micro-batches)", flush=True)
        print(expected_line(expected), flush=True)

    step_losses: List[torch.Tensor] = []
    step_times: List[float] = []
    memory: Dict = {}
    last_log_time, last_log_step = time.perf_counter(), 0
    last_step_bytes = None  # zeroshard: what this rank sent in the last step, by link
    for step in range(1, args.steps + 1):
        counting = step == args.steps and hasattr(setup.optimizer, "comm_stats")
        if counting:
            setup.optimizer.reset_comm_stats()
        started = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for micro in range(args.micro_batches):
            # Micro-batch-major rows: (micro, rank) owns one batch_size slice of the step.
            first_row = (micro * world + rank) * args.batch_size
            inputs, targets = data.batch(step - 1, global_batch, seq_len,
                                         slice(first_row, first_row + args.batch_size))
            inputs, targets = inputs.to(device), targets.to(device)
            with setup.accumulation_context(micro == args.micro_batches - 1):
                with setup.autocast():
                    loss = setup.forward_module(inputs, targets) / args.micro_batches
                setup.backward(loss)
            step_loss += loss.detach()
        setup.clip_and_step(args.clip)
        log_step = step % args.log_every == 0 or step in (1, args.steps)
        if log_step:
            memory = setup.memory()  # before zero_grad frees (set_to_none) the grads
        setup.optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # honest step times
        step_times.append(time.perf_counter() - started)
        step_losses.append(step_loss)
        if counting:
            stats = setup.optimizer.comm_stats().values()
            last_step_bytes = {key: sum(row.get(key, 0) for row in stats) for key in
                               ("bytes_sent", "intra_node_bytes", "inter_node_bytes")}

        if log_step:
            mean_loss = global_mean(step_loss, world)  # every rank joins the all_reduce
            now = time.perf_counter()
            tokens_per_s = tokens_per_step * (step - last_log_step) / (now - last_log_time)
            last_log_time, last_log_step = now, step
            if rank == 0:
                print(progress_line(step, args.steps, mean_loss, scheduler.get_last_lr()[0],
                                    tokens_per_s, memory["total"], device_peak_bytes(device),
                                    device),
                      flush=True)

    losses = global_mean(torch.stack(step_losses), world)
    checksum = param_checksum(setup, model, param_shapes)  # a collective at stage 3
    final_loss = sum(losses[-5:]) / len(losses[-5:])  # mean of the last steps: less noise
    peak_bytes = measured_peak_bytes(memory, device)
    rank_metrics = {"rank": rank, "peak_rss_bytes": peak_rss_bytes(),
                    "device_peak_bytes": device_peak_bytes(device), "peak_bytes": peak_bytes,
                    "start_rss_bytes": start_rss, "memory": memory,
                    "last_step_bytes": last_step_bytes}
    all_metrics = [None] * world
    if world > 1:
        dist.all_gather_object(all_metrics, rank_metrics)
    else:
        all_metrics = [rank_metrics]
    if rank == 0:
        print(closing_report(args, setup, memory, expected, peak_bytes, numel, world, rank,
                             device, losses[0], final_loss, data.entropy_floor(), checksum),
              flush=True)
        if args.metrics_json:
            with open(args.metrics_json, "w") as out:
                json.dump({"optimizer": args.optimizer, "stage": args.stage, "dtype": args.dtype,
                           "model": args.model, "params": numel, "world_size": world,
                           "step_times_s": step_times, "losses": losses,
                           "first_loss": losses[0], "final_loss": final_loss,
                           "param_checksum": checksum,
                           "formula_stage": expected["stage"], "formula": expected["formula"],
                           "formula_bytes": expected["formula_bytes"],
                           "ddp_formula_bytes": expected["ddp_formula_bytes"],
                           "estimate_bytes": expected["estimate_bytes"],
                           "estimate": expected["estimate"], "memory_note": expected["note"],
                           "ranks": all_metrics}, out, indent=1)
    if dist.is_initialized():
        # Every rank done with collectives (rank 0 was still writing its report) before the
        # process group goes away: gloo tears down badly when peers leave at different times.
        dist.barrier()
        dist.destroy_process_group()
    return 0 if math.isfinite(final_loss) else 1


if __name__ == "__main__":
    sys.exit(train(parse_args()))
