"""The ZeRO optimizers users construct: ZeroAdamW, ZeroAdam, ZeroSGD and ZeroRedundancy.

Each owns only the maths of its shard: which state tensors a FlatGroup's shard needs and how one
step updates them. Everything else (reduction, clipping, loss scaling, gathering, reports,
checkpoints) is ZeroOptimizer's.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Tuple, Type

import torch

from . import ops
from .flat_group import FlatGroup
from .zero_optimizer import _SCALER_KWARGS, ZeroOptimizer

# [Note: torch.optim arguments] Every argument of torch.optim.Adam/AdamW/SGD is honoured or
# refused, never ignored. Maths flags (amsgrad, maximize, decoupled_weight_decay) run in the
# kernels and are read per param group at each step, as torch reads them. foreach/fused choose
# torch's implementation, not the maths: zeroshard always runs its own fused kernels, so they are
# accepted and stored in the groups like torch does. capturable and differentiable promise
# things a sharded, communicating, in-place step cannot give, so they are refused.


def _check_betas(betas: Tuple[float, float]) -> None:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")


def _check_lr(lr) -> None:
    # torch accepts a 1-element tensor lr; it is read with float() at each step, so changing it
    # in place (lr.fill_(...)) takes effect as it does in torch.
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"a Tensor lr must have one element, got shape {tuple(lr.shape)}")
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr}")


def _zero_keywords() -> Tuple[str, ...]:
    """ZeroOptimizer's own keyword arguments (stage, process_group, bucket_mb, ...)."""
    params = inspect.signature(ZeroOptimizer.__init__).parameters.values()
    return tuple(p.name for p in params if p.kind == p.KEYWORD_ONLY) + tuple(_SCALER_KWARGS)


def _check_zero_kwargs(cls_name: str, torch_args: Tuple[str, ...], zero_kwargs: Dict[str, Any]) -> None:
    unknown = set(zero_kwargs) - set(_zero_keywords())
    if unknown:
        raise TypeError(f"{cls_name} got unexpected keyword arguments {sorted(unknown)}. It "
                        f"accepts torch.optim's {', '.join(torch_args)} and zeroshard's "
                        f"{', '.join(_zero_keywords())}")


def _check_group_flags(cls_name: str, torch_name: str, group: Dict[str, Any]) -> None:
    """Refuses the implementation flags zeroshard cannot honour (see [Note: torch.optim
    arguments]); called for the defaults and for every param group."""
    if group.get("capturable", False):
        raise ValueError(
            f"{cls_name} does not support capturable=True: it makes torch's step safe to capture "
            "in a CUDA graph, and a zeroshard step cannot be captured (it communicates between "
            "ranks and decides on the host whether to skip a step). Leave capturable=False; the "
            "fused kernels need no graph capture to avoid per-tensor launches.")
    if group.get("differentiable", False):
        raise ValueError(
            f"{cls_name} does not support differentiable=True: zeroshard updates flat parameter "
            "shards in place under torch.no_grad(), so no autograd graph can run through step(). "
            f"To differentiate through the optimizer step, use torch.optim.{torch_name}(..., "
            "differentiable=True) without sharding.")
    if group.get("foreach") and group.get("fused"):
        raise ValueError("fused=True and foreach=True cannot be set together (torch.optim refuses "
                         "it too); zeroshard always runs its own fused kernels, so leave both unset")
    _check_lr(group.get("lr", 0.0))


def _shard_pieces(fg: FlatGroup, master: Optional[torch.Tensor]):
    """(param, grad, param_copy, shard_start, n) for each non-empty piece of the rank's shard:
    `param` is fp32 (the flat buffer itself, or the master shard for low-precision params), and
    `param_copy` the low-precision model view the kernel writes in the same pass (or None)."""
    for b0, b1, s0 in fg.shard_slices():
        n = b1 - b0
        if n == 0:
            continue
        grad = fg.shard_grads(b0, b1, s0)
        if master is None:
            yield fg.param_values(b0, b1, s0), grad, None, s0, n
        else:
            yield master[s0:s0 + n], grad, fg.param_values(b0, b1, s0), s0, n


class _TorchArgumentsMixin:
    """Checks each param group's flags as it is added (at construction and later)."""
    torch_name = ""

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):
            _check_group_flags(type(self).__name__, self.torch_name, {**self.defaults, **param_group})
        super().add_param_group(param_group)


ADAM_ARGS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "foreach", "maximize", "capturable",
             "differentiable", "fused")


class _ZeroAdamBase(_TorchArgumentsMixin, ZeroOptimizer):
    torch_name = "Adam"

    def _construct(self, params, *, lr, betas, eps, weight_decay, amsgrad, foreach, maximize,
                   capturable, differentiable, fused, decoupled_weight_decay, zero_kwargs,
                   torch_args) -> None:
        _check_zero_kwargs(type(self).__name__, torch_args, zero_kwargs)
        _check_lr(lr)
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        betas = tuple(float(b) for b in betas)  # torch turns 1-element tensor betas into scalars
        _check_betas(betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        _check_group_flags(type(self).__name__, self.torch_name, defaults)
        super().__init__(params, defaults, **zero_kwargs)

    def _init_state(self, fg: FlatGroup) -> Dict[str, Any]:
        state: Dict[str, Any] = {
            "step": 0,
            "exp_avg": torch.zeros(fg.shard_numel, dtype=torch.float32, device=fg.device),
            "exp_avg_sq": torch.zeros(fg.shard_numel, dtype=torch.float32, device=fg.device),
        }
        # For every group when any has it, so a scheduler may switch it on for another group.
        if any(g["amsgrad"] for g in self.param_groups):
            state["max_exp_avg_sq"] = torch.zeros(fg.shard_numel, dtype=torch.float32,
                                                  device=fg.device)
        master = self._master(fg)
        if master is not None:
            state["master"] = master
        return state

    def _step_group(self, fg, state, group, grad_scale) -> None:
        _check_betas(group["betas"])
        amsgrad = bool(group["amsgrad"])
        if amsgrad and "max_exp_avg_sq" not in state:
            raise ValueError(f"amsgrad was switched on after construction; construct "
                             f"{type(self).__name__} with amsgrad=True (in the defaults or this "
                             "param group) so that max_exp_avg_sq is allocated")
        state["step"] += 1
        for param, grad, copy, s0, n in _shard_pieces(fg, state.get("master")):
            ops.adam_step(param, grad, state["exp_avg"][s0:s0 + n],
                          state["exp_avg_sq"][s0:s0 + n], lr=float(group["lr"]),
                          betas=group["betas"], eps=group["eps"],
                          weight_decay=group["weight_decay"], step=state["step"],
                          decoupled=bool(group["decoupled_weight_decay"]), amsgrad=amsgrad,
                          max_exp_avg_sq=state["max_exp_avg_sq"][s0:s0 + n] if amsgrad else None,
                          maximize=bool(group["maximize"]), grad_scale=grad_scale,
                          param_copy=copy, check_finite=False)


class ZeroAdamW(_ZeroAdamBase):
    """torch.optim.AdamW, partitioned (stage 0/1/2) over the data-parallel ranks.

    ZeroAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
              *, maximize=False, foreach=None, capturable=False, differentiable=False,
              fused=None, stage=2, process_group=None, bucket_mb=None, overlap=True,
              reduce_dtype=None, loss_scale="dynamic", timeout_s=300)
    amsgrad and maximize are honoured (per param group too); foreach and fused are accepted
    and stored (zeroshard is always fused); capturable and differentiable are refused.
    """
    torch_name = "AdamW"

    def __init__(self, params, lr=1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: Optional[bool] = None,
                 capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, **zero_kwargs) -> None:
        self._construct(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, foreach=foreach, maximize=maximize,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=True, zero_kwargs=zero_kwargs,
                        torch_args=ADAM_ARGS)


class ZeroAdam(_ZeroAdamBase):
    """torch.optim.Adam (L2 weight decay added to the gradient; decoupled_weight_decay=True
    makes it AdamW, as in torch), partitioned. Arguments as ZeroAdamW's, plus
    decoupled_weight_decay."""
    torch_name = "Adam"

    def __init__(self, params, lr=1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 foreach: Optional[bool] = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, decoupled_weight_decay: bool = False,
                 **zero_kwargs) -> None:
        self._construct(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, foreach=foreach, maximize=maximize,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay, zero_kwargs=zero_kwargs,
                        torch_args=ADAM_ARGS + ("decoupled_weight_decay",))


SGD_ARGS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach",
            "differentiable", "fused")


class ZeroSGD(_TorchArgumentsMixin, ZeroOptimizer):
    """torch.optim.SGD (momentum, dampening, nesterov, weight decay, maximize), partitioned.

    ZeroSGD(params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
            maximize=False, foreach=None, differentiable=False, fused=None, stage=2, ...)
    foreach and fused are accepted and stored; differentiable is refused.
    """
    torch_name = "SGD"

    def __init__(self, params, lr=1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False,
                 fused: Optional[bool] = None, **zero_kwargs) -> None:
        _check_zero_kwargs(type(self).__name__, SGD_ARGS, zero_kwargs)
        _check_lr(lr)
        if not momentum >= 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov requires momentum > 0 and dampening == 0")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                        foreach=foreach, differentiable=differentiable, fused=fused)
        _check_group_flags(type(self).__name__, self.torch_name, defaults)
        super().__init__(params, defaults, **zero_kwargs)

    def _init_state(self, fg: FlatGroup) -> Dict[str, Any]:
        state: Dict[str, Any] = {"step": 0}
        if any(g["momentum"] != 0 for g in self.param_groups):
            state["momentum_buffer"] = torch.zeros(fg.shard_numel, dtype=torch.float32,
                                                   device=fg.device)
        master = self._master(fg)
        if master is not None:
            state["master"] = master
        return state

    def _step_group(self, fg, state, group, grad_scale) -> None:
        state["step"] += 1
        momentum = group["momentum"]
        if momentum != 0 and "momentum_buffer" not in state:
            raise ValueError("momentum was switched on after construction; construct ZeroSGD "
                             "with momentum > 0 in the param group instead")
        for param, grad, copy, s0, n in _shard_pieces(fg, state.get("master")):
            buf = state["momentum_buffer"][s0:s0 + n] if momentum != 0 else None
            ops.sgd_step(param, grad, buf, lr=float(group["lr"]), momentum=momentum,
                         dampening=group["dampening"], weight_decay=group["weight_decay"],
                         nesterov=group["nesterov"], first_step=state["step"] == 1,
                         maximize=bool(group["maximize"]), grad_scale=grad_scale,
                         param_copy=copy, check_finite=False)


# torch optimizers whose update of an element depends only on that element's own history.
ELEMENTWISE_OPTIMIZERS = ("SGD", "Adam", "AdamW", "Adamax", "Adagrad", "Adadelta", "RMSprop",
                          "Rprop", "NAdam", "RAdam", "ASGD")


class ZeroRedundancy(ZeroOptimizer):
    """Any elementwise torch optimizer, run on this rank's flat fp32 shard.

    ZeroRedundancy(params, optimizer_class=torch.optim.Adagrad, *, stage=2, **optimizer_kwargs)
    Each FlatGroup's shard becomes one flat fp32 parameter of an inner `optimizer_class`
    instance (a persistent fp32 master shard, also for fp32 models: 4 bytes x shard). Optimizers
    that need a tensor's shape (LBFGS, SparseAdam, Adafactor, Muon...) are rejected;
    `assume_elementwise=True` accepts an optimizer not on the known list at your own risk.
    """

    def __init__(self, params, optimizer_class: Type[torch.optim.Optimizer] = torch.optim.AdamW,
                 *, stage: int = 2, process_group=None, bucket_mb: Optional[float] = None,
                 overlap: bool = True, reduce_dtype=None, loss_scale: Any = "dynamic",
                 assume_elementwise: bool = False, timeout_s: float = 300.0,
                 **optimizer_kwargs) -> None:
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
        if issubclass(optimizer_class, ZeroOptimizer):
            raise TypeError(f"{optimizer_class.__name__} is already a zeroshard optimizer; use it directly")
        if optimizer_class.__name__ not in ELEMENTWISE_OPTIMIZERS and not assume_elementwise:
            raise ValueError(
                f"{optimizer_class.__name__} is not known to be elementwise: sharding it would change "
                f"its maths if it looks at whole tensors (LBFGS, SparseAdam, Adafactor and Muon do). "
                f"Known elementwise: {', '.join(ELEMENTWISE_OPTIMIZERS)}. Pass "
                "assume_elementwise=True if you are sure.")
        self.optimizer_class = optimizer_class
        self.optimizer_kwargs = dict(optimizer_kwargs)
        # Validate the kwargs now, on a throwaway parameter, so bad ones fail at construction.
        probe = optimizer_class([torch.zeros(1, requires_grad=True)], **optimizer_kwargs)
        defaults = dict(probe.defaults)
        self.inner: Optional[torch.optim.Optimizer] = None
        super().__init__(params, defaults, stage=stage, process_group=process_group,
                         bucket_mb=bucket_mb, overlap=overlap, reduce_dtype=reduce_dtype,
                         loss_scale=loss_scale, timeout_s=timeout_s)
        groups = []
        for fg, state in zip(self.flat_groups, self.shard_state):
            hyper = {k: v for k, v in self.param_groups[fg.group_index].items() if k != "params"}
            groups.append(dict(hyper, params=[state["master"]]))
        self.inner = optimizer_class(groups, **optimizer_kwargs)

    def _after_add_groups(self, added) -> None:
        for fg in added:
            state = self.shard_state[self.flat_groups.index(fg)]
            hyper = {k: v for k, v in self.param_groups[fg.group_index].items() if k != "params"}
            self.inner.add_param_group(dict(hyper, params=[state["master"]]))

    def _init_state(self, fg: FlatGroup) -> Dict[str, Any]:
        return {"master": torch.nn.Parameter(fg.shard_as_fp32(), requires_grad=True)}

    def _step_group(self, fg, state, group, grad_scale) -> None:
        index = self.flat_groups.index(fg)
        inner_group = self.inner.param_groups[index]
        for k, v in group.items():
            if k != "params":
                inner_group[k] = v  # lr schedulers change the outer groups
        master = state["master"]
        grad = fg.reduced_grads  # the shard (stage 0: the whole buffer), in shard space
        master.grad = grad.mul(1.0 / grad_scale) if grad_scale != 1.0 else grad.clone()
        self.inner.step()
        master.grad = None
        fg.write_shard(master.detach())

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["inner"] = self.inner.state_dict()
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if "inner" not in state_dict:
            raise ValueError("state_dict has no 'inner' section: not saved by ZeroRedundancy")
        super().load_state_dict(state_dict)
        self.inner.load_state_dict(state_dict["inner"])
