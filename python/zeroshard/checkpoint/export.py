"""Consolidated export of a zeroshard checkpoint: full fp32 weights in one ordinary file.

    python -m zeroshard.export CHECKPOINT OUT.pt|OUT.safetensors [--optimizer-out OPT.pt]

Owns streaming a sharded checkpoint into a torch state_dict (`.pt`, loadable with
`torch.load(..., weights_only=True)`) or a safetensors file, and optionally the optimizer state
in torch.optim's own state_dict format (full-shape tensors per parameter, so
`torch.optim.AdamW(model.parameters()).load_state_dict(...)` takes it). One process, no
torch.distributed. Tensors are assembled and written one at a time, so memory is bounded by
the largest tensor, not the model: the `.pt` zip archive and its pickle are written here (the
pickle refers to storages by key, exactly as torch.save's does) because torch.save needs every
tensor in memory at once. Floating-point weights come out fp32 (the fp32 master where a
low-precision parameter has one); integer buffers keep their dtype.

Every key of the model's state_dict is written, tied weights included (GPT-2's lm_head.weight
tied to transformer.wte.weight), so that `model.load_state_dict(..., strict=True)` takes the
file: in `.pt` the tied keys share one storage, as torch.save of model.state_dict() has them; in
`.safetensors`, which refuses shared tensors, each tied key is its own copy.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional

import torch

from . import format as fmt
from .format import CheckpointError

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
                       torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_STORAGE_CLASSES = {torch.float32: "FloatStorage", torch.float16: "HalfStorage",
                    torch.bfloat16: "BFloat16Storage", torch.float64: "DoubleStorage",
                    torch.int64: "LongStorage", torch.int32: "IntStorage",
                    torch.int16: "ShortStorage", torch.int8: "CharStorage",
                    torch.uint8: "ByteStorage", torch.bool: "BoolStorage"}


# torch.optim's param-group flags per zeroshard class, filled in when a checkpoint lacks them.
_ADAM_FLAGS = (("amsgrad", False), ("maximize", False), ("foreach", None), ("capturable", False),
               ("differentiable", False), ("fused", None))
_TORCH_GROUP_DEFAULTS = {
    "ZeroAdamW": _ADAM_FLAGS + (("decoupled_weight_decay", True),),
    "ZeroAdam": _ADAM_FLAGS + (("decoupled_weight_decay", False),),
    "ZeroSGD": (("nesterov", False), ("maximize", False), ("foreach", None),
                ("differentiable", False), ("fused", None)),
}


class _LazyTensor:
    """A tensor not yet read: its dtype, shape and how to produce it."""

    def __init__(self, dtype: torch.dtype, shape, produce: Callable[[], torch.Tensor]) -> None:
        self.dtype, self.shape, self.produce = dtype, tuple(shape), produce
        self.key: Optional[str] = None
        self.storage = _StorageRef(self)  # shared by its aliases: one storage, written once

    def alias(self) -> "_LazyTensor":
        """Another tensor on this one's storage, as a tied weight is in a torch state_dict."""
        twin = _LazyTensor(self.dtype, self.shape, self.produce)
        twin.storage = self.storage
        return twin

    def copy(self) -> "_LazyTensor":
        return _LazyTensor(self.dtype, self.shape, self.produce)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def __reduce__(self):
        # What torch.save pickles for a contiguous CPU tensor: storage, offset, size, stride.
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.insert(0, acc)
            acc *= max(s, 1)
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, tuple(stride), False, OrderedDict()))


class _StorageRef:
    def __init__(self, lazy: _LazyTensor) -> None:
        self.lazy = lazy


class _Pickler(pickle.Pickler):
    def __init__(self, file, lazies: List[_LazyTensor]) -> None:
        super().__init__(file, protocol=2)
        self.lazies = lazies

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            lazy = obj.lazy
            if lazy.key is None:  # the first tensor on this storage: write the storage once
                lazy.key = str(len(self.lazies))
                self.lazies.append(lazy)
            storage_class = getattr(torch, _STORAGE_CLASSES[lazy.dtype])
            return ("storage", storage_class, lazy.key, "cpu", lazy.numel)
        return None


def _produce_checked(lazy: _LazyTensor) -> torch.Tensor:
    t = lazy.produce()
    if t.dtype != lazy.dtype or tuple(t.shape) != lazy.shape:
        raise AssertionError(f"produced {t.dtype} {tuple(t.shape)}, promised {lazy.dtype} {lazy.shape}")
    return t


def write_torch_file(path: str, obj: Any) -> None:
    """torch.save(obj, path) for an object whose tensors are _LazyTensor, one at a time."""
    buf = io.BytesIO()
    lazies: List[_LazyTensor] = []
    _Pickler(buf, lazies).dump(obj)
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/byteorder", "little")
        for lazy in lazies:
            with zf.open(f"archive/data/{lazy.key}", "w", force_zip64=True) as w:
                w.write(fmt.tensor_bytes(_produce_checked(lazy)))
        zf.writestr("archive/version", "3\n")
    os.replace(tmp, path)


def write_safetensors(path: str, tensors: "OrderedDict[str, _LazyTensor]") -> None:
    """The safetensors layout: u64 little-endian header size, JSON header, raw data."""
    header: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, lazy in tensors.items():
        nbytes = lazy.numel * torch.tensor([], dtype=lazy.dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[lazy.dtype], "shape": list(lazy.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for lazy in tensors.values():
            f.write(fmt.tensor_bytes(_produce_checked(lazy)))
    os.replace(tmp, path)


class _Checkpoint:
    """Readers over one committed snapshot, producing full tensors on demand."""

    def __init__(self, path: str) -> None:
        self.meta = fmt.read_metadata(path)
        om = self.meta["optimizer"]
        self.readers = {}
        if om is not None:
            for r, index in enumerate(om["rank_files"]):
                self.readers[r] = fmt.RecordReader(os.path.join(self.meta["_dir"], index["file"]),
                                                   index)
        self.pieces = [fmt.saved_piece_index(gm) for gm in om["flat_groups"]] if om else []
        self.replicated = fmt.RecordReader(os.path.join(self.meta["_dir"], fmt.REPLICATED),
                                           self.meta["replicated"])

    def close(self) -> None:
        for r in list(self.readers.values()) + [self.replicated]:
            r.close()

    def flat_tensor(self, g: int, j: int, key: str, shape) -> torch.Tensor:
        dtype = fmt.DTYPES[self.meta["optimizer"]["flat_groups"][g]["keys"][key]]
        out = torch.empty(shape, dtype=dtype)
        fmt.read_param_range(self.readers, f"g{g}.{key}", self.pieces[g][j], 0, out.view(-1))
        return out

    def model_tensors(self, share_tied: bool = True) -> "OrderedDict[str, _LazyTensor]":
        """Every state_dict key of the saved model; a tied key shares its tensor's storage if
        `share_tied`, else it is a copy."""
        out: "OrderedDict[str, _LazyTensor]" = OrderedDict()
        for m in self.meta["model"]:
            dtype, shape = fmt.DTYPES[m["dtype"]], tuple(m["shape"])
            target = torch.float32 if dtype.is_floating_point else dtype
            if m["flat"] is not None:
                g, j = m["flat"]
                key = "master" if "master" in self.meta["optimizer"]["flat_groups"][g]["keys"] else "param"
                produce = (lambda g=g, j=j, key=key, shape=shape, target=target:
                           self.flat_tensor(g, j, key, shape).to(target))
            else:
                def produce(name=m["name"], dtype=dtype, shape=shape, target=target):
                    t = torch.empty(shape, dtype=dtype)
                    self.replicated.read_into(name, 0, t.view(-1))
                    return t.to(target)
            out[m["name"]] = _LazyTensor(target, shape, produce)
        # [alias, name, position in the state_dict]; absent from checkpoints before tied weights.
        aliases = sorted(self.meta.get("aliases", []), key=lambda a: a[2])
        if not aliases:
            return out
        keys = list(out.items())
        for alias, name, position in aliases:
            keys.insert(position, (alias, out[name].alias() if share_tied else out[name].copy()))
        return OrderedDict(keys)

    def optimizer_state_dict(self) -> Dict[str, Any]:
        """torch.optim's state_dict format: state by param index, param groups with indices."""
        om = self.meta["optimizer"]
        if om is None:
            raise CheckpointError(f"checkpoint {self.meta['_dir']} holds no optimizer state")
        shapes = {m["name"]: tuple(m["shape"]) for m in self.meta["model"]}
        where = {pm["name"]: (g, j) for g, gm in enumerate(om["flat_groups"])
                 for j, pm in enumerate(gm["params"])}
        with_step = om["class"] != "ZeroSGD"  # torch.optim.SGD keeps no step
        state, groups, index = {}, [], 0
        for saved in om["param_groups"]:
            group = {k: (tuple(v) if k == "betas" else v) for k, v in saved.items()
                     if k != "param_names"}
            # Checkpoints from before these flags were stored: torch's defaults.
            for k, v in _TORCH_GROUP_DEFAULTS.get(om["class"], ()):
                group.setdefault(k, v)
            # zeroshard keeps max_exp_avg_sq for every group once one uses AMSGrad; torch has it
            # only for params of groups with amsgrad on, and so does the export.
            skip = {"param", "master"} | (set() if group.get("amsgrad") else {"max_exp_avg_sq"})
            group["params"] = []
            for name in saved["param_names"]:
                group["params"].append(index)
                if name in where:
                    g, j = where[name]
                    gm = om["flat_groups"][g]
                    # Each parameter's own step (checkpoints since per-parameter steps); torch
                    # keeps no state for a parameter that was never stepped.
                    own = gm["params"][j].get("step", gm["scalars"].get("step"))
                    if own == 0 and "step" in gm["params"][j]:
                        index += 1
                        continue
                    entry: Dict[str, Any] = {}
                    if with_step and own is not None:
                        step = float(own)
                        entry["step"] = _LazyTensor(torch.float32, (),
                                                    lambda s=step: torch.tensor(s))
                    for key in gm["keys"]:
                        if key not in skip:
                            entry[key] = _LazyTensor(
                                fmt.DTYPES[gm["keys"][key]], shapes[name],
                                lambda g=g, j=j, key=key, shape=shapes[name]:
                                self.flat_tensor(g, j, key, shape))
                    state[index] = entry
                index += 1
            groups.append(group)
        return {"state": state, "param_groups": groups}


def export(checkpoint: str, out: str, optimizer_out: Optional[str] = None) -> None:
    """Writes the checkpoint's full fp32 model weights to `out` (.pt or .safetensors) and,
    if given, the optimizer state as a torch.optim state_dict to `optimizer_out` (.pt)."""
    if not isinstance(out, str) or not out.endswith((".pt", ".pth", ".safetensors")):
        raise ValueError(f"out must end in .pt, .pth or .safetensors, got {out!r}")
    if optimizer_out is not None and not optimizer_out.endswith((".pt", ".pth")):
        raise ValueError(f"optimizer_out must end in .pt or .pth, got {optimizer_out!r}")
    ckpt = _Checkpoint(checkpoint)
    try:
        tensors = ckpt.model_tensors(share_tied=not out.endswith(".safetensors"))
        if out.endswith(".safetensors"):
            write_safetensors(out, tensors)
        else:
            write_torch_file(out, tensors)
        if optimizer_out is not None:
            write_torch_file(optimizer_out, ckpt.optimizer_state_dict())
    finally:
        ckpt.close()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zeroshard.export",
                                     description="Export a zeroshard checkpoint's full fp32 "
                                                 "weights (and optimizer state) to one file.")
    parser.add_argument("checkpoint", help="checkpoint directory written by zeroshard.checkpoint.save")
    parser.add_argument("out", help="output file: .pt (torch state_dict) or .safetensors")
    parser.add_argument("--optimizer-out", help="also write the optimizer state in torch.optim's "
                                                "state_dict format to this .pt file")
    args = parser.parse_args(argv)
    try:
        export(args.checkpoint, args.out, args.optimizer_out)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
