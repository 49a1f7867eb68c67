"""What each torch operation means on a sharded tensor (see sharded_tensor.py's note).

Owns the table of operations: metadata answered from the spec, aliases, elementwise operations
run on the local pieces (and on the fp32 master of an optimizer-owned parameter), whole-tensor
inits run on a whole temporary so they consume the random generator as an unsharded model would,
reductions completed by one collective, and the error for everything else. Called with torch
function handling off for sharded tensors (the local values are plain tensors).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_map

from ..comm import call_tags
from .sharded_tensor import (ShardedAccessError, ShardedTensor, ShardSpec, make_sharded,
                             set_torch_function_handler)

# Read or set about the tensor object, not its values.
_PASS_GET = {"dtype", "device", "requires_grad", "is_leaf", "grad", "grad_fn", "layout",
             "is_cuda", "is_cpu", "is_meta", "is_sparse", "is_quantized", "is_nested",
             "is_mkldnn", "itemsize", "_version", "names", "output_nr", "_base", "is_xpu",
             "is_mps", "_grad", "_grad_fn", "_backward_hooks", "_post_accumulate_grad_hooks"}
_PASS_CALL = {"requires_grad_", "register_hook", "register_post_accumulate_grad_hook",
              "__hash__", "data_ptr", "untyped_storage", "element_size", "is_floating_point",
              "is_complex", "get_device", "is_pinned", "is_shared", "retain_grad",
              "__setstate__", "__dir__", "is_signed", "_is_view", "storage_offset",
              "is_inference", "_typed_storage", "storage", "share_memory_", "__get__",
              "__instancecheck__", "__subclasscheck__", "_has_compatible_shallow_copy_type"}
_SHAPE = {"size", "numel", "dim", "ndimension", "nelement", "__len__", "stride",
          "is_contiguous"}
# A whole tensor shaped or typed after a sharded one: only its shape, dtype and device are read.
_TEMPLATE_ARG = {"view_as", "reshape_as", "expand_as", "type_as"}
_NEW = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}
# Write every element without reading any: run on a whole temporary, keep this rank's pieces.
_FILLS = {"normal_", "uniform_", "bernoulli_", "exponential_", "random_", "log_normal_",
          "cauchy_", "geometric_", "zeros_", "ones_", "constant_", "trunc_normal_",
          "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
          "orthogonal_", "sparse_", "eye_", "dirac_"}
_LIKE = {"zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like",
         "randint_like"}
_CONVERSIONS = {"to", "type", "float", "double", "half", "bfloat16", "cpu", "cuda", "contiguous",
                "clone", "type_as"}
_ALIASES = {"detach", "detach_"}
_REDUCTIONS = {"sum", "nansum", "mean", "nanmean", "norm", "vector_norm", "linalg_vector_norm",
               "linalg_norm", "max", "min", "amax",
               "amin", "all", "any", "count_nonzero", "std", "var", "equal", "allclose",
               "_foreach_norm", "dist"}
_DUNDERS = {"__add__": "add", "__radd__": "add", "__iadd__": "add_", "__sub__": "sub",
            "__rsub__": "sub", "__isub__": "sub_", "__mul__": "mul", "__rmul__": "mul",
            "__imul__": "mul_", "__truediv__": "div", "__rtruediv__": "div",
            "__itruediv__": "div_", "__neg__": "neg", "__pos__": "positive", "__pow__": "pow",
            "__rpow__": "pow", "__ipow__": "pow_", "__abs__": "abs", "__eq__": "eq",
            "__ne__": "ne", "__lt__": "lt", "__le__": "le", "__gt__": "gt", "__ge__": "ge",
            "__and__": "bitwise_and", "__or__": "bitwise_or", "__xor__": "bitwise_xor",
            "__invert__": "bitwise_not", "__mod__": "remainder", "__floordiv__": "floor_divide"}
_ELEMENTWISE_EXTRA = {"copy_", "fill_", "zero_", "where", "masked_fill", "masked_fill_",
                      "eq", "ne", "lt", "le", "gt", "ge", "eq_", "ne_", "lt_", "le_", "gt_",
                      "ge_", "sub", "sub_", "rsub", "isfinite", "isnan", "isinf", "nan_to_num",
                      "nan_to_num_", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max",
                      "clamp_max_", "clip", "clip_", "positive", "lerp", "lerp_", "mul", "mul_",
                      "add", "add_", "div", "div_", "abs", "abs_", "neg", "neg_", "sign",
                      "sign_", "square", "square_", "isclose"}


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


def _property(func) -> Optional[Tuple[str, str]]:
    """(property name, '__get__' or '__set__') when func is a tensor property's accessor."""
    owner = getattr(func, "__self__", None)
    prop = getattr(owner, "__name__", None)
    if prop is not None and _name(func) in ("__get__", "__set__") and \
            type(owner).__name__ in ("getset_descriptor", "property", "member_descriptor"):
        return prop, _name(func)
    return None


@functools.lru_cache(maxsize=None)
def _elementwise(name: str) -> bool:
    name = _DUNDERS.get(name, name)
    if name.startswith("_foreach_"):
        return _elementwise(name[len("_foreach_"):])
    if name in _ELEMENTWISE_EXTRA:
        return True
    packet = getattr(torch.ops.aten, name, None)
    if packet is None or not hasattr(packet, "overloads"):
        return False
    return any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())


def _in_place(name: str) -> bool:
    if name.startswith("__i") and name in _DUNDERS:
        return True
    return name.endswith("_") and not name.startswith("__")


def _sharded_in(tree) -> List[ShardedTensor]:
    return [a for a in tree_flatten(tree)[0] if isinstance(a, ShardedTensor)]


def access_error(t: ShardedTensor, what: str) -> ShardedAccessError:
    spec = t._zs.spec
    return ShardedAccessError(
        f"{spec.name} (shape {tuple(spec.shape)}) is sharded across {spec.world_size} ranks by "
        f"zeroshard stage 3 (this rank holds {spec.local_numel()} of its {spec.numel} elements), "
        f"so {what} cannot run on it outside its unit's gather. Wrap the code in "
        "`with zeroshard.full_params(model):` (a collective: every rank enters it, and the whole "
        "model is gathered until it ends; writeback=True keeps changes), or run it inside the "
        "model's forward. Elementwise ops, inits, copies and reductions (norm, sum, max) work on "
        "sharded parameters directly.")


def handle(func, args: tuple, kwargs: Dict[str, Any]):
    name = _name(func)
    accessor = _property(func)
    if accessor is not None:
        return _property_access(func, accessor, args)
    # torch.nn.init's functions pass their tensor by keyword
    target = args[0] if args else kwargs.get("tensor")
    if name in _PASS_CALL:
        return func(*args, **kwargs)
    if name in _SHAPE and isinstance(target, ShardedTensor):
        return _shape_query(name, target, args[1:], kwargs)
    if name in _NEW and isinstance(target, ShardedTensor):
        return func(*args, **kwargs)  # a new whole tensor of the placeholder's dtype and device
    if name in _TEMPLATE_ARG and not isinstance(target, ShardedTensor) and len(args) == 2 \
            and isinstance(args[1], ShardedTensor):
        template = args[1]
        return func(target, torch.empty(template._zs.spec.shape, dtype=template.dtype,
                                        device="meta") if name != "type_as" else template)
    if name in ("__repr__", "__str__", "__format__"):
        return ShardedTensor.__repr__(target)
    if name in ("__reduce_ex__", "__reduce__", "__getstate__"):
        return target.__reduce_ex__(2)
    if name == "__deepcopy__":
        _settle((args, kwargs))
        return ShardedTensor.__deepcopy__(target, *args[1:], **kwargs)
    if name in _ALIASES and isinstance(target, ShardedTensor):
        return alias(target)
    _settle((args, kwargs))  # everything below reads or writes the values
    if name in _FILLS and isinstance(target, ShardedTensor):
        return _fill(func, target, args, kwargs)
    if name in _LIKE and isinstance(target, ShardedTensor):
        return _like(func, target, args, kwargs)
    if name in _CONVERSIONS and isinstance(target, ShardedTensor):
        return _convert(func, target, args, kwargs)
    if name in _REDUCTIONS:
        return _reduce(func, name, args, kwargs)
    if _elementwise(name):
        return _elementwise_op(func, name, args, kwargs)
    sharded = _sharded_in((args, kwargs))
    raise access_error(sharded[0], f"`{name}`")


def _settle(tree) -> None:
    """The optimizers owning these sharded tensors finish a deferred update first (see [Note:
    deferred update]): the values read or written here are the last step's."""
    for t in _sharded_in(tree):
        owner = t._zs.owner() if t._zs.owner is not None else None
        if owner is not None and getattr(owner, "deferred", None) is not None:
            owner.settle()


# ---- metadata ---------------------------------------------------------------------------------

def _property_access(func, accessor, args):
    prop, how = accessor
    t = args[0]
    if not isinstance(t, ShardedTensor):
        return func(*args)
    spec = t._zs.spec
    if how == "__set__":
        if prop == "data":
            _settle((args, {}))
            _assign(t, args[1])
            return None
        return func(*args)
    if prop == "shape":
        return spec.shape
    if prop == "ndim":
        return len(spec.shape)
    if prop == "data":
        return alias(t)
    if prop == "nbytes":
        return spec.numel * t._zs.local.element_size()
    if prop in _PASS_GET:
        return func(*args)
    raise access_error(t, f"`.{prop}`")


def _shape_query(name: str, t: ShardedTensor, rest: tuple, kwargs):
    if name == "is_contiguous":
        return True
    probe = torch.empty(t._zs.spec.shape, device="meta")
    return getattr(probe, name)(*rest, **kwargs)


def alias(t: ShardedTensor) -> ShardedTensor:
    """Shares t's values, requires no grad (p.data, p.detach())."""
    s = t._zs
    return make_sharded(False, s.spec, s.local, master=s.master, owner=s.owner)


def _assign(p: ShardedTensor, value) -> None:
    """p.data = value: the new values go into the shard (a sharded parameter cannot change its
    shape, dtype or device: the optimizer's buffers cannot follow)."""
    s = p._zs
    if isinstance(value, ShardedTensor) and value._zs.local is s.local:
        return  # model.to() of the same dtype and device: the same values
    vshape = value._zs.spec.shape if isinstance(value, ShardedTensor) else value.shape
    vlocal = value._zs.local if isinstance(value, ShardedTensor) else value
    if vshape != s.spec.shape or vlocal.dtype != s.local.dtype or \
            vlocal.device != s.local.device:
        raise ShardedAccessError(
            f"{s.spec.name} is a sharded parameter of shape {tuple(s.spec.shape)} "
            f"({s.local.dtype} on {s.local.device}) and was given data of shape {tuple(vshape)} "
            f"({vlocal.dtype} on {vlocal.device}) (model.to(), .half(), .cuda() or p.data = ... "
            "after the model was sharded). Its buffers cannot change shape, dtype or device: move "
            "or cast the model before building the optimizer (or before sharded_init ends).")
    _write(p, value)


# ---- elementwise -----------------------------------------------------------------------------

def _local_of(a, spec: ShardSpec, master: bool = False):
    """An argument as it enters the op on local pieces (the same spec's values, or this rank's
    elements of a whole tensor broadcast to the spec's shape)."""
    if isinstance(a, ShardedTensor):
        if not a._zs.spec.same_layout(spec):
            raise ShardedAccessError(
                f"{a._zs.spec.name} and {spec.name} are sharded differently (shapes "
                f"{tuple(a._zs.spec.shape)} and {tuple(spec.shape)}, or pieces from different "
                "optimizers or sharded_init): an elementwise operation needs both whole. Combine "
                "tensors of one model (or its copy.deepcopy), or gather with zeroshard.full_params.")
        if master:
            m = a._zs.master_values()
            if m is not None:
                return m
        return a._zs.local
    if isinstance(a, torch.Tensor) and a.dim() > 0:
        try:
            whole = a.expand(spec.shape) if a.shape != spec.shape else a
        except RuntimeError:
            raise ShardedAccessError(
                f"a tensor of shape {tuple(a.shape)} cannot combine elementwise with {spec.name} "
                f"(shape {tuple(spec.shape)}): it does not broadcast to it") from None
        return spec.take(whole)
    return a


def _elementwise_op(func, name: str, args, kwargs):
    if "out" in kwargs:
        raise access_error(_sharded_in((args, kwargs))[0], f"`{name}(..., out=)`")
    if name.startswith("_foreach_"):
        return _foreach(func, name, args, kwargs)
    target = args[0] if args else None
    sharded = _sharded_in((args, kwargs))
    spec = sharded[0]._zs.spec
    in_place = _in_place(name)
    if in_place and not isinstance(target, ShardedTensor):
        raise access_error(sharded[0], f"`{name}` into a whole tensor (it needs the whole value; "
                                       "build the tensor it writes into from the sharded model, "
                                       "e.g. copy.deepcopy(model) after the optimizer)")
    _check_autograd(name, target if in_place else None, sharded)
    if in_place:
        _apply_in_place(func, target, args, kwargs, spec)
        return target
    local_args = tree_map(lambda a: _local_of(a, spec), args)
    local_kwargs = tree_map(lambda a: _local_of(a, spec), kwargs)
    with torch.no_grad():
        result = func(*local_args, **local_kwargs)
    return _wrap(result, spec, _records_grad(sharded))


def _apply_in_place(func, target: ShardedTensor, args, kwargs, spec: ShardSpec) -> None:
    """Runs an in-place op on the target's pieces; where an optimizer keeps an fp32 master of
    them, on the master (the next step must see the change exactly) and the pieces follow."""
    master = target._zs.master_values()
    if master is None:
        local_args = (target._zs.local,) + tree_map(lambda a: _local_of(a, spec), args[1:])
        func(*local_args, **tree_map(lambda a: _local_of(a, spec), kwargs))
        return
    def move(a):  # fp32 on the master's device: torch's in-place ops take one float dtype
        if not isinstance(a, torch.Tensor):
            return a
        return a.to(master.device, master.dtype if a.is_floating_point() else a.dtype)
    local_args = (master,) + tree_map(lambda a: move(_local_of(a, spec, master=True)), args[1:])
    func(*local_args, **tree_map(lambda a: move(_local_of(a, spec, master=True)), kwargs))
    target._zs.local.copy_(master)


def _foreach(func, name: str, args, kwargs):
    """torch._foreach_X(lists...): position i of every list follows the spec of the sharded
    tensor there; the op runs once per position on one-element lists."""
    count = len(args[0])
    in_place = _in_place(name)
    results = []
    for i in range(count):
        one = tuple([a[i]] if isinstance(a, (list, tuple)) and len(a) == count else a
                     for a in args)
        sharded = _sharded_in(one)
        if not sharded:
            out = func(*one, **kwargs)
            results.append(None if out is None else out[0])
            continue
        spec = sharded[0]._zs.spec
        target = one[0][0]
        if in_place and not isinstance(target, ShardedTensor):
            raise access_error(sharded[0], f"`{name}` into a whole tensor")
        _check_autograd(name, target if in_place else None, sharded)
        if in_place:
            _apply_in_place(lambda t, *rest, **kw: func([t], *rest, **kw), target,
                            (target,) + one[1:], kwargs, spec)
            continue
        with torch.no_grad():
            out = func(*tree_map(lambda a: _local_of(a, spec), one),
                       **tree_map(lambda a: _local_of(a, spec), kwargs))
        results.append(_wrap(out[0], spec, _records_grad(sharded)))
    return None if in_place else results


def _check_autograd(name: str, target, sharded: List[ShardedTensor]) -> None:
    """As torch: no in-place change of a parameter that requires grad while grad is recorded."""
    if torch.is_grad_enabled() and target is not None and target.requires_grad:
        raise RuntimeError(
            f"a leaf Variable that requires grad ({target._zs.spec.name}) is being used in an "
            f"in-place operation ({name}): do it under torch.no_grad() or on p.data, as torch "
            "requires of any parameter")


def _records_grad(sharded: List[ShardedTensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in sharded)


def _wrap(result, spec: ShardSpec, requires_grad: bool = False):
    """Local results as sharded tensors. A result of a parameter that records grad requires
    grad too, but carries no graph: a loss built from it fails in backward (see _NoGradThrough)
    instead of silently missing the gradient."""
    if isinstance(result, torch.Tensor) and result.dim() == 1 and \
            result.numel() == spec.local_numel():
        return make_sharded(False, spec, result, requires_grad=requires_grad)
    if isinstance(result, (list, tuple)):
        return type(result)(_wrap(r, spec, requires_grad) for r in result)
    return result


class _NoGradThrough(torch.autograd.Function):
    """The value of a reduction over a sharded tensor that records grad: fine to log, an error
    to differentiate (a weight regulariser belongs in the forward, where the unit is whole)."""

    @staticmethod
    def forward(ctx, value, source):
        ctx.name = getattr(getattr(source, "_zs", None), "spec", None)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        name = ctx.name.name if ctx.name is not None else "a parameter"
        raise ShardedAccessError(
            f"backward through a reduction of {name}, which zeroshard stage 3 keeps sharded "
            "outside its unit's gather: autograd cannot reach the sharded parameter there. Compute "
            "terms of the loss over weights (a regulariser) inside the model's forward, where the "
            "unit is gathered, or under `with zeroshard.full_params(model):`.")


def _graph_guard(value: torch.Tensor, sharded: List[ShardedTensor]) -> torch.Tensor:
    if not _records_grad(sharded):
        return value
    source = next(t for t in sharded if t.requires_grad)
    return _NoGradThrough.apply(value, source)


def _write(t: ShardedTensor, value) -> None:
    """t's elements (and its master's) become those of `value` (whole or same-layout sharded)."""
    spec = t._zs.spec
    local = _local_of(value, spec, master=True)
    master = t._zs.master_values()
    if master is not None:
        master.copy_(local)
        t._zs.local.copy_(master)
    else:
        t._zs.local.copy_(local)


def _fill(func, target: ShardedTensor, args, kwargs):
    """An init that overwrites every element: run on a whole temporary (the random generator
    advances as for the whole tensor, so every rank's pieces are those of the unsharded run)."""
    _check_autograd(_name(func), target, [target])
    s = target._zs
    whole = torch.empty(s.spec.shape, dtype=s.local.dtype, device=s.local.device)
    swap = lambda a: whole if a is target else a  # noqa: E731
    func(*[swap(a) for a in args], **{k: swap(v) for k, v in kwargs.items()})
    _write(target, whole)
    return target


def _like(func, target: ShardedTensor, args, kwargs):
    s = target._zs
    whole_probe = torch.empty(s.spec.shape, dtype=s.local.dtype, device=s.local.device)
    whole = func(whole_probe, *args[1:], **kwargs)
    return make_sharded(False, s.spec, s.spec.take(whole).clone())


def _convert(func, target: ShardedTensor, args, kwargs):
    s = target._zs
    name = _name(func)
    if name == "type" and not args[1:] and not kwargs:
        return func(s.local)
    rest = tuple(_local_of(a, s.spec) if isinstance(a, ShardedTensor) else a for a in args[1:])
    if name == "type_as" and rest and isinstance(args[1], ShardedTensor):
        rest = (args[1]._zs.local,)
    out = func(s.local, *rest, **kwargs)
    if name == "clone":
        return make_sharded(False, s.spec, out)
    if out is s.local:
        return target if type(target) is ShardedTensor else alias(target)
    return make_sharded(False, s.spec, out)


# ---- reductions ------------------------------------------------------------------------------

_SUM, _MAX, _MIN = dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN


def _reduce(func, name: str, args, kwargs):
    sharded = _sharded_in((args, kwargs))
    if name == "_foreach_norm":
        ords = args[1] if len(args) > 1 else kwargs.get("ord", 2)
        return [_norm(t, ords) if isinstance(t, ShardedTensor) else torch.linalg.vector_norm(t, ords)
                for t in args[0]]
    target = args[0]
    if not isinstance(target, ShardedTensor):
        raise access_error(sharded[0], f"`{name}` with a whole tensor")
    dims = [a for a in args[1:] if not isinstance(a, (float, int, str)) or isinstance(a, bool)]
    dim = kwargs.get("dim", kwargs.get("axis"))
    positional_dim = name in ("sum", "nansum", "mean", "nanmean", "max", "min", "amax", "amin",
                              "all", "any", "count_nonzero", "std", "var") and len(args) > 1 \
        and not isinstance(args[1], bool) and name not in ("std", "var")
    if dim is not None or positional_dim or (dims and name not in ("equal", "allclose", "dist")):
        raise access_error(target, f"`{name}` along a dimension")
    with torch.no_grad():
        value = _reduce_value(func, name, target, args, kwargs)
    return _graph_guard(value, sharded) if isinstance(value, torch.Tensor) and \
        value.is_floating_point() else value


def _reduce_value(func, name: str, target: ShardedTensor, args, kwargs):
    x = target._zs.local
    if name in ("equal", "allclose"):
        other = args[1]
        if isinstance(other, ShardedTensor) and not other._zs.spec.same_layout(target._zs.spec):
            raise access_error(target, f"`{name}` with a differently sharded tensor")
        ok = func(x, _local_of(other, target._zs.spec), *args[2:], **kwargs)
        return bool(_all_reduce(target, [1.0 if ok else 0.0], _MIN)[0])
    if name == "dist":
        p = args[2] if len(args) > 2 else kwargs.get("p", 2)
        diff = x - _local_of(args[1], target._zs.spec)
        return _norm_of_local(target, diff, p)
    if name in ("norm", "vector_norm", "linalg_vector_norm", "linalg_norm"):
        p = args[1] if len(args) > 1 else kwargs.get("p", kwargs.get("ord"))
        if name == "linalg_norm" and p not in (None, "fro") and len(target._zs.spec.shape) > 1:
            raise access_error(target, "a matrix norm (linalg.norm with ord=)")
        return _norm(target, 2 if p in (None, "fro") else p, kwargs.get("dtype"))
    numel = target._zs.spec.numel
    if name in ("sum", "nansum", "mean", "nanmean"):
        v = x.double()
        count = float((~torch.isnan(v)).sum()) if name.startswith("nan") else float(v.numel())
        if name.startswith("nan"):
            v = torch.nan_to_num(v, nan=0.0)
        total, count = _all_reduce(target, [float(v.sum()), count], _SUM)  # local counts add up
        value = total / count if name.endswith("mean") else total
        return _scalar(value, kwargs.get("dtype") or x.dtype, x.device)
    if name in ("max", "amax", "min", "amin"):
        if numel == 0:
            raise RuntimeError(f"{name}(): expected a non-empty tensor ({target._zs.spec.name})")
        high = name in ("max", "amax")
        mine = (float(x.max()) if high else float(x.min())) if x.numel() else \
            (-math.inf if high else math.inf)
        (value,) = _all_reduce(target, [mine], _MAX if high else _MIN)
        return _scalar(value, x.dtype, x.device)
    if name in ("all", "any"):
        mine = float(bool(x.all()) if name == "all" else bool(x.any()))
        (value,) = _all_reduce(target, [mine], _MIN if name == "all" else _MAX)
        return torch.tensor(bool(value), device=x.device)
    if name == "count_nonzero":
        (value,) = _all_reduce(target, [float(torch.count_nonzero(x))], _SUM)
        return torch.tensor(int(value), device=x.device)
    if name in ("std", "var"):
        correction = kwargs.get("correction", 0 if kwargs.get("unbiased") is False
                                or (len(args) > 1 and args[1] is False) else 1)
        v = x.double()
        total, squares = _all_reduce(target, [float(v.sum()), float((v * v).sum())], _SUM)
        mean = total / numel
        var = max(squares / numel - mean * mean, 0.0) * numel / max(numel - correction, 0)
        return _scalar(math.sqrt(var) if name == "std" else var, x.dtype, x.device)
    raise access_error(target, f"`{name}`")


def _norm(t: ShardedTensor, p, dtype=None) -> torch.Tensor:
    return _norm_of_local(t, t._zs.local, p, dtype)


def _norm_of_local(t: ShardedTensor, x: torch.Tensor, p, dtype=None) -> torch.Tensor:
    p = float(p)
    v = x.double().abs()
    if p == math.inf:
        (value,) = _all_reduce(t, [float(v.max()) if v.numel() else 0.0], _MAX)
    elif p == -math.inf:
        (value,) = _all_reduce(t, [float(v.min()) if v.numel() else math.inf], _MIN)
    elif p == 0:
        (value,) = _all_reduce(t, [float(torch.count_nonzero(v))], _SUM)
    else:
        (total,) = _all_reduce(t, [float((v ** p).sum())], _SUM)
        value = total ** (1.0 / p)
    return _scalar(value, dtype or x.dtype, x.device)


def _scalar(value: float, dtype, device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64).to(dtype=dtype, device=device)


def _all_reduce(t: ShardedTensor, values: List[float], op) -> List[float]:
    """One collective over the spec's group, after the ranks agree they are all reducing."""
    spec = t._zs.spec
    if spec.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return values
    device = call_tags.collective_device(spec.group, t._zs.local.device)
    op_code = {_SUM: 0, _MAX: 1, _MIN: 2}[op]
    code = call_tags.encode(call_tags.REDUCTION, op_code, 0)
    call_tags.exchange(spec.group, code, device, spec.rank, spec.world_size,
                       lambda kind, index: f"{spec.name}")
    buf = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buf, op=op, group=spec.group)
    return buf.tolist()


set_torch_function_handler(handle)
