"""ZeroOptimizer: the torch.optim.Optimizer that partitions state across data-parallel ranks.

It tells the training step's story; each chapter is a noun of its own. Construction: options
checked (zero_options), FlatGroups built (group_builder) and made equal on every rank
(rank_agreement). Backward: gradients reduced bucket by bucket (BucketReducer, ExposedGrads for
p.grad), landing on the host with offload (HostOffload). Step: the global norm and the overflow
and got-a-gradient flags (GradientChecks), the update of this rank's shard (subclasses'
`_step_group`, optimizers.py; with stage-3 offload run beside the next forward, DeferredUpdate),
then the updated shards all-gathered (stages 1-2) or gathered unit by unit at the next forward
(stage 3, ParamUnits). Around it: state dicts (StateDicts), memory (memory_report), peers that
went elsewhere (PeerGuard).

[Note: stages] stage 0 replicates optimizer state and all-reduces gradients during backward (a
DDP replacement). Stage 1 partitions fp32 master and optimizer state; each rank accumulates its
own full-size gradient over micro-steps (no traffic per micro-step), and the synchronised
backward reduce-scatters it bucket by bucket while it runs, the shard landing inside that same
buffer (flat_group.py's [Note: stage 1 shard in place]). Stage 2 reduce-scatters each bucket
during backward into a gradient shard of its own. Stages 1 and 2 then all-gather the updated shards:
reduce-scatter + all-gather moves what one all-reduce moves. Stage 3 reduces like stage 2 and
also partitions the parameters (param_units.py); the update writes each rank's shard only.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from .comm.comm_groups import CommGroups
from .comm.topology_options import TopologyOptions
from .comm.communicator import Communicator, merged_stats
from .comm.peer_guard import PeerGuard
from .comm.rendezvous import bind_rendezvous_device, rendezvous_for
from . import ops
from .memory import process_memory
from .memory.memory_reports import memory_report
from .offload.deferred_update import DeferredUpdate, update_jobs
from .offload.host_offload import HostOffload
from .offload.param_watch import ParamWatch
from .sharded_params import sharded_init, sharded_modules
from .sharded_params.sharded_tensor import raw
from .sharding.bucket_reducer import BucketReducer
from .sharding.buffer_ring import auto_bucket_mb
from .sharding.exposed_grads import ExposedGrads
from .sharding.flat_group import FlatGroup
from .sharding.gradient_checks import GradientChecks, clip_arguments, clip_coefficient
from .sharding.group_builder import (FlatGroupBuilder, adopt_sharded_init, largest_unit_of,
                                    own_shards)
from .sharding.loss_scaler import LossScaler, scaler_for
from .sharding.owning_modules import install_no_sync, models_want_sync, root_modules
from .sharding.param_lists import (check_new_group, device_of, name_from_modules,
                                   reject_ddp_wrapped, reject_duplicates, split_names)
from .sharding.param_units import ParamUnits
from .sharding.secondary_shards import SecondaryShards
from .sharding.rank_agreement import RankAgreement, construction_tensors
from .sharding.state_dicts import StateDicts
from .sharding.zero_options import check_options, model_of


class ZeroOptimizer(torch.optim.Optimizer):
    def __init__(self, params, defaults: Dict[str, Any], *, stage: int = 2,
                 process_group: Optional[dist.ProcessGroup] = None,
                 bucket_mb: Optional[float] = None,
                 overlap: bool = True, reduce_dtype: Optional[torch.dtype] = None,
                 loss_scale: Any = "dynamic", timeout_s: float = 300.0,
                 module: Optional[torch.nn.Module] = None, units=None, prefetch: int = 1,
                 reshard_after_forward: bool = True, offload: Optional[str] = None,
                 offload_grad_dtype: Optional[torch.dtype] = None,
                 partition_frozen: bool = True, node_size: Optional[int] = None,
                 shard_size=None, quantize_weights: Optional[str] = None,
                 quantize_grads: Optional[str] = None, secondary_shard: Optional[str] = None,
                 **scaler_kwargs) -> None:
        # Many machines (docs/many-machines.md): which ranks share a node, and what keeps
        # bytes off the links between nodes
        topology = TopologyOptions(node_size, shard_size, secondary_shard, quantize_weights,
                                   quantize_grads)
        check_options(stage=stage, offload=offload, offload_grad_dtype=offload_grad_dtype,
                      module=module, units=units, prefetch=prefetch,
                      reshard_after_forward=reshard_after_forward,
                      partition_frozen=partition_frozen, bucket_mb=bucket_mb,
                      reduce_dtype=reduce_dtype, timeout_s=timeout_s, topology=topology,
                      scaler_kwargs=scaler_kwargs)
        module = model_of(params, module, stage)
        params, self._names = split_names(params)
        reject_duplicates(params, self._names)
        self._building = True
        super().__init__(params, defaults)
        self._building = False
        self.stage = stage
        self.topology_options = topology
        self.partition_frozen = partition_frozen and stage == 3
        self.reduce_dtype = reduce_dtype or torch.float32
        self.offload: Optional[HostOffload] = None  # set once the device is known

        trainable = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        self.device = device_of(trainable, self._names)
        # Stage 3 with offload: the host update runs beside the next forward (deferred_update.py)
        self.deferred: Optional[DeferredUpdate] = None
        if offload == "cpu" or self.device.type == "cpu":
            # The update kernels run on the host: each rank takes its share of the cores. With
            # every rank's kernels on every core, a step's update waited on descheduled threads
            # (2 ranks on 2 cores: 5 ms of kernels took 40-70 ms).
            ops.apply_default_num_threads()
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
        # Which ranks share a node (comm/topology.py): comm_stats() splits bytes by it. With
        # shard_size, state is partitioned within shard groups and replicated across them.
        self.groups = CommGroups.for_optimizer(process_group, self.device, self.timeout_s,
                                               topology, stage=stage)
        self.topology = self.groups.topology
        self.process_group = self.groups.process_group  # the shard group's
        self.comm: Communicator = self.groups.comm
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.peers = PeerGuard(process_group, self.timeout_s, self.world_size, self.device,
                               type(self).__name__)
        self.agreement = RankAgreement(self.groups.world_comm, process_group, self.timeout_s)
        elem = torch.tensor([], dtype=self.reduce_dtype).element_size()
        self.bucket_mb = float(bucket_mb) if bucket_mb is not None else auto_bucket_mb(
            sum(sharded_init.whole_shape(p).numel() for p in trainable), elem,
            largest_unit_of(module, units, trainable) if stage == 3 else 0)
        self._check_ranks_agree([p for g in self.param_groups for p in g["params"]])
        adopt_sharded_init([p for g in self.param_groups for p in g["params"]]
                           + (list(module.parameters()) if module is not None else []),
                           self._names, self.world_size, stage, self.partition_frozen)

        self.bucket_elems = max(1, int(self.bucket_mb * 2 ** 20) // elem)
        self.builder = FlatGroupBuilder(
            self.param_groups, self._names, rank=self.rank, world_size=self.world_size,
            stage=stage, bucket_elems=self.bucket_elems, reduce_dtype=self.reduce_dtype,
            device=self.device, process_group=self.process_group,
            host_zeros=self.offload.zeros if self.offload is not None else None,
            broadcast=self.agreement.broadcast)
        self.flat_groups: List[FlatGroup] = []
        # Stage 3: frozen parameters, partitioned and gathered with their units, never reduced
        self.frozen_groups: List[FlatGroup] = []
        self.units: Optional[ParamUnits] = None
        if stage == 3:  # each group made equal across ranks as it is built
            unit_list, trainable_groups, frozen_groups = self.builder.of_units(
                module, units, self.partition_frozen)
            self.flat_groups.extend(trainable_groups)
            self.frozen_groups.extend(frozen_groups)
        else:
            for gi in range(len(self.param_groups)):
                self.flat_groups.extend(self.builder.of_param_group(gi))
        # Every rank starts from rank 0's weights and buffers, as DDP makes it
        self.agreement.broadcast(construction_tensors(
            self.flat_groups if stage != 3 else [], self.flat_groups + self.frozen_groups,
            self.param_groups, self.modules, self.device))
        self.reducer = BucketReducer(self.flat_groups, self.comm,
                                     mode="all_reduce" if stage == 0 else "reduce_scatter",
                                     overlap=overlap)
        if stage == 3:
            self.units = ParamUnits(unit_list, self.comm, prefetch=prefetch,
                                    reshard_after_forward=reshard_after_forward,
                                    wait_guard=self.peers.wait,
                                    quantize_weights=quantize_weights,
                                    secondary=SecondaryShards(self.groups.node_comm)
                                    if self.groups.node_comm and secondary_shard else None)
            self.reducer.on_launch = self.units.on_bucket_launched
            self.units.on_first_forward = lambda: self._check_ddp_once()
            self.units.before_gather = lambda u: self._settle_groups(u.groups)
        self.reducer.sync_predicate = lambda: models_want_sync(self.modules)  # DDP's switch
        self.reducer.offload = self.offload
        self.reducer.wait_guard = self.peers.wait
        self.reducer.reduce_over(self.groups, topology)
        self.exposed = ExposedGrads(self)
        self.exposed.add_groups(0, self.flat_groups)
        self.grad_checks = GradientChecks(self.flat_groups, self.comm, self.device,
                                          self.offload, replicated=stage == 0,
                                          flags_comm=self.groups.world_comm)
        install_no_sync(self.modules, self)
        self._ddp_checked = False  # DDP wrappers added after construction: checked at backward
        self._grads_dirty = False  # gradients arrived since they were last zeroed
        self._master_check_due = True  # see _adopt_changed_params
        # Offload: parameters the script changes between steps (see param_watch.py)
        self.param_watch = ParamWatch()
        self._nonfinite_norm: Optional[float] = None  # set by clip_grad_norm_, read by step
        self._norm_read = False  # clip_grad_norm_ since the last step (offload's partials)
        self.scaler: Optional[LossScaler] = scaler_for(
            loss_scale, any(fg.dtype == torch.float16 for fg in self.flat_groups), scaler_kwargs)
        self.last_step_skipped = False
        self._clip_coef = 1.0
        self._grads_present = False
        if self.offload is not None:
            for fg in self.flat_groups:
                self.offload.add_group(fg)
        self.shard_state: List[Dict[str, Any]] = [self._init_state(fg) for fg in self.flat_groups]
        if stage == 3:
            own_shards(self, self.flat_groups, self.frozen_groups, self.shard_state,
                       self.offload)
            # A copy.deepcopy of the model (an EMA) is a sharded model with no optimizer: these
            # hooks gather its modules in its forward (they do nothing for this optimizer's).
            sharded_modules.install_gather_hooks(module)

    # ---- construction ------------------------------------------------------------------------

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
        check_new_group([p for p in group["params"] if p.requires_grad], self._names,
                        self.device, self.scaler is not None, self.flat_groups)
        self._check_ranks_agree(list(group["params"]))
        self._reduced()  # finish any reduction in flight before the buffers change
        super().add_param_group(group)
        added = self.builder.of_param_group(len(self.param_groups) - 1)
        first = len(self.flat_groups)
        self.flat_groups.extend(added)
        self.agreement.broadcast([fg.flat_param for fg in added])
        self.reducer.add_groups(added)
        self.exposed.add_groups(first, added)
        if self.offload is not None:
            for fg in added:
                self.offload.add_group(fg)
        self.shard_state.extend(self._init_state(fg) for fg in added)
        self._after_add_groups(added)

    def _after_add_groups(self, added: List[FlatGroup]) -> None:
        """Hook for subclasses that keep per-FlatGroup objects outside shard_state."""

    def _name_from_modules(self) -> None:
        name_from_modules(self._names, self.modules)

    def _check_ranks_agree(self, params) -> None:
        self.agreement.check(
            {"stage": self.stage, "bucket_mb": self.bucket_mb,
             "reduce_dtype": str(self.reduce_dtype), "offload": self.offload is not None,
             **self.topology_options.as_dict(), "node_size": self.topology.node_size,
             "shard_size": self.world_size},
            [(self._names[id(p)], tuple(sharded_init.whole_shape(p)), str(p.dtype),
              bool(p.requires_grad)) for p in params])

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
        self.exposed.forget_withdrawn(self.reducer.got)
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

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """Clips the global gradient norm (all shards, all ranks) to max_norm, like
        torch.nn.utils.clip_grad_norm_; the scaling is applied inside the next step's kernel.
        Returns the total norm before clipping (a 0-dim tensor). A non-finite norm raises here
        with error_if_nonfinite=True; otherwise the next step() raises, unless fp16 loss scaling
        skips it (where torch would write NaN into every parameter)."""
        self.settle()
        max_norm, norm_type = clip_arguments(max_norm, norm_type)
        self.peers.poll(f"{type(self).__name__}.clip_grad_norm_")
        self.exposed.withdraw(remove=False)
        self._reduced()
        norm = self.grad_checks.global_norm(norm_type) / self.loss_scale
        coef = clip_coefficient(norm, max_norm, norm_type, error_if_nonfinite)
        if coef is None:  # step() raises, unless loss scaling skips it
            self._nonfinite_norm = norm
        else:
            self._clip_coef, self._norm_read = coef, True
        return torch.tensor(norm, dtype=torch.float32)

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
        self.peers.poll(f"{type(self).__name__}.step")
        self._reattach()
        self.exposed.forget_withdrawn(self.reducer.got)
        self.exposed.withdraw()
        self._reduced()
        if not self._grads_present:
            self._consume_grads()
            return loss  # no backward since zero_grad: torch.optim skips params without grads
        self.last_step_skipped = False
        overflow, updated = self.grad_checks.agree(self.reducer.got,
                                                   check_overflow=self.scaler is not None)
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
        if self.deferred is not None:  # see [Note: deferred update]
            zero, self._grads_dirty = self._grads_dirty, False
            self.deferred.start(update_jobs(self.flat_groups, self.shard_state, self.param_groups,
                                            self.units, self._step_group, grad_scale, updated,
                                            zero_grads=zero), self.offload.h2d_stream.record)
        else:
            for fg, state, got in zip(self.flat_groups, self.shard_state, updated):
                if any(got):
                    self._step_group(fg, state, self.param_groups[fg.group_index], grad_scale,
                                     got)
            if self.offload is not None:
                self.offload.after_update()
        if self.stage in (1, 2):  # stage 3 gathers each unit when it runs
            self.reducer.all_gather_shards()
        if self.offload is not None and self.deferred is None:
            self.param_watch.record(self.flat_groups)
        if self.scaler is not None:
            self.scaler.update(overflow=False)
        self._consume_grads()
        return loss

    def _adopt_changed_params(self) -> None:
        """Masters kept apart from the parameters (with offload: every group's, on the host)
        take the values a script loaded into the model since (FlatGroup.adopt_changed_params):
        due before the first step after construction or a load, and with offload after
        ParamWatch saw a change."""
        self._master_check_due = False
        for fg, state in zip(self.flat_groups, self.shard_state):
            master = (self.offload.master(fg, state) if self.offload is not None
                      else state.get("master"))
            if master is not None:
                fg.adopt_changed_params(master)

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
        self.peers.poll(f"{type(self).__name__}.full_params")
        self._reduced()
        try:
            with self.units.full_params():
                yield
                if writeback:
                    with torch.no_grad():
                        for fg in self.flat_groups:
                            fg.write_gathered_into_shard()
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
        with raw():  # as ExposedGrads does: no stage-3 __torch_function__ per parameter
            for fg in self.flat_groups:
                for p in fg.params:
                    p.grad = None

    # ---- reports -----------------------------------------------------------------------------

    def memory_report(self) -> Dict[str, Any]:
        """Bytes this rank holds per category (see memory_reports.py)."""
        self.settle()
        return memory_report(self.flat_groups, self.shard_state,
                             frozen_groups=self.frozen_groups, modules=self.modules,
                             comm_buffer_bytes=self.reducer.comm_buffer_bytes,
                             offload=self.offload, units=self.units, device=self.device)

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
        stats = merged_stats(c.stats.as_dict() for c in self.groups.communicators())
        if self.offload is not None:
            stats.update(self.offload.stats())
        return stats

    def quantization_error(self) -> Dict[str, float]:
        """ZeRO++'s quantized collectives since the last reset_comm_stats(), per kind
        ("all_gather": qwZ, "reduce_scatter": qgZ's hops): the relative error
        ||round trip - values|| / ||values|| over the values this rank quantized and sent to
        itself (one host sync)."""
        self.settle()
        totals: Dict[str, list] = {}
        for c in self.groups.communicators():
            for kind, (err, ref) in c.stats.quantization.items():
                total = totals.setdefault(kind, [0.0, 0.0])
                total[0] += float(err)
                total[1] += float(ref)
        return {k: (err / ref) ** 0.5 if ref > 0 else 0.0 for k, (err, ref) in totals.items()}

    def reset_comm_stats(self) -> None:
        self.settle()
        for c in self.groups.communicators():
            c.stats = type(c.stats)()
        if self.offload is not None:
            self.offload.reset_stats()

    # ---- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """This rank's shard of the optimizer state, torch.optim-shaped, with a 'zeroshard'
        section describing the layout. Not a collective (scripts call it on rank 0 only), so it
        loads back only on the same rank, world size and stage; see full_state_dict() for a
        rank-independent one and zeroshard.checkpoint for sharded files."""
        self.settle()
        return self._state_dicts().shard_state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads a state_dict() of this rank, or a full_state_dict() / stock torch.optim state
        dict on any rank. Validates everything first: on error nothing has changed."""
        self.settle()
        self._state_dicts().load_state_dict(state_dict)
        self._master_check_due = True  # the model may be loaded after the optimizer
        self._after_load()

    def full_state_dict(self) -> Dict[str, Any]:
        """The whole optimizer state in torch.optim's format ('state' keyed by parameter index
        with tensors shaped like the parameters, 'param_groups'); loads on any rank, world size
        and stage, and into the stock torch.optim optimizer. A collective: every rank must call
        it (each gets the same dict); a call on one rank only fails with an error saying so."""
        self.settle()
        if self.world_size > 1:
            rendezvous_for(self.process_group, self.timeout_s).enter(
                f"{type(self).__name__}.full_state_dict")
        self._reattach()
        return self._state_dicts().full_state_dict()

    def _state_dicts(self) -> StateDicts:
        return StateDicts(self.flat_groups, self.shard_state, self.param_groups,
                          stage=self.stage, comm=self.comm, device=self.device,
                          scaler=self.scaler)

    def _after_load(self) -> None:
        """Hook for subclasses whose state lives partly outside shard_state."""

    # ---- sharded checkpoints (zeroshard.checkpoint) ------------------------------------------
    # Accessors for zeroshard.checkpoint, which owns the file format and resharding. "State
    # space" is the shard (stages 1/2) or the whole flat buffer (stage 0), as in shard_state.

    def checkpoint_state(self, index: int):
        """Flat group `index`'s state: (state-space tensors by name, JSON-able scalars)."""
        self.settle()
        return self._state_dicts().group_state(index)

    def load_checkpoint_state(self, index: int, tensors: Dict[str, torch.Tensor],
                              scalars: Dict[str, Any]) -> None:
        """Copies already-validated state in (same keys and shapes as checkpoint_state)."""
        self.settle()
        self._state_dicts().load_group_state(index, tensors, scalars)

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
