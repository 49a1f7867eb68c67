"""The ZeRO optimizers users construct: ZeroAdamW, ZeroAdam, ZeroSGD and ZeroRedundancy.

Each owns only the maths of its shard: which state tensors a FlatGroup's shard needs and how one
step updates them. Everything else (reduction, clipping, loss scaling, gathering, reports,
checkpoints) is ZeroOptimizer's.
"""
from __future__ import annotations

import bisect
import inspect
from typing import Any, Dict, List, Optional, Tuple, Type

import torch

from . import ops
from .sharding.flat_group import FlatGroup
from .zero_optimizer import ZeroOptimizer
from .sharding.zero_options import SCALER_KWARGS

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
    return tuple(p.name for p in params if p.kind == p.KEYWORD_ONLY) + tuple(SCALER_KWARGS)


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


def _shard_pieces(fg: FlatGroup, master: Optional[torch.Tensor], offload: bool = False):
    """(param, grad, param_copy, shard_start, n) for each non-empty piece of the rank's shard:
    `param` is fp32 (the flat buffer itself, or the master shard for low-precision params), and
    `param_copy` the low-precision model view the kernel writes in the same pass (or None).
    With offload, `param` is the host master and `param_copy` None (_kernel_runs gives each
    run a staging buffer)."""
    for b0, b1, s0 in fg.shard_slices():
        n = b1 - b0
        if n == 0:
            continue
        grad = fg.shard_grads(b0, b1, s0)
        if offload:
            yield master[s0:s0 + n], grad, None, s0, n
        elif master is None:
            yield fg.param_values(b0, b1, s0), grad, None, s0, n
        else:
            yield master[s0:s0 + n], grad, fg.param_values(b0, b1, s0), s0, n


# [Note: per-parameter steps] torch.optim skips a parameter whose p.grad is None at step(): its
# value, its state and its own `step` count stay as they are (a head used on some batches only,
# a branch not taken). So each FlatGroup's state keeps one step count per parameter,
# state["param_steps"] (state["step"] is their maximum, kept for older readers), and a step
# updates only the parameters that got a gradient on some rank. When all did and all have the
# same count, the kernels run once per shard piece as before; otherwise once per run of
# consecutive updated parameters with the same count (padding between them rides along: it
# is zero and stays zero).


def param_steps(state: Dict[str, Any], fg: FlatGroup) -> List[int]:
    """state["param_steps"], created from state["step"] for state saved before it existed."""
    steps = state.get("param_steps")
    if not isinstance(steps, list) or len(steps) != len(fg.params):
        steps = state["param_steps"] = [int(state.get("step", 0))] * len(fg.params)
    return steps


def _advance_steps(state: Dict[str, Any], fg: FlatGroup, updated: List[bool]) -> List[int]:
    steps = param_steps(state, fg)
    for j, got in enumerate(updated):
        if got:
            steps[j] += 1
    state["step"] = max(steps, default=0)
    return steps


def _kernel_runs(opt: ZeroOptimizer, fg: FlatGroup, state: Dict[str, Any], steps: List[int],
                 updated: List[bool]):
    """_run_pieces for opt's step of fg. With offload each run's parameters are copied to the
    device as soon as its kernel has returned (the code after `yield` runs then), so that copy
    overlaps the next run's kernel (see [Note: offload pipeline])."""
    host = opt.offload
    if host is None:
        yield from _run_pieces(fg, state.get("master"), steps, updated)
        return
    low_precision = fg.dtype != torch.float32
    for param, grad, _, s0, n, step in _run_pieces(fg, host.master(fg, state), steps, updated,
                                                   offload=True):
        staged = host.staging_buffer(fg.dtype, n) if low_precision else None
        host.kernel_starting()
        yield param, grad, staged, s0, n, step
        host.upload(fg, s0, n, staged)


def _run_pieces(fg: FlatGroup, master: Optional[torch.Tensor], steps: List[int],
                updated: List[bool], offload: bool = False):
    """(param, grad, param_copy, state_start, n, step) for each kernel call of one step: the
    shard pieces (as _shard_pieces) when every parameter is updated at the same step count,
    else the runs of consecutive updated parameters with equal counts within them."""
    if all(updated) and len(set(steps)) <= 1:
        step = steps[0] if steps else 0
        for param, grad, copy, s0, n in _shard_pieces(fg, master, offload):
            yield param, grad, copy, s0, n, step
        return
    segments = sorted((st, st + (p1 - p0), j) for j, pieces in enumerate(fg.param_shard_pieces)
                      for p0, p1, st in pieces)
    starts = [seg[0] for seg in segments]
    for param, grad, copy, s0, n in _shard_pieces(fg, master, offload):
        runs = []  # [state_start, state_end, step]
        cut = True
        i = max(0, bisect.bisect_right(starts, s0) - 1)
        while i < len(segments) and segments[i][0] < s0 + n:
            a, e, j = segments[i]
            i += 1
            a, e = max(a, s0), min(e, s0 + n)
            if a >= e:
                continue
            if not updated[j]:
                cut = True
            elif not cut and runs[-1][2] == steps[j]:
                runs[-1][1] = e
            else:
                runs.append([a, e, steps[j]])
                cut = False
        for a, e, step in runs:
            lo, hi = a - s0, e - s0
            yield (param[lo:hi], grad[lo:hi], None if copy is None else copy[lo:hi], a, e - a,
                   step)


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
            "param_steps": [0] * len(fg.params),
            "exp_avg": self._state_zeros(fg),
            "exp_avg_sq": self._state_zeros(fg),
        }
        # For every group when any has it, so a scheduler may switch it on for another group.
        if any(g["amsgrad"] for g in self.param_groups):
            state["max_exp_avg_sq"] = self._state_zeros(fg)
        master = self._master(fg)
        if master is not None:
            state["master"] = master
        return state

    def _step_group(self, fg, state, group, grad_scale, updated) -> None:
        _check_betas(group["betas"])
        amsgrad = bool(group["amsgrad"])
        if amsgrad and "max_exp_avg_sq" not in state:
            raise ValueError(f"amsgrad was switched on after construction; construct "
                             f"{type(self).__name__} with amsgrad=True (in the defaults or this "
                             "param group) so that max_exp_avg_sq is allocated")
        steps = _advance_steps(state, fg, updated)
        for param, grad, copy, s0, n, step in _kernel_runs(self, fg, state, steps, updated):
            ops.adam_step(param, grad, state["exp_avg"][s0:s0 + n],
                          state["exp_avg_sq"][s0:s0 + n], lr=float(group["lr"]),
                          betas=group["betas"], eps=group["eps"],
                          weight_decay=group["weight_decay"], step=step,
                          decoupled=bool(group["decoupled_weight_decay"]), amsgrad=amsgrad,
                          max_exp_avg_sq=state["max_exp_avg_sq"][s0:s0 + n] if amsgrad else None,
                          maximize=bool(group["maximize"]), grad_scale=grad_scale,
                          param_copy=copy, check_finite=False)


class ZeroAdamW(_ZeroAdamBase):
    """torch.optim.AdamW, partitioned (stage 0/1/2/3) over the data-parallel ranks.

    ZeroAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
              *, maximize=False, foreach=None, capturable=False, differentiable=False,
              fused=None, stage=2, process_group=None, bucket_mb=None, overlap=True,
              reduce_dtype=None, loss_scale="dynamic", timeout_s=300, offload=None)
    offload="cpu" (stages 1-3) keeps this rank's master, state and reduced gradients in host
    memory and steps them on the CPU kernels (host_offload.py); at stage 3 module=, units=,
    prefetch=, reshard_after_forward= and partition_frozen= (default True: frozen parameters
    are partitioned too, see param_units.py) apply too.
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
        state: Dict[str, Any] = {"step": 0, "param_steps": [0] * len(fg.params)}
        if any(g["momentum"] != 0 for g in self.param_groups):
            state["momentum_buffer"] = self._state_zeros(fg)
        master = self._master(fg)
        if master is not None:
            state["master"] = master
        return state

    def _step_group(self, fg, state, group, grad_scale, updated) -> None:
        momentum = group["momentum"]
        if momentum != 0 and "momentum_buffer" not in state:
            raise ValueError("momentum was switched on after construction; construct ZeroSGD "
                             "with momentum > 0 in the param group instead")
        steps = _advance_steps(state, fg, updated)
        for param, grad, copy, s0, n, step in _kernel_runs(self, fg, state, steps, updated):
            buf = state["momentum_buffer"][s0:s0 + n] if momentum != 0 else None
            ops.sgd_step(param, grad, buf, lr=float(group["lr"]), momentum=momentum,
                         dampening=group["dampening"], weight_decay=group["weight_decay"],
                         nesterov=group["nesterov"], first_step=step == 1,
                         maximize=bool(group["maximize"]), grad_scale=grad_scale,
                         param_copy=copy, check_finite=False)


# torch optimizers whose update of an element depends only on that element's own history.
ELEMENTWISE_OPTIMIZERS = ("SGD", "Adam", "AdamW", "Adamax", "Adagrad", "Adadelta", "RMSprop",
                          "Rprop", "NAdam", "RAdam", "ASGD")


class ZeroRedundancy(ZeroOptimizer):
    """Any elementwise torch optimizer, run on this rank's flat fp32 shard.

    ZeroRedundancy(params, optimizer_class=torch.optim.Adagrad, *, stage=2, **optimizer_kwargs)
    Each FlatGroup's shard is kept as a persistent fp32 master shard (also for fp32 models: 4
    bytes x shard); each parameter's piece of it (a view) is one parameter of an inner
    `optimizer_class` instance, one inner param group per FlatGroup, so that a parameter that
    got no gradient this step is given p.grad = None and skipped by the inner optimizer, with
    its own step count, as torch skips it. Optimizers
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
        if optimizer_kwargs.get("offload") not in (None, "none"):
            raise ValueError("ZeroRedundancy does not offload (its inner torch optimizer steps "
                             "on the device): use ZeroAdamW, ZeroAdam or ZeroSGD with "
                             "offload='cpu'")
        optimizer_kwargs.pop("offload", None)
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
        # (state_start, state_end, parameter index) of each inner parameter, per FlatGroup.
        self.inner_pieces: List[List[Tuple[int, int, int]]] = []
        self.inner = optimizer_class(
            [self._inner_group(fg) for fg in self.flat_groups], **optimizer_kwargs)

    def _inner_group(self, fg: FlatGroup) -> Dict[str, Any]:
        """fg's inner param group: one inner parameter per parameter piece of the shard, each
        a view of the master shard (padding between parameters is in none: it stays zero)."""
        master = self.shard_state[self.flat_groups.index(fg)]["master"]
        pieces = sorted((st, st + (p1 - p0), j) for j, ps in enumerate(fg.param_shard_pieces)
                        for p0, p1, st in ps)
        self.inner_pieces.append(pieces)
        views = [torch.nn.Parameter(master.detach()[a:e], requires_grad=True)
                 for a, e, _ in pieces]
        hyper = {k: v for k, v in self.param_groups[fg.group_index].items() if k != "params"}
        return dict(hyper, params=views)

    def _after_add_groups(self, added) -> None:
        for fg in added:
            self.inner.add_param_group(self._inner_group(fg))

    def _init_state(self, fg: FlatGroup) -> Dict[str, Any]:
        return {"master": torch.nn.Parameter(fg.shard_as_fp32(), requires_grad=True)}

    def _step_group(self, fg, state, group, grad_scale, updated) -> None:
        index = self.flat_groups.index(fg)
        inner_group = self.inner.param_groups[index]
        for k, v in group.items():
            if k != "params":
                inner_group[k] = v  # lr schedulers change the outer groups
        grad = fg.reduced_grads  # the shard (stage 0: the whole buffer), in shard space
        grad = grad.mul(1.0 / grad_scale) if grad_scale != 1.0 else grad.clone()
        views = inner_group["params"]
        for view, (a, e, j) in zip(views, self.inner_pieces[index]):
            view.grad = grad[a:e] if updated[j] else None  # None: skipped, as in torch
        self.inner.step()
        for view in views:
            view.grad = None
        fg.write_shard(state["master"].detach())

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["inner"] = self.inner.state_dict()
        return sd

    def full_state_dict(self) -> Dict[str, Any]:
        raise NotImplementedError(
            "ZeroRedundancy keeps its state in an inner torch optimizer, which "
            "full_state_dict() does not consolidate yet; use ZeroAdamW/ZeroAdam/ZeroSGD, "
            "or save opt.state_dict() per rank")

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if "inner" not in state_dict:
            raise ValueError("state_dict has no 'inner' section: not saved by ZeroRedundancy")
        inner = self._inner_from_flat(state_dict["inner"])
        super().load_state_dict(state_dict)
        self.inner.load_state_dict(inner)

    def _inner_from_flat(self, inner: Dict[str, Any]) -> Dict[str, Any]:
        """An inner state dict saved when each FlatGroup's master shard was one inner
        parameter (before per-parameter pieces): its shard-sized tensors cut into the pieces,
        its scalars (step) given to every piece. Newer ones are returned as they are."""
        groups = inner.get("param_groups", [])
        if len(groups) != len(self.inner_pieces) or all(
                len(g["params"]) == len(pieces) for g, pieces in zip(groups, self.inner_pieces)):
            return inner
        if not all(len(g["params"]) == 1 for g in groups):
            return inner  # let the inner optimizer report the mismatch
        state, new_groups, next_index = {}, [], 0
        for g, fg, pieces in zip(groups, self.flat_groups, self.inner_pieces):
            saved = inner["state"].get(g["params"][0], {})
            indices = []
            for a, e, _ in pieces:
                entry = {}
                for k, v in saved.items():
                    if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == fg.shard_numel:
                        entry[k] = v[a:e].clone()
                    else:
                        entry[k] = v.clone() if isinstance(v, torch.Tensor) else v
                if entry:
                    state[next_index] = entry
                indices.append(next_index)
                next_index += 1
            new_groups.append(dict(g, params=indices))
        return {"state": state, "param_groups": new_groups}
