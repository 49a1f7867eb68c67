"""Sharded, atomic, reshardable checkpoints of a model and its zeroshard optimizer.

    zeroshard.checkpoint.save(path, model=model, optimizer=opt, extra={"epoch": 3}, rng=True)
    extra = zeroshard.checkpoint.load(path, model=model, optimizer=opt, rng=True)

Owns the save/load protocol: which rank writes what, the atomic commit, validation before any
change, and mapping a saved layout onto the loading one (resharding). The bytes on disk are
checkpoint_format.py's. With an optimizer, save and load are collective over its process group
(every rank calls them); without one, over the default group when torch.distributed is up.
Their object collectives go through the group's Rendezvous (rendezvous.py): a rank that skips
the call (save under `if rank == 0:`) makes every rank raise instead of hanging, and each wait
is bounded by the optimizer's timeout_s.

Every rank writes its own shard of every flat group: its slice of the flat parameter buffer
(the model's trainable params, in their dtype) and of each state tensor (exp_avg, master...).
Model params are saved as shards rather than whole by rank 0 because the shards are what each
rank owns at stages 1/2 (for fp32 params the param shard *is* the master), writes are spread
evenly over ranks, and no rank gathers the model. Tensors outside the flat groups (frozen
params, buffers) are replicated, so rank 0 writes them whole; those that are sharded (frozen
parameters at stage 3, a sharded_init model or its copy saved with no optimizer) are gathered
whole first, one at a time, on every rank. A tied tensor is saved once under its first
state_dict name; its other names are recorded as aliases, for export.

Atomicity: a save writes PATH/ckpt-<token>/ (data, fsync, metadata, fsync), then replaces
PATH/LATEST atomically (write, fsync, rename, fsync the directory) and only then deletes older
snapshots. A crash before the rename leaves LATEST naming the previous snapshot; after it, the
new one. Loading validates everything and reads into new tensors on every rank; the ranks agree
that all succeeded before any model or optimizer tensor changes.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import format as fmt
from .format import CheckpointError
from ..comm.rendezvous import rendezvous_for
from ..sharded_params.sharded_tensor import gather_whole, is_sharded, whole_shape
from ..sharding.state_dicts import PARAM_STEPS
from ..zero_optimizer import ZeroOptimizer

__all__ = ["save", "load", "CheckpointError"]


class _Ranks:
    """The ranks taking part in one save/load and the few object collectives it needs, all
    through the group's Rendezvous: a rank that skips the call makes the others fail fast (or
    after timeout_s) instead of hanging them.

    With hybrid sharding (shard_size=k) every rank of the world takes part, but the replicas
    hold the same shards: only the first shard group (global ranks 0..k-1) writes rank files,
    so a checkpoint has k of them, laid out as a plain run at world size k would write them,
    and loads at any world size and shard_size."""

    def __init__(self, optimizer: Optional[ZeroOptimizer], timeout_s: float) -> None:
        group = None
        self.writes_shards = True
        if optimizer is not None:
            every, replica = optimizer.groups.world_comm, optimizer.groups.replica_comm
            group = getattr(every, "group", None)
            self.rank, self.world_size = every.rank, every.world_size
            self.shard_rank, self.shard_world = optimizer.comm.rank, optimizer.comm.world_size
            self.writes_shards = replica is None or replica.rank == 0
        elif dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world_size = 0, 1
        # A world-size-1 communicator may sit on a bigger default group: nothing to agree on.
        self.rendezvous = rendezvous_for(group, timeout_s) if self.world_size > 1 else None

    def enter(self, op: str) -> None:
        if self.rendezvous is not None:
            self.rendezvous.enter(op)

    def all_gather(self, obj: Any) -> List[Any]:
        return self.rendezvous.all_gather_object(obj) if self.rendezvous is not None else [obj]

    def broadcast(self, obj: Any) -> Any:
        return self.rendezvous.broadcast_object(obj, 0) if self.rendezvous is not None else obj


DEFAULT_TIMEOUT_S = 300.0


def _timeout(optimizer, timeout_s) -> float:
    """timeout_s if given, else the optimizer's, else DEFAULT_TIMEOUT_S."""
    if timeout_s is None:
        return float(getattr(optimizer, "timeout_s", None) or DEFAULT_TIMEOUT_S)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    return float(timeout_s)


def unwrap_optimizer(optimizer):
    """The zeroshard optimizer under a framework's wrapper(s): accelerate's AcceleratedOptimizer
    and Lightning's LightningOptimizer keep the one they wrap in `.optimizer`."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, ZeroOptimizer) and \
            hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    if isinstance(optimizer, ZeroOptimizer):
        optimizer.settle()  # a deferred update's values are the ones saved or overwritten
    return optimizer


def _check_args(path, model, optimizer) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, ZeroOptimizer):
        raise TypeError(f"optimizer must be a zeroshard optimizer (ZeroAdamW, ZeroSGD...), got "
                        f"{type(optimizer).__name__}; save a torch.optim optimizer with torch.save")
    if optimizer is not None and hasattr(optimizer, "inner"):
        raise NotImplementedError("ZeroRedundancy keeps its state in an inner torch optimizer, "
                                  "which zeroshard.checkpoint does not save yet; use "
                                  "ZeroAdamW/ZeroAdam/ZeroSGD or opt.state_dict() per rank")
    return os.fspath(path)


def _model_tensors(model: torch.nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The model's state_dict tensors (params and persistent buffers), tied ones once, under
    their first name."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def _true_shapes(optimizer) -> Dict[int, torch.Size]:
    """id(param) -> its shape, for the optimizer's parameters (a sharded parameter answers its
    whole shape too; kept for parameters the optimizer holds gathered)."""
    if optimizer is None:
        return {}
    return {id(p): shape for fg in optimizer.flat_groups for p, shape in zip(fg.params, fg.shapes)}


def _whole_replicated(tensors, flat) -> Dict[int, torch.Tensor]:
    """id(tensor) -> whole value of each sharded tensor outside the flat groups (a collective
    per tensor, on every rank: rank 0 writes them)."""
    return {id(t): gather_whole([t])[0] for t in tensors.values()
            if id(t) not in flat and is_sharded(t)}


def _tied_aliases(model: torch.nn.Module) -> Dict[str, Tuple[str, int]]:
    """alias -> (first name, alias's position among the state_dict's tensors) for every key that
    names a tensor an earlier key already names (tied weights: GPT-2's lm_head.weight is
    transformer.wte.weight). Saved so that export can write every key of the state_dict."""
    first: Dict[int, str] = {}
    out: Dict[str, Tuple[str, int]] = {}
    tensors = [(n, t) for n, t in model.state_dict(keep_vars=True).items()
               if isinstance(t, torch.Tensor)]
    for position, (name, t) in enumerate(tensors):
        if id(t) in first:
            out[name] = (first[id(t)], position)
        else:
            first[id(t)] = name
    return out


def _flat_locations(model_tensors, optimizer) -> Dict[int, Tuple[int, int]]:
    """id(param) -> (flat group, index in it); every flat-group param must be the model's."""
    if optimizer is None:
        return {}
    ids = {id(t) for t in model_tensors.values()}
    where = {}
    for g, fg in enumerate(optimizer.flat_groups):
        for j, p in enumerate(fg.params):
            if id(p) not in ids:
                raise ValueError(f"the optimizer's parameter {fg.names[j]} is not a parameter "
                                 "of `model`; pass the model the optimizer was built on")
            where[id(p)] = (g, j)
    return where


def _json_value(key: str, v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, (tuple, list)):
        return [_json_value(key, x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"param group value {key}={v!r} cannot be stored in checkpoint metadata")


def _param_groups_meta(optimizer, names: Dict[int, str]) -> List[Dict[str, Any]]:
    groups = []
    for g in optimizer.param_groups:
        entry = {k: _json_value(k, v) for k, v in g.items() if k != "params"}
        entry["param_names"] = [names.get(id(p), "?") for p in g["params"]]
        groups.append(entry)
    return groups


# ---- save ---------------------------------------------------------------------------------

def _rank_slices(layout, rank: int):
    """(buffer_start, buffer_end) of rank's slice of every bucket, in shard order."""
    return [(r.start, r.end) for r in (layout.bucket_slice(b, rank)
                                       for b in range(layout.num_buckets))]


def _write_rank_file(directory: str, optimizer, rank: int, world_size: int) -> Dict[str, Any]:
    writer = fmt.RecordWriter(os.path.join(directory, fmt.rank_file_name(rank, world_size)))
    for g, fg in enumerate(optimizer.flat_groups):
        tensors, _ = optimizer.checkpoint_state(g)
        slices = _rank_slices(fg.layout, rank)
        writer.begin(f"g{g}.param", fg.dtype)
        for b, (b0, b1) in enumerate(slices):  # stage 3 reads them from its shard
            writer.write(fg.param_values(b0, b1, fg.layout.bucket_slice_shard_offset(b)))
        writer.end()
        for key, t in tensors.items():
            writer.begin(f"g{g}.{key}", t.dtype)
            if optimizer.stage == 0:  # replicated state in buffer space: write this rank's slices
                for b0, b1 in slices:
                    writer.write(t[b0:b1])
            else:  # already this rank's shard, in shard space
                writer.write(t)
            writer.end()
    return writer.close()


def _group_meta(optimizer, g: int, names: Dict[int, str]) -> Dict[str, Any]:
    fg = optimizer.flat_groups[g]
    tensors, scalars = optimizer.checkpoint_state(g)
    # Per-parameter step counts go with each parameter (a loading optimizer may group the
    # parameters differently); "step" stays the flat group's, for older readers.
    scalars = dict(scalars)
    steps = scalars.pop(PARAM_STEPS, None)
    layout = fg.layout
    pieces = [[pc.param, pc.param_range.start, pc.param_range.end, r, pc.shard_range.start]
              for r in range(layout.world_size) for pc in layout.shard_pieces(r)]
    keys = {"param": fmt.dtype_name(fg.dtype)}
    keys.update({k: fmt.dtype_name(t.dtype) for k, t in tensors.items()})
    return {"group_index": fg.group_index, "dtype": fmt.dtype_name(fg.dtype),
            "params": [dict({"name": names[id(p)], "shape": list(shape), "numel": shape.numel()},
                            **({} if steps is None else {"step": int(steps[j])}))
                       for j, (p, shape) in enumerate(zip(fg.params, fg.shapes))],
            "layout": {"align_elems": layout.align_elems, "bucket_elems": layout.bucket_elems,
                       "buffer_numel": layout.buffer_numel, "shard_numel": layout.shard_numel},
            "keys": keys, "scalars": {k: _json_value(k, v) for k, v in scalars.items()},
            "pieces": pieces}


def _commit(path: str, directory: str, meta: Dict[str, Any]) -> None:
    fmt.write_file_durably(os.path.join(directory, fmt.METADATA),
                           json.dumps(meta, indent=1).encode())
    fmt.fsync_dir(directory)
    tmp = os.path.join(path, fmt.LATEST + ".tmp")
    fmt.write_file_durably(tmp, os.path.basename(directory).encode())
    os.replace(tmp, os.path.join(path, fmt.LATEST))  # the commit: atomic on POSIX
    fmt.fsync_dir(path)
    for name in os.listdir(path):  # older snapshots and leftovers of crashed saves
        if name.startswith("ckpt-") and name != os.path.basename(directory):
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)


def save(path, *, model: torch.nn.Module, optimizer: Optional[ZeroOptimizer] = None,
         extra: Any = None, rng: bool = False, timeout_s: Optional[float] = None) -> None:
    """Saves model (and optimizer) state to the directory `path`, atomically. `optimizer` may be
    a framework's wrapper of a zeroshard optimizer (accelerate's, Lightning's).

    Every rank of the optimizer's group must call it (not only rank 0): a rank that does not
    makes the others raise CollectiveCallError. `extra` (small, picklable: scheduler state,
    epoch...) comes back from load(). `rng=True` also saves each rank's torch and Python RNG
    states (restored by load(rng=True) at the same world size). `timeout_s` bounds each wait for
    the other ranks (default: the optimizer's timeout_s, else 300)."""
    optimizer = unwrap_optimizer(optimizer)
    path = _check_args(path, model, optimizer)
    if optimizer is not None:
        optimizer._reattach()  # parameters moved by model.to() since construction
    ranks = _Ranks(optimizer, _timeout(optimizer, timeout_s))
    ranks.enter("zeroshard.checkpoint.save")
    tensors = _model_tensors(model)
    shapes = _true_shapes(optimizer)
    names = {id(t): n for n, t in tensors.items()}
    flat = _flat_locations(tensors, optimizer)
    groups_meta = _param_groups_meta(optimizer, names) if optimizer is not None else None

    token = None
    if ranks.rank == 0:
        if os.path.exists(path) and not os.path.isdir(path):
            token = f"error: {path} exists and is not a directory"
        else:
            token = f"ckpt-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
            os.makedirs(os.path.join(path, token))
    token = ranks.broadcast(token)
    if token.startswith("error: "):
        raise ValueError(token[len("error: "):] + "; pass a directory path")
    directory = os.path.join(path, token)

    info, error = {}, None
    try:
        if optimizer is not None and ranks.writes_shards:
            info["rank_file"] = _write_rank_file(directory, optimizer, ranks.shard_rank,
                                                 ranks.shard_world)
        if rng:
            state = {"torch": torch.get_rng_state(), "python": random.getstate()}
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                state["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(state, os.path.join(directory, fmt.rng_file_name(ranks.rank)))
        wholes = _whole_replicated(tensors, flat)
        if ranks.rank == 0:
            writer = fmt.RecordWriter(os.path.join(directory, fmt.REPLICATED))
            for name, t in tensors.items():
                if id(t) not in flat:
                    value = wholes.get(id(t), t)
                    writer.write_record(name, value, shape=list(value.shape))
            info["replicated"] = writer.close()
            if extra is not None:
                torch.save(extra, os.path.join(directory, fmt.EXTRA))
    except Exception as e:  # tell the other ranks instead of leaving them waiting
        error = f"rank {ranks.rank}: {type(e).__name__}: {e}"
    everyone = ranks.all_gather((info, error))
    errors = [e for _, e in everyone if e is not None]
    if errors:
        raise CheckpointError(f"saving {path} failed; the previous checkpoint there is intact. "
                              + "; ".join(errors))

    if ranks.rank == 0:
        try:
            meta = {
                "format": fmt.FORMAT_VERSION, "zeroshard_version": _zeroshard_version(),
                "torch_version": torch.__version__, "world_size": ranks.world_size,
                "stage": optimizer.stage if optimizer is not None else None,
                "created": time.time(), "chunk_bytes": fmt.CHUNK_BYTES, "rng": bool(rng),
                "extra": extra is not None,
                "model": [{"name": n, "shape": list(shapes.get(id(t), t.shape)),
                           "dtype": fmt.dtype_name(t.dtype),
                           "flat": list(flat[id(t)]) if id(t) in flat else None}
                          for n, t in tensors.items()],
                "replicated": info["replicated"],
                "aliases": [[a, n, pos] for a, (n, pos) in _tied_aliases(model).items()],
                "optimizer": None if optimizer is None else {
                    "class": type(optimizer).__name__, "param_groups": groups_meta,
                    "loss_scaler": optimizer.scaler_state(),
                    "flat_groups": [_group_meta(optimizer, g, names)
                                    for g in range(len(optimizer.flat_groups))],
                    "rank_files": _rank_file_indexes(everyone, ranks.shard_world)},
            }
            _commit(path, directory, meta)
        except Exception as e:
            error = f"rank 0 could not commit: {type(e).__name__}: {e}"
    error = ranks.broadcast(error)
    if error is not None:
        raise CheckpointError(f"saving {path} failed; the previous checkpoint there is intact. "
                              + error)


def _rank_file_indexes(everyone, shard_world: int) -> List[Dict[str, Any]]:
    """The written rank files' indexes in shard-rank order: every rank's (plain ZeRO), or the
    first shard group's (hybrid sharding; its ranks are global ranks 0..k-1, in order)."""
    written = [i["rank_file"] for i, _ in everyone if "rank_file" in i]
    assert len(written) == shard_world, (len(written), shard_world)
    return [dict(index, file=fmt.rank_file_name(r, shard_world))
            for r, index in enumerate(written)]


def _zeroshard_version() -> str:
    from .. import _core
    return _core.build_info()["version"]


# ---- load ---------------------------------------------------------------------------------

def _saved_names(meta: Dict[str, Any], model, tensors, shapes) -> Dict[str, str]:
    """The saved record of each of the model's tensors: name -> saved name. A tied weight may be
    saved under another of its names, and a model that unties it reads both from the one saved
    tensor; checkpoints before tied weights were recorded have no "aliases" (none then)."""
    saved = {m["name"]: m for m in meta["model"]}
    saved_alias = {a: n for a, n, _ in meta.get("aliases", [])}

    def source(name: str) -> Optional[str]:
        return name if name in saved else saved_alias.get(name)

    problems, out = [], {}
    for name, t in tensors.items():
        src = source(name)
        m = saved.get(src)
        if m is None:
            problems.append(f"{name} is in the model but not in the checkpoint")
        elif list(shapes.get(id(t), t.shape)) != m["shape"]:
            problems.append(f"{name} has shape {list(shapes.get(id(t), t.shape))} in the model, "
                            f"{m['shape']} in the checkpoint")
        elif fmt.dtype_name(t.dtype) != m["dtype"]:
            problems.append(f"{name} is {fmt.dtype_name(t.dtype)} in the model, {m['dtype']} in "
                            "the checkpoint")
        else:
            out[name] = src
    for alias, (name, _) in _tied_aliases(model).items():
        if source(alias) is not None and source(name) is not None and \
                source(alias) != source(name):  # reading one would drop the other silently
            problems.append(f"{alias} and {name} are one tied tensor in the model but two "
                            "tensors in the checkpoint")
    keys = set(model.state_dict(keep_vars=True))
    problems += [f"{n} is in the checkpoint but not in the model" for n in saved if n not in keys]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"the model does not match checkpoint {meta['_dir']}: "
                              + "; ".join(problems[:5]) + more)
    return out


def _open_rank_files(meta: Dict[str, Any]) -> Dict[int, fmt.RecordReader]:
    readers = {}
    for r, index in enumerate(meta["optimizer"]["rank_files"]):
        readers[r] = fmt.RecordReader(os.path.join(meta["_dir"], index["file"]), index)
    return readers


def _own_pieces(fg, stage: int, rank: int) -> List[Tuple[int, int, int, int]]:
    """(param, param_start, param_end, state_start) of what this rank's state space holds."""
    if stage == 0:
        return [(j, 0, r.end - r.start, r.start) for j, r in enumerate(fg.layout.param_ranges)]
    return [(pc.param, pc.param_range.start, pc.param_range.end, pc.shard_range.start)
            for pc in fg.layout.shard_pieces(rank)]


def _stage_optimizer(meta, optimizer, names: Dict[int, str], readers) -> List[tuple]:
    om = meta["optimizer"]
    if om is None:
        raise CheckpointError(f"checkpoint {meta['_dir']} holds no optimizer state (saved "
                              "without optimizer=); load with optimizer=None")
    if om["class"] != type(optimizer).__name__:
        raise CheckpointError(f"checkpoint holds {om['class']} state, the optimizer is "
                              f"{type(optimizer).__name__}")
    if len(om["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"checkpoint has {len(om['param_groups'])} param groups, the "
                              f"optimizer {len(optimizer.param_groups)}")
    for gi, (saved, mine) in enumerate(zip(om["param_groups"], optimizer.param_groups)):
        mine_names = [names.get(id(p), "?") for p in mine["params"]]
        if saved["param_names"] != mine_names:
            diff = next((f"{a} vs {b}" for a, b in zip(saved["param_names"], mine_names) if a != b),
                        f"{len(saved['param_names'])} vs {len(mine_names)} params")
            raise CheckpointError(f"param group {gi} differs from the checkpoint's (saved vs "
                                  f"now): {diff}")
    where = {}
    for g, gm in enumerate(om["flat_groups"]):
        for j, pm in enumerate(gm["params"]):
            where[pm["name"]] = (g, j)
    pieces = [fmt.saved_piece_index(gm) for gm in om["flat_groups"]]
    staged = []
    for i, fg in enumerate(optimizer.flat_groups):
        current, _ = optimizer.checkpoint_state(i)
        fresh = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in current.items()}
        scalars = None
        for j, p0, p1, start in _own_pieces(fg, optimizer.stage, optimizer.rank):
            name = names[id(fg.params[j])]
            if name not in where:
                raise CheckpointError(f"parameter {name} was not trained (frozen or outside the "
                                      "optimizer) when the checkpoint was saved")
            g, sj = where[name]
            gm = om["flat_groups"][g]
            wanted = set(fresh) | {"param"}
            if set(gm["keys"]) != wanted:
                raise CheckpointError(f"parameter {name}: the checkpoint has state "
                                      f"{sorted(gm['keys'])}, the optimizer needs {sorted(wanted)}")
            if scalars is None:
                scalars = gm["scalars"]
            elif _without_step(scalars) != _without_step(gm["scalars"]):
                raise CheckpointError(f"parameter {name}: its saved state {gm['scalars']} differs "
                                      f"from its flat group's {scalars}")
            for k, t in fresh.items():
                fmt.read_param_range(readers, f"g{g}.{k}", pieces[g][sj], p0,
                                     t[start:start + (p1 - p0)])
        if scalars is None:  # no piece on this rank: any saved group of these params will do
            scalars = om["flat_groups"][where[names[id(fg.params[0])]][0]]["scalars"]
        scalars = dict(scalars)
        scalars.pop(PARAM_STEPS, None)
        if PARAM_STEPS in optimizer.shard_state[i]:
            steps = [_saved_step(om, where[names[id(p)]]) if names[id(p)] in where else 0
                     for p in fg.params]
            scalars[PARAM_STEPS] = steps
            scalars["step"] = max(steps, default=0)
        staged.append((fresh, scalars))
    return staged


def _without_step(scalars: Dict[str, Any]) -> Dict[str, Any]:
    """A flat group's scalars but its step count: groups of one saved run may have taken
    different numbers of steps (parameters without gradients are skipped)."""
    return {k: v for k, v in scalars.items() if k not in ("step", PARAM_STEPS)}


def _saved_step(om: Dict[str, Any], where: Tuple[int, int]) -> int:
    """A parameter's own saved step count; the flat group's for checkpoints saved before
    per-parameter counts (every parameter had taken every step then)."""
    gm = om["flat_groups"][where[0]]
    pm = gm["params"][where[1]]
    return int(pm["step"] if "step" in pm else gm["scalars"].get("step", 0))


def _stage_model(meta, tensors, saved_names, readers, shapes) -> Dict[str, torch.Tensor]:
    by_name = {m["name"]: m for m in meta["model"]}
    om = meta["optimizer"]
    pieces = [fmt.saved_piece_index(gm) for gm in om["flat_groups"]] if om else []
    replicated = fmt.RecordReader(os.path.join(meta["_dir"], fmt.REPLICATED), meta["replicated"])
    try:
        values = {}
        for name, t in tensors.items():
            out = torch.empty(shapes.get(id(t), whole_shape(t)), dtype=t.dtype)
            flat = by_name[saved_names[name]]["flat"]
            if flat is None:
                replicated.read_into(saved_names[name], 0, out.view(-1))
            else:
                g, j = flat
                fmt.read_param_range(readers, f"g{g}.param", pieces[g][j], 0, out.view(-1))
            values[name] = out
        return values
    finally:
        replicated.close()


def load(path, *, model: torch.nn.Module, optimizer: Optional[ZeroOptimizer] = None,
         rng: bool = False, timeout_s: Optional[float] = None) -> Any:
    """Loads a checkpoint saved by save(), at any world size and stage; returns `extra`.

    Validates the metadata, the model's parameter names/shapes/dtypes and every chunk read
    against its checksum, reading into new tensors; only when every rank succeeded does it copy
    into the model and optimizer. On error nothing has changed and every rank raises. Every
    rank must call it; `timeout_s` as for save()."""
    optimizer = unwrap_optimizer(optimizer)
    path = _check_args(path, model, optimizer)
    if optimizer is not None:
        optimizer._reattach()  # parameters moved by model.to() since construction
    ranks = _Ranks(optimizer, _timeout(optimizer, timeout_s))
    ranks.enter("zeroshard.checkpoint.load")
    tensors = _model_tensors(model)
    error: Optional[BaseException] = None
    staged = None
    try:
        meta = fmt.read_metadata(path)
        shapes = _true_shapes(optimizer)
        saved_names = _saved_names(meta, model, tensors, shapes)
        names = {id(t): saved_names[n] for n, t in tensors.items()}  # as the checkpoint has them
        readers = _open_rank_files(meta) if meta["optimizer"] is not None else {}
        try:
            values = _stage_model(meta, tensors, saved_names, readers, shapes)
            opt_state = (_stage_optimizer(meta, optimizer, names, readers)
                         if optimizer is not None else None)
        finally:
            for r in readers.values():
                r.close()
        rng_state = _read_rng(meta, ranks) if rng else None
        extra_path = os.path.join(meta["_dir"], fmt.EXTRA)
        extra = torch.load(extra_path, weights_only=True) if meta.get("extra") else None
        staged = (meta, values, opt_state, rng_state, extra)
    except Exception as e:  # every rank must learn of it, or the others would go on alone
        error = e
    messages = ranks.all_gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        raise CheckpointError(f"loading {path} failed on rank {failed[0][0]}: {failed[0][1]}; "
                              "nothing was loaded")
    meta, values, opt_state, rng_state, extra = staged
    # Stage 3 parameters hold no whole data between steps: their shards take the values.
    sharded = (_flat_locations(tensors, optimizer)
               if optimizer is not None and optimizer.units is not None else {})
    with torch.no_grad():
        for name, t in tensors.items():
            if id(t) in sharded:
                g, j = sharded[id(t)]
                optimizer.flat_groups[g].load_param(j, values[name])
            else:
                t.copy_(values[name])
        if optimizer is not None:
            for i, (fresh, scalars) in enumerate(opt_state):
                optimizer.load_checkpoint_state(i, fresh, scalars)
            for mine, saved in zip(optimizer.param_groups, meta["optimizer"]["param_groups"]):
                for k, v in saved.items():
                    if k != "param_names":
                        mine[k] = tuple(v) if isinstance(mine.get(k), tuple) else v
            optimizer.load_scaler_state(meta["optimizer"]["loss_scaler"])
            optimizer.finish_checkpoint_load()
    if rng_state is not None:
        torch.set_rng_state(rng_state["torch"])
        random.setstate(rng_state["python"])
        if "cuda" in rng_state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng_state["cuda"])
    return extra


def _read_rng(meta: Dict[str, Any], ranks: _Ranks) -> Dict[str, Any]:
    if not meta.get("rng"):
        raise CheckpointError(f"checkpoint {meta['_dir']} has no RNG states (saved with "
                              "rng=False); load with rng=False")
    if meta["world_size"] != ranks.world_size:
        raise CheckpointError(f"RNG states are per rank and were saved at world size "
                              f"{meta['world_size']}, not {ranks.world_size}; load with rng=False")
    rng_path = os.path.join(meta["_dir"], fmt.rng_file_name(ranks.rank))
    try:
        state = torch.load(rng_path, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"RNG state file {rng_path} is missing") from None
    state["python"] = _as_tuples(state["python"])
    return state


def _as_tuples(v):
    return tuple(_as_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v
