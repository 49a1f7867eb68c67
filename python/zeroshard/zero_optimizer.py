"""ZeroOptimizer: the torch.optim.Optimizer that partitions state across data-parallel ranks.

Owns the training-step protocol shared by every ZeRO optimizer: construction checks, flattening
parameters into FlatGroups, the BucketReducer, loss scaling, global-norm clipping, the all-gather
of updated shards, reports and state_dict. Subclasses own only the maths of one shard piece
(`_init_state`, `_step_piece`, see optimizers.py).

[Note: stages] stage 0 replicates optimizer state and all-reduces gradients during backward (a
DDP replacement). Stage 1 partitions fp32 master and optimizer state; each rank accumulates its
own full-size gradient over micro-steps and the gradients are reduce-scattered once per step
(DeepSpeed's stage 1 behaviour: no overlap with backward, but no traffic per micro-step). Stage 2
reduce-scatters each bucket during backward into the rank's gradient shard. Stages 1 and 2 then
all-gather the updated shards: reduce-scatter + all-gather moves what one all-reduce moves.
Stage 3 reduces like stage 2 and also partitions the parameters: each unit's are all-gathered
before its forward and its backward and freed after (see param_units.py); the update writes
each rank's parameter shard only.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import time
import weakref
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from . import gradient_checks, memory_reports, process_memory, rank_agreement, sharded_init
from . import sharded_modules
from .bucket_reducer import BucketReducer
from .buffer_ring import auto_bucket_mb
from .communicator import Communicator, make_communicator
from .flat_group import FlatGroup
from .deferred_update import DeferredUpdate
from .simulated_communicator import simulated_if_asked
from .host_offload import HostOffload
from .exposed_grads import ExposedGrads
from . import state_dicts
from .loss_scaler import LossScaler
from .owning_modules import NoSyncMethod, root_modules
from .param_lists import reject_ddp_wrapped, reject_duplicates, split_names
from .param_units import ParamUnits, Unit, find_units, owning_units
from .param_watch import ParamWatch
from .rendezvous import bind_rendezvous_device, rendezvous_for

_SCALER_KWARGS = ("initial_scale", "growth_interval", "hysteresis", "min_scale")
# How long a collective blocked in backward may stay unfinished after another rank entered its
# next zeroshard call before this rank concludes it went past that call (see _guarded_wait).
NOT_AWAITED_GRACE_S = 2.0


class ZeroOptimizer(torch.optim.Optimizer):
    def __init__(self, params, defaults: Dict[str, Any], *, stage: int = 2,
                 process_group: Optional[dist.ProcessGroup] = None,
                 bucket_mb: Optional[float] = None,
                 overlap: bool = True, reduce_dtype: Optional[torch.dtype] = None,
                 loss_scale: Any = "dynamic", timeout_s: float = 300.0,
                 module: Optional[torch.nn.Module] = None, units=None, prefetch: int = 1,
                 reshard_after_forward: bool = True, offload: Optional[str] = None,
                 offload_grad_dtype: Optional[torch.dtype] = None,
                 partition_frozen: bool = True, **scaler_kwargs) -> None:
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
        if offload not in (None, "none", "cpu"):
            raise ValueError(f"offload must be None, 'none' or 'cpu', got {offload!r}")
        if offload == "cpu" and stage == 0:
            raise ValueError("offload='cpu' partitions the optimizer state it moves to the host: "
                             "use stage=1, 2 or 3 (stage 0 replicates it on every rank)")
        if offload_grad_dtype is not None and offload != "cpu":
            raise ValueError("offload_grad_dtype= is the dtype gradients cross to the host in, "
                             "so it needs offload='cpu'")
        if offload_grad_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"offload_grad_dtype must be None (bf16 for bf16 parameters, else "
                             f"the reduce dtype), torch.float32 or torch.bfloat16, got "
                             f"{offload_grad_dtype!r}")
        if module is not None and not isinstance(module, torch.nn.Module):
            raise TypeError(f"module= must be the model (an nn.Module), got {type(module).__name__}")
        if stage != 3 and (units is not None or prefetch != 1 or not reshard_after_forward):
            raise ValueError("units=, prefetch= and reshard_after_forward= apply to stage 3 "
                             f"only (this optimizer has stage={stage})")
        if not isinstance(partition_frozen, bool):
            raise ValueError(f"partition_frozen must be True or False, got {partition_frozen!r}")
        if not (isinstance(prefetch, int) and prefetch >= 0):
            raise ValueError(f"prefetch must be a whole number of units >= 0, got {prefetch!r}")
        if bucket_mb is not None and not (isinstance(bucket_mb, (int, float)) and bucket_mb > 0):
            raise ValueError(f"bucket_mb must be a positive number or None (automatic: 25 MiB, "
                             f"at most an eighth of the gradients), got {bucket_mb!r}")
        if reduce_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"reduce_dtype must be None, float32, bfloat16 or float16, got {reduce_dtype}")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        unknown = set(scaler_kwargs) - set(_SCALER_KWARGS)
        if unknown:
            raise TypeError(
                f"unexpected keyword arguments {sorted(unknown)}; zeroshard's own are stage, "
                "process_group, bucket_mb, overlap, reduce_dtype, loss_scale, timeout_s, module, "
                "units, prefetch, reshard_after_forward, offload, offload_grad_dtype, "
                "partition_frozen and the "
                f"loss scaler's {', '.join(_SCALER_KWARGS)}")
        if isinstance(params, torch.nn.Module):
            if module is not None and module is not params:
                raise ValueError("module= names a different model than the one passed as params")
            module = params
        if stage == 3 and module is None:
            raise ValueError(
                "stage 3 gathers parameters module by module, so it needs the model: pass the "
                "module itself (ZeroAdamW(model, ..., stage=3)), or with param groups add "
                "module=model (ZeroAdamW(groups, ..., stage=3, module=model))")
        params, self._names = split_names(params)
        reject_duplicates(params, self._names)
        self._building = True
        super().__init__(params, defaults)
        self._building = False
        self.stage = stage
        self.partition_frozen = partition_frozen and stage == 3
        self.reduce_dtype = reduce_dtype or torch.float32
        self.offload: Optional[HostOffload] = None  # set once the device is known

        trainable = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if not trainable:
            raise ValueError("no parameter requires grad: nothing to optimize")
        devices = {p.device for p in trainable}
        if len(devices) > 1:
            raise ValueError(f"parameters are on several devices {sorted(map(str, devices))}; "
                             "one optimizer serves one device (move the model first)")
        self.device = devices.pop()
        self._check_dtypes(trainable)
        # Stage 3 with offload: the host update runs beside the next forward (deferred_update.py)
        self.deferred: Optional[DeferredUpdate] = None
        if offload == "cpu":
            self.offload = HostOffload(self.device, grad_dtype=offload_grad_dtype)
            if stage == 3:
                self.deferred = DeferredUpdate(self.device)
        if self.device.type == "cuda":  # object collectives use this rank's GPU, not cuda:0
            bind_rendezvous_device(process_group, self.device)
        reject_ddp_wrapped(trainable, self._names)
        # The models these parameters belong to: their buffers are broadcast at construction,
        # their DDP-style switches (require_backward_grad_sync, no_sync) are honoured, and
        # their parameter names make error messages readable.
        self.modules: List[torch.nn.Module] = (
            [module] if module is not None else
            root_modules(p for g in self.param_groups for p in g["params"]))
        self._name_from_modules()
        self.timeout_s = float(timeout_s)  # a collective not done by then raises CollectiveTimeout
        self.process_group = process_group
        self.comm: Communicator = simulated_if_asked(make_communicator(
            process_group, self.device, datetime.timedelta(seconds=self.timeout_s)), self.device)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        elem = torch.tensor([], dtype=self.reduce_dtype).element_size()
        self.bucket_mb = float(bucket_mb) if bucket_mb is not None else auto_bucket_mb(
            sum(sharded_init.whole_shape(p).numel() for p in trainable), elem)
        self._check_ranks_agree([p for g in self.param_groups for p in g["params"]])
        self._adopt_sharded_init(module)

        self.bucket_elems = max(1, int(self.bucket_mb * 2 ** 20) // elem)
        self.flat_groups: List[FlatGroup] = []
        # Stage 3: frozen parameters, partitioned and gathered with their units, never reduced
        self.frozen_groups: List[FlatGroup] = []
        self.units: Optional[ParamUnits] = None
        if stage == 3:
            unit_list = self._flatten_units(module, units)
        else:
            for gi in range(len(self.param_groups)):
                self.flat_groups.extend(self._flatten_group(gi))
        self._broadcast_from_rank0(flat=stage != 3)  # stage 3: per group in _flatten_units
        self.reducer = BucketReducer(self.flat_groups, self.comm,
                                     mode="all_reduce" if stage == 0 else "reduce_scatter",
                                     overlap=overlap, reduce_at_step=(stage == 1))
        if stage == 3:
            self.units = ParamUnits(unit_list, self.comm, prefetch=prefetch,
                                    reshard_after_forward=reshard_after_forward,
                                    wait_guard=self._guarded_wait)
            self.reducer.on_launch = self.units.on_bucket_launched
            self.units.on_first_forward = lambda: self._check_ddp_once()
            self.units.before_gather = lambda u: self._settle_groups(u.groups)
        self.reducer.sync_predicate = self._models_want_sync
        self.reducer.offload = self.offload
        self.reducer.wait_guard = self._guarded_wait
        self.exposed = ExposedGrads(self)
        self.exposed.add_groups(0, self.flat_groups)
        self._install_no_sync()
        self._ddp_checked = False  # DDP wrappers added after construction: checked at backward
        self._grads_dirty = False  # gradients arrived since they were last zeroed
        self._master_check_due = True  # see _adopt_changed_params
        # Offload: parameters the script changes between steps (see param_watch.py)
        self.param_watch = ParamWatch()
        self._nonfinite_norm: Optional[float] = None  # set by clip_grad_norm_, read by step
        self._norm_read = False  # clip_grad_norm_ since the last step (offload's partials)
        self.scaler: Optional[LossScaler] = None
        if any(fg.dtype == torch.float16 for fg in self.flat_groups) and loss_scale is not None:
            if loss_scale == "dynamic":
                self.scaler = LossScaler(dynamic=True, **scaler_kwargs)
            elif isinstance(loss_scale, (int, float)) and loss_scale > 0:
                self.scaler = LossScaler(dynamic=False, initial_scale=float(loss_scale))
            else:
                raise ValueError(f"loss_scale must be 'dynamic', a positive number or None, "
                                 f"got {loss_scale!r}")
        self.last_step_skipped = False
        self._clip_coef = 1.0
        self._grads_present = False
        if self.offload is not None:
            for fg in self.flat_groups:
                self.offload.add_group(fg)
        self.shard_state: List[Dict[str, Any]] = [self._init_state(fg) for fg in self.flat_groups]
        if stage == 3:
            self._own_shards()
            # A copy.deepcopy of the model (an EMA) is a sharded model with no optimizer: these
            # hooks gather its modules in its forward (they do nothing for this optimizer's).
            sharded_modules.install_gather_hooks(module)

    def _own_shards(self) -> None:
        """Stage 3: each sharded parameter's in-place edits reach its fp32 master (where one is
        kept apart from the parameter), and zeroshard.full_params(model) finds this optimizer."""
        me = weakref.ref(self)
        for fg, state in zip(self.flat_groups, self.shard_state):
            fg.owner = me
            if self.offload is not None:
                fg.master_source = lambda fg=fg, state=state: self.offload.master(fg, state)
            else:
                fg.master_source = lambda state=state: state.get("master")
        for fg in self.frozen_groups:
            fg.owner = me

    # ---- construction ------------------------------------------------------------------------

    def _check_dtypes(self, params) -> None:
        for p in params:
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError(f"{self._names[id(p)]} has dtype {p.dtype}; zeroshard trains "
                                "float32, bfloat16 and float16 parameters")

    def _flatten_units(self, module: torch.nn.Module, units) -> List[Unit]:
        """Stage 3: one FlatGroup per unit, param group and dtype (a unit's gather reads its
        shards only), and one per unit and dtype of its frozen parameters (partition_frozen:
        gathered with the unit, never reduced; otherwise they stay whole on every rank)."""
        found = find_units(module, units)
        owner = owning_units(module, [m for _, m in found])
        unit_list = [Unit(0, "<root>", module, True)] + [
            Unit(i + 1, name, m, False) for i, (name, m) in enumerate(found)]
        for g in self.param_groups:
            for p in g["params"]:
                if p.requires_grad and id(p) not in owner:
                    raise ValueError(f"{self._names[id(p)]} is not a parameter of the module "
                                     "given to the stage-3 optimizer; stage 3 can only gather "
                                     "parameters of that module")
        for u in unit_list:
            for gi in range(len(self.param_groups)):
                adopted = []
                added = self._flatten_group(
                    gi, lambda p, u=u: owner.get(id(p)) == u.index, adopted)
                for fg, whole in zip(added, adopted):
                    if not whole:  # sharded_init's came from rank 0 already
                        self._broadcast_from_rank0([fg])
                    fg.shard_and_free()  # peak memory: one group whole at a time
                u.groups.extend(added)
                self.flat_groups.extend(added)
            if self.partition_frozen:
                frozen = self._flatten_frozen(module, u, owner)
                u.groups.extend(frozen)
                self.frozen_groups.extend(frozen)
        return unit_list

    def _flatten_frozen(self, module: torch.nn.Module, u: Unit, owner) -> List[FlatGroup]:
        """The frozen FlatGroups of unit u: its parameters that require no grad, per dtype
        (float32/bfloat16/float16 on the optimizer's device; others stay whole)."""
        by_dtype: "OrderedDict[torch.dtype, list]" = OrderedDict()
        names = dict((id(p), n) for n, p in module.named_parameters(remove_duplicate=True))
        for p in dict.fromkeys(module.parameters()):
            if (not p.requires_grad and owner.get(id(p)) == u.index and p.device == self.device
                    and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                    and sharded_init.whole_shape(p).numel() > 0):
                by_dtype.setdefault(p.dtype, []).append(p)
        groups = []
        for ps in by_dtype.values():
            fg = FlatGroup(ps, [names.get(id(p), "a frozen parameter") for p in ps], -1,
                           rank=self.rank, world_size=self.world_size, stage=3,
                           bucket_elems=self.bucket_elems, reduce_dtype=self.reduce_dtype,
                           frozen=True, process_group=self.process_group)
            if not all(sharded_init.is_sharded(p) for p in ps):
                self._broadcast_from_rank0([fg])
            fg.shard_and_free()
            groups.append(fg)
        return groups

    def _adopt_sharded_init(self, module: Optional[torch.nn.Module]) -> None:
        """Parameters built under zeroshard.sharded_init hold only this rank's slice. Stage 3
        adopts the trainable ones group by group (FlatGroup gathers them); every other one is
        made whole here (a collective per parameter)."""
        params = [p for g in self.param_groups for p in g["params"]]
        if module is not None:
            params += list(module.parameters())
        sharded = [p for p in dict.fromkeys(params) if sharded_init.is_sharded(p)]
        for p in sharded:
            record = sharded_init.record_of(p)
            if record.spec.world_size != self.world_size:
                raise ValueError(
                    f"{self._names.get(id(p), 'a parameter')} was sharded by sharded_init over "
                    f"{record.spec.world_size} ranks, but the optimizer's process group has "
                    f"{self.world_size}: pass the same process_group to both")
        for p in sharded:
            if self.stage != 3 or (not p.requires_grad and not self.partition_frozen):
                sharded_init.unshard(p)

    def _flatten_group(self, gi: int, select=None, adopted: Optional[list] = None
                       ) -> List[FlatGroup]:
        """One FlatGroup per dtype among param group gi's trainable parameters (those `select`
        accepts). `adopted` gets, per FlatGroup, whether all its parameters came from
        sharded_init (identical on every rank: no broadcast needed)."""
        by_dtype: "OrderedDict[torch.dtype, list]" = OrderedDict()
        for p in self.param_groups[gi]["params"]:
            if p.requires_grad and (select is None or select(p)):
                by_dtype.setdefault(p.dtype, []).append(p)
        if adopted is not None:
            adopted.extend(all(sharded_init.is_sharded(p) for p in ps)
                           for ps in by_dtype.values())
        return [FlatGroup(ps, [self._names[id(p)] for p in ps], gi, rank=self.rank,
                          world_size=self.world_size, stage=self.stage,
                          bucket_elems=self.bucket_elems, reduce_dtype=self.reduce_dtype,
                          host_zeros=self.offload.zeros if self.offload is not None else None,
                          process_group=self.process_group)
                for ps in by_dtype.values()]

    def add_param_group(self, param_group: dict) -> None:
        """As torch.optim: the new group's parameters are flattened and sharded like the rest.
        Every rank must call it with the same group (checked with one small collective)."""
        self.settle()
        if getattr(self, "_building", True):
            super().add_param_group(param_group)
            return
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if self.stage == 3:
            raise ValueError("add_param_group() is not supported at stage 3 (its units are "
                             "planned at construction): pass every param group to the "
                             "constructor, with module=model")
        groups, names = split_names([param_group])
        group = groups[0]
        self._names.update(names)
        self._name_from_modules()
        existing = [p for g in self.param_groups for p in g["params"]]
        reject_duplicates(existing + list(group["params"]), self._names)
        new = [p for p in group["params"] if p.requires_grad]
        for p in new:
            if p.device != self.device:
                raise ValueError(f"{self._names[id(p)]} is on {p.device}, the optimizer's other "
                                 f"parameters on {self.device}")
        self._check_dtypes(new)
        if self.scaler is None and any(p.dtype == torch.float16 for p in new) and any(
                fg.dtype != torch.float16 for fg in self.flat_groups):
            raise ValueError("float16 parameters need loss scaling set up at construction; "
                             "construct the optimizer with them instead of add_param_group()")
        self._check_ranks_agree(list(group["params"]))
        self._reduced()  # finish any reduction in flight before the buffers change
        super().add_param_group(group)
        added = self._flatten_group(len(self.param_groups) - 1)
        first = len(self.flat_groups)
        self.flat_groups.extend(added)
        self._broadcast_from_rank0(added)
        self.reducer.add_groups(added)
        self.exposed.add_groups(first, added)
        if self.offload is not None:
            for fg in added:
                self.offload.add_group(fg)
        self.shard_state.extend(self._init_state(fg) for fg in added)
        self._after_add_groups(added)

    def _after_add_groups(self, added: List[FlatGroup]) -> None:
        """Hook for subclasses that keep per-FlatGroup objects outside shard_state."""

    def _broadcast_from_rank0(self, groups: Optional[List[FlatGroup]] = None,
                              flat: bool = True) -> None:
        rank_agreement.broadcast_from_rank0(self, groups, flat)

    def _name_from_modules(self) -> None:
        for m in self.modules:
            for name, p in m.named_parameters(remove_duplicate=False):
                current = self._names.get(id(p))  # placeholders: "params[3] (shape ...)"
                if current is not None and current.startswith(("params[", "param_groups[")):
                    self._names[id(p)] = name

    def _install_no_sync(self) -> None:
        for m in self.modules:
            current = getattr(m, "no_sync", None)
            if current is None or isinstance(current, NoSyncMethod):
                m.no_sync = NoSyncMethod(self)

    def _models_want_sync(self) -> bool:
        """DDP's switch, which scripts set on the model for gradient accumulation."""
        return all(getattr(m, "require_backward_grad_sync", True) for m in self.modules)

    def _check_ranks_agree(self, params) -> None:
        rank_agreement.check_ranks_agree(self, params)

    # ---- subclass interface ------------------------------------------------------------------

    def _init_state(self, fg: FlatGroup) -> Dict[str, Any]:
        raise NotImplementedError

    def _step_group(self, fg: FlatGroup, state: Dict[str, Any], group: Dict[str, Any],
                    grad_scale: float, updated: List[bool]) -> None:
        """Updates fg's shard; updated[j]: parameter j got a gradient on some rank this step
        (the others must be left exactly as they are, as torch.optim skips p.grad None)."""
        raise NotImplementedError

    def _master(self, fg: FlatGroup) -> Optional[torch.Tensor]:
        """An fp32 master shard for low-precision params (None for fp32: params are master;
        with offload their host copy is HostOffload's)."""
        if fg.dtype == torch.float32:
            return None
        return self.offload.shard_fp32(fg) if self.offload is not None else fg.shard_as_fp32()

    def _state_zeros(self, fg: FlatGroup) -> torch.Tensor:
        """A zeroed fp32 optimizer-state shard: on the device, or in host memory with offload."""
        if self.offload is not None:
            return self.offload.zeros(fg.shard_numel)
        return torch.zeros(fg.shard_numel, dtype=torch.float32, device=fg.device)

    # ---- training step -----------------------------------------------------------------------

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def settle(self) -> None:
        """Waits for the last step's deferred host update (offload at stage 3, see [Note:
        deferred update]): afterwards parameters, masters and optimizer state hold its values.
        Every method that reads or writes them calls it; scripts need not."""
        deferred = getattr(self, "deferred", None)  # add_param_group runs inside __init__
        if deferred is not None and deferred.wait_all():  # step() left this record to us
            self.param_watch.record(self.flat_groups)

    def _settle_groups(self, groups) -> None:
        """A unit's gather: its own groups' update and upload only."""
        if self.deferred is not None:
            self.deferred.wait_for(groups)

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """loss.backward(), scaled by the loss scale when training fp16 parameters."""
        if self.scaler is not None:
            (loss.float() * self.scaler.scale).backward(**kwargs)
        else:
            loss.backward(**kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally with no communication (stage 0/2 allocate a full-size
        local gradient buffer the first time; stage 1 always accumulates locally)."""
        with self.reducer.no_sync():
            yield

    def _reduced(self) -> None:
        self.reducer.wait()
        if self.offload is not None:
            self.offload.finish_landing()
        if self.reducer.consume():
            self._grads_present = True

    # [Note: what the script does between steps] Scripts written for torch.optim + DDP move the
    # model after building the optimizer, zero gradients through the model or not at all, and
    # wrap the model in DDP late. The first gradient of each backward (ExposedGrads' tensor
    # hook) and every step() check for these, so each either works or raises.

    def _check_ddp_once(self) -> None:
        """A DDP wrapper added after construction: refused at the first backward, or at stage
        3 at the first forward (DDP's own hooks would otherwise meet sharded parameters inside
        autograd, whose shape check fails first with no word of zeroshard)."""
        if not self._ddp_checked:
            self._ddp_checked = True
            reject_ddp_wrapped([p for fg in self.flat_groups for p in fg.params], self._names,
                               after=True)

    def _on_backward_start(self) -> None:
        self.settle()  # gradients land in host shards the update may still be reading
        self._check_ddp_once()
        self._reattach()
        self._forget_withdrawn_grads()
        self.exposed.withdraw()
        self._grads_dirty = True
        if self.units is not None:
            self.units.before_backward()

    def _on_backward_end(self) -> None:
        if self.units is not None:  # parameters back to their placeholders before p.grad is set
            self.units.after_backward()
        if self.reducer.callback_queued and self.reducer.round_sync:
            self.exposed.expose()

    def _reattach(self) -> None:
        for fg in self.flat_groups:
            fg.reattach()

    def _poll_peers(self, where: str) -> None:
        """Fails fast when another rank waits in a zeroshard call this rank did not make
        (checkpoint.save on rank 0 only), before this rank blocks in a collective."""
        if self.world_size > 1:
            rendezvous_for(self.process_group, self.timeout_s).poll(where)

    def _guarded_wait(self, work) -> None:
        """Blocks until `work` completes (up to timeout_s; its wait() then raises), checking every
        10 ms that no rank waits in a zeroshard call this rank went past: a bucket's collective
        inside backward would otherwise wait timeout_s for a rank that saves a checkpoint
        under `if rank == 0:`. CUDA waits are stream joins and need no watching."""
        if self.world_size == 1 or self.device.type == "cuda":
            return
        rendezvous = rendezvous_for(self.process_group, self.timeout_s)
        where = f"a collective of {type(self).__name__}"
        deadline = time.monotonic() + self.timeout_s
        pause, next_check, entered_since = 5e-5, 0.0, None
        while not work.is_completed() and time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_check:
                # A rank that finished its side of this collective may enter its next call
                # while this rank's side is still completing (gloo): only a collective still
                # not done NOT_AWAITED_GRACE_S later is one that rank never joins.
                if rendezvous.next_call_entered():
                    entered_since = now if entered_since is None else entered_since
                    if now - entered_since >= NOT_AWAITED_GRACE_S:
                        rendezvous.check_not_awaited(where)
                next_check = now + 0.01
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)

    def _consume_grads(self) -> None:
        """After step(): the next backward starts from zero, however the script zeroes."""
        self.exposed.withdraw(apply_script_changes=False)
        if self.offload is not None:
            # D2H copies may still be landing in the host gradient shard: zeroing it first
            # would be overwritten by (or tear) a late copy on a GPU.
            self.offload.finish_landing()
        if self._grads_dirty:
            for fg in self.flat_groups:
                fg.zero_grads()
            self._grads_dirty = False
        self.reducer.forget_grads()
        if self.offload is not None:
            self.offload.forget_grads()
        self._grads_present = False
        self._clip_coef = 1.0
        self._nonfinite_norm = None

    def _shard_grad_pieces(self):
        return gradient_checks.shard_grad_pieces(self)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """Clips the global gradient norm (all shards, all ranks) to max_norm, like
        torch.nn.utils.clip_grad_norm_; the scaling is applied inside the next step's kernel.
        Returns the total norm before clipping (a 0-dim tensor). A non-finite norm raises here
        with error_if_nonfinite=True; otherwise the next step() raises, unless fp16 loss scaling
        skips it (where torch would write NaN into every parameter)."""
        self.settle()
        max_norm, norm_type = float(max_norm), float(norm_type)
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        if not (norm_type > 0):
            raise ValueError(f"norm_type must be > 0 or inf, got {norm_type}")
        self._poll_peers(f"{type(self).__name__}.clip_grad_norm_")
        self.exposed.withdraw(remove=False)
        self._reduced()
        norm = gradient_checks.global_norm(self, norm_type)
        norm /= self.loss_scale
        if not math.isfinite(norm):
            if error_if_nonfinite:
                raise RuntimeError(
                    f"the total norm of order {norm_type} of the gradients is {norm}, so they "
                    "cannot be clipped; set error_if_nonfinite=False to leave it to step()")
            self._nonfinite_norm = norm
            return torch.tensor(norm, dtype=torch.float32)
        coef = max_norm / (norm + 1e-6)
        self._clip_coef = coef if coef < 1.0 else 1.0
        self._norm_read = True
        return torch.tensor(norm, dtype=torch.float32)

    def _overflowed(self) -> bool:
        return gradient_checks.overflowed(self)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.settle()
        if self.offload is not None:  # the next step takes norms as gradients land if this one read them
            self.offload.partials_wanted = self.scaler is not None or self._norm_read
        self._norm_read = False
        self._poll_peers(f"{type(self).__name__}.step")
        self._reattach()
        self._forget_withdrawn_grads()
        self.exposed.withdraw()
        self._reduced()
        if not self._grads_present:
            self._consume_grads()
            return loss  # no backward since zero_grad: torch.optim skips params without grads
        self.last_step_skipped = False
        overflow, updated = self._agree_on_grads(check_overflow=self.scaler is not None)
        if overflow:
            self.last_step_skipped = True
            self.scaler.update(overflow=True)
            self._consume_grads()
            return loss
        if self._nonfinite_norm is not None:
            norm, self._nonfinite_norm = self._nonfinite_norm, None
            raise RuntimeError(
                f"clip_grad_norm_ found a gradient norm of {norm}: this step would write NaN "
                "into the parameters (torch.optim would, silently), so it was not taken. Lower "
                "the learning rate, check the loss for inf/NaN, or train fp16 with its loss "
                "scaler; to skip this batch, call zero_grad() and go on.")
        grad_scale = self.loss_scale / self._clip_coef
        if self.units is not None:  # gathered copies would be stale after the update
            self.units.check_order()
            self.units.free_all()
        if self.param_watch.changed():  # the script wrote into parameters with a master
            self._master_check_due = True
        if self._master_check_due:
            self._adopt_changed_params()
        if self.offload is not None:
            self.offload.before_update()
        if self.deferred is not None:
            self._start_deferred_update(grad_scale, updated)
        else:
            for fg, state, got in zip(self.flat_groups, self.shard_state, updated):
                if any(got):
                    self._step_group(fg, state, self.param_groups[fg.group_index], grad_scale,
                                     got)
            if self.offload is not None:
                self.offload.after_update()
        self._gather_params()
        if self.offload is not None and self.deferred is None:
            self.param_watch.record(self.flat_groups)
        if self.scaler is not None:
            self.scaler.update(overflow=False)
        self._consume_grads()
        return loss

    def _start_deferred_update(self, grad_scale: float, updated) -> None:
        """See [Note: deferred update]: each group's update, with its param group's
        hyperparameters as they are now, in the order the units ran in the last forward; each
        group's host gradients zeroed after its update (the main thread must not touch them)."""
        last_forward = self.units.record or self.units.previous
        order = {index: i for i, index in enumerate(last_forward)}

        def position(k: int) -> tuple:
            u = self.units.unit_of_group.get(id(self.flat_groups[k]))
            return (u is None or not u.is_root, order.get(u.index if u else -1, len(order)), k)
        zero = self._grads_dirty
        self._grads_dirty = False
        jobs = []
        for k in sorted(range(len(self.flat_groups)), key=position):
            fg, state, got = self.flat_groups[k], self.shard_state[k], updated[k]
            group = dict(self.param_groups[fg.group_index])  # a scheduler may change it next

            def job(fg=fg, state=state, got=got, group=group) -> None:
                if any(got):
                    self._step_group(fg, state, group, grad_scale, got)
                if zero:
                    fg.zero_grads()
            jobs.append((fg, job))
        self.deferred.start(jobs, self.offload.h2d_stream.record)

    def _forget_withdrawn_grads(self) -> None:
        """A gradient handle the script replaced by None (model.zero_grad(), p.grad = None)
        means, as in torch, that the parameter has no gradient: unless a later backward gives
        it one, the step skips it."""
        if not self.exposed.exposed:
            return
        for (gi, j), handle in self.exposed.handles.items():
            if self.flat_groups[gi].params[j].grad is None:
                self.reducer.got[gi][j] = False

    def _agree_on_grads(self, check_overflow: bool):
        return gradient_checks.agree_on_grads(self, check_overflow)

    def _adopt_changed_params(self) -> None:
        """A separate fp32 master shard (bf16/fp16 parameters, ZeroRedundancy) is copied from
        the parameters at construction. A script that then loads weights into the model
        (model.load_state_dict after building the optimizer, or after loading optimizer state)
        would have them silently reverted by the first update. So before the first step after
        construction or a load, and with offload before any step after which ParamWatch saw
        the parameters change, every element whose parameter no longer equals its master (rounded to the
        parameter's dtype) takes the parameter's value."""
        self._master_check_due = False
        for fg, master in self._masters():
            for b0, b1, s0 in fg.shard_slices():  # slice by slice: no shard-sized temporary
                if b1 == b0:
                    continue
                current = fg.param_values(b0, b1, s0).to(master.device, torch.float32)
                kept = master.detach()[s0:s0 + (b1 - b0)]
                changed = current.to(fg.dtype) != kept.to(fg.dtype)
                if bool(changed.any()):
                    kept[changed] = current[changed]

    def _masters(self):
        """(fg, fp32 master shard) of every FlatGroup that keeps one apart from its
        parameters (with offload: every FlatGroup, in host memory)."""
        if self.offload is not None:
            for fg, state in zip(self.flat_groups, self.shard_state):
                yield fg, self.offload.master(fg, state)
            return
        for fg, state in zip(self.flat_groups, self.shard_state):
            if state.get("master") is not None:
                yield fg, state["master"]

    def _gather_params(self) -> None:
        if self.stage in (1, 2):  # stage 3 gathers each unit when it runs
            self.reducer.all_gather_shards()

    @contextlib.contextmanager
    def full_params(self, writeback: bool = False):
        """Inside the block every parameter is whole on every rank (evaluation, generation,
        model.state_dict(), inspection). At stage 3 a collective: every rank must enter it, and
        it holds the whole model's parameters until it ends. writeback=True writes changes made
        to the parameters inside back into the shards (and fp32 masters) on leaving; without it
        they are discarded at stage 3. At stages 0-2 parameters are always whole and it only
        makes the optimizer adopt changed values (as it does after a load)."""
        self.settle()
        if self.units is None:
            yield
            if writeback:
                self._master_check_due = True
            return
        self._poll_peers(f"{type(self).__name__}.full_params")
        self._reduced()
        try:
            with self.units.full_params():
                yield
                if writeback:
                    with torch.no_grad():
                        for fg in self.flat_groups:
                            for b0, b1, s0 in fg.shard_slices():
                                fg.param_values(b0, b1, s0).copy_(fg.flat_param[b0:b1])
                    self._master_check_due = True
        finally:
            self.units.free_all()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the reduced gradients (p.grad becomes None whatever set_to_none says: the
        gradients live in zeroshard's buffers)."""
        # Right after step() a deferred update zeroes each group's gradients itself (and waiting
        # for it here would end its overlap with the next forward).
        if not (self.deferred is not None and self.deferred.pending and not self._grads_dirty):
            self.settle()
            self.reducer.wait()
            self.reducer.consume()
            self._grads_dirty = True
            self._consume_grads()
        for fg in self.flat_groups:
            for p in fg.params:
                p.grad = None

    # ---- reports -----------------------------------------------------------------------------

    def memory_report(self) -> Dict[str, Any]:
        """Bytes this rank holds per category (see memory_reports.memory_report)."""
        self.settle()
        return memory_reports.memory_report(self)

    def reset_peak_memory(self) -> bool:
        """Starts memory_report()["measured"]["peak_bytes"] over from now (e.g. after warm-up);
        False where the platform cannot reset it. At stage 3 also restarts the count of units
        gathered at once (memory_report()["units"]["peak_gathered"])."""
        if self.units is not None:
            self.units.peak_alive = sum(u.gathered and not u.is_root for u in self.units.units)
        return process_memory.reset_peak(self.device)

    def comm_stats(self) -> Dict[str, Dict[str, int]]:
        """Bytes this rank sent per collective kind since the last reset (ring model); with
        offload also "d2h" and "h2d": the copies and bytes between device and host memory."""
        self.settle()  # a deferred update's uploads are counted as they are queued
        stats = self.comm.stats.as_dict()
        if self.offload is not None:
            stats.update(self.offload.stats())
        return stats

    def reset_comm_stats(self) -> None:
        self.settle()
        self.comm.stats = type(self.comm.stats)()
        if self.offload is not None:
            self.offload.reset_stats()

    # ---- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """This rank's shard of the optimizer state, torch.optim-shaped, with a 'zeroshard'
        section describing the layout. Not a collective (scripts call it on rank 0 only), so it
        loads back only on the same rank, world size and stage; see full_state_dict() for a
        rank-independent one and zeroshard.checkpoint for sharded files."""
        self.settle()
        return state_dicts.shard_state_dict(self)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads a state_dict() of this rank, or a full_state_dict() / stock torch.optim state
        dict on any rank. Validates everything first: on error nothing has changed."""
        self.settle()
        state_dicts.load_state_dict(self, state_dict)

    def full_state_dict(self) -> Dict[str, Any]:
        """The whole optimizer state in torch.optim's format ('state' keyed by parameter index
        with tensors shaped like the parameters, 'param_groups'); loads on any rank, world size
        and stage, and into the stock torch.optim optimizer. A collective: every rank must call
        it (each gets the same dict); a call on one rank only fails with an error saying so."""
        self.settle()
        return state_dicts.full_state_dict(self)

    def _after_load(self) -> None:
        """Hook for subclasses whose state lives partly outside shard_state."""

    # ---- sharded checkpoints (zeroshard.checkpoint) ------------------------------------------
    # Accessors for zeroshard.checkpoint, which owns the file format and resharding. "State
    # space" is the shard (stages 1/2) or the whole flat buffer (stage 0), as in shard_state.

    def checkpoint_state(self, index: int):
        """Flat group `index`'s state: (state-space tensors by name, JSON-able scalars)."""
        self.settle()
        state = self.shard_state[index]
        tensors = {k: v.detach() for k, v in state.items() if isinstance(v, torch.Tensor)}
        scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        return tensors, scalars

    def load_checkpoint_state(self, index: int, tensors: Dict[str, torch.Tensor],
                              scalars: Dict[str, Any]) -> None:
        """Copies already-validated state in (same keys and shapes as checkpoint_state)."""
        self.settle()
        state = self.shard_state[index]
        with torch.no_grad():
            for k, v in tensors.items():
                state[k].copy_(v)
        state.update(scalars)

    def scaler_state(self) -> Optional[Dict[str, Any]]:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_scaler_state(self, state: Optional[Dict[str, Any]]) -> None:
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)

    def finish_checkpoint_load(self) -> None:
        """After a checkpoint load: drop pending gradients and run the subclass hook."""
        self.settle()
        self.zero_grad(set_to_none=True)
        if self.units is not None:
            self.units.free_all()  # gathered copies would hold the values from before the load
        self._master_check_due = True
        self._after_load()
