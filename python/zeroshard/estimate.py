"""The memory estimator: the bytes a ZeRO optimizer will hold per rank, before anything exists.

Owns: the per-rank byte counts of model states and communication buffers, computed from the same
core Layout that FlatGroup builds and the same ring plan BufferRing follows; ZeRO's closed-form
formulas; the command line (`python -m zeroshard.estimate --help`). Must not know model
architectures (model_shapes.py) nor allocate a model-sized tensor.

[Note: what the estimate covers] One FlatGroup (one param group, one parameter dtype), one
backward per step (no `no_sync()` accumulation, which adds a full-size gradient buffer at stages
0 and 2), and the optimizer's model states and gradient communication buffers. Activations,
temporaries of the forward/backward, the allocator's caching and CUDA/NCCL context memory are
not counted. offload="cpu" is the design of issue 11 (not built yet): master weights and
optimizer state move to host memory; the numbers for it are that design's prediction.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Dict, List, Optional, Sequence, Union

import torch

from . import _core
from .buffer_ring import auto_bucket_mb, planned_ring_bytes
from .flat_group import ALIGN_BYTES
from .model_shapes import PRESETS, preset_numels, read_config_numels, uniform_numels

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp32 state tensors the optimizer keeps per shard element (optimizers.py's _init_state).
STATE_TENSORS = {"adamw": 2, "adam": 2, "adamw-amsgrad": 3, "adam-amsgrad": 3,
                 "sgd": 1,                 # momentum buffer (momentum > 0)
                 "sgd-no-momentum": 0}
STAGES = (0, 1, 2)
MODEL_STATE_KEYS = ("model_params", "grads", "master_params", "optimizer_state")
REPORT_KEYS = MODEL_STATE_KEYS + ("comm_buffers",)

DtypeLike = Union[str, torch.dtype]


def _dtype(value: DtypeLike, what: str) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in DTYPE_NAMES.values():
        return value
    if isinstance(value, str) and value.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[value.lower()]
    raise ValueError(f"{what} must be one of {', '.join(DTYPE_NAMES)} (or the torch dtype), "
                     f"got {value!r}")


def _elem_size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _check_common(world_size, stage, optimizer) -> None:
    if stage == 3:
        raise ValueError("stage 3 is not built yet (parameter partitioning); estimate stage "
                         "0, 1 or 2")
    if stage not in STAGES:
        raise ValueError(f"stage must be 0, 1 or 2, got {stage!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if optimizer not in STATE_TENSORS:
        raise ValueError(f"optimizer must be one of {', '.join(STATE_TENSORS)}, got {optimizer!r}")


def bucket_elems(bucket_mb: Optional[float], reduce_dtype: DtypeLike, total_numel: int) -> int:
    """Elements per bucket, as ZeroOptimizer computes it from bucket_mb (None: automatic)."""
    if bucket_mb is not None and not (isinstance(bucket_mb, (int, float)) and bucket_mb > 0):
        raise ValueError(f"bucket_mb must be a positive number or None (automatic), "
                         f"got {bucket_mb!r}")
    elem = _elem_size(_dtype(reduce_dtype, "reduce_dtype"))
    mb = float(bucket_mb) if bucket_mb is not None else auto_bucket_mb(total_numel, elem)
    return max(1, int(mb * 2 ** 20) // elem)


def build_layout(param_numels: Sequence[int], *, world_size: int, dtype: DtypeLike = "fp32",
                 reduce_dtype: DtypeLike = "fp32",
                 bucket_mb: Optional[float] = None) -> "_core.Layout":
    """The core Layout FlatGroup builds for these parameters: 128-byte aligned starts,
    buckets of bucket_mb in the reduce dtype, padded to world_size shards."""
    numels = list(param_numels)
    if not numels:
        raise ValueError("param_numels is empty: a model needs at least one parameter")
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in numels):
        bad = next(n for n in numels if not isinstance(n, int) or isinstance(n, bool) or n < 0)
        raise ValueError(f"param_numels must be non-negative integers, got {bad!r}")
    align_elems = max(1, ALIGN_BYTES // _elem_size(_dtype(dtype, "dtype")))
    return _core.Layout(numels, world_size, align_elems,
                        bucket_elems(bucket_mb, reduce_dtype, sum(numels)))


def estimate_model_states(param_numels: Sequence[int], *, world_size: int, stage: int,
                          dtype: DtypeLike = "fp32", reduce_dtype: DtypeLike = "fp32",
                          bucket_mb: Optional[float] = None, offload: Optional[str] = None,
                          max_in_flight: int = 2, backend: str = "gloo",
                          optimizer: str = "adamw") -> Dict[str, int]:
    """Bytes per rank, keyed like ZeroOptimizer.memory_report(): model_params, grads,
    master_params, optimizer_state, comm_buffers, total (their sum), plus host_bytes.

    offload="cpu" (issue 11's design, not built yet) moves master_params and optimizer_state to
    host memory: those keys keep their values, host_bytes is their sum and `total` counts device
    bytes only. Without offload host_bytes is 0. bucket_mb=None is ZeroOptimizer's automatic
    size (25 MiB, at most an eighth of the gradients). See [Note: what the estimate covers]."""
    _check_common(world_size, stage, optimizer)
    if offload not in (None, "none", "cpu"):
        raise ValueError(f"offload must be None, 'none' or 'cpu', got {offload!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight must be a positive integer, got {max_in_flight!r}")
    param_dtype = _dtype(dtype, "dtype")
    grad_elem = _elem_size(_dtype(reduce_dtype, "reduce_dtype"))
    layout = build_layout(param_numels, world_size=world_size, dtype=param_dtype,
                          reduce_dtype=reduce_dtype, bucket_mb=bucket_mb)
    buffer, shard = layout.buffer_numel, layout.shard_numel
    # FlatGroup: stage 0 reduces into a full-size buffer; stage 1 accumulates a full-size local
    # buffer and reduces into its shard, which lives at that buffer's start; stage 2 keeps
    # only the shard.
    grad_numel = {0: buffer, 1: buffer, 2: shard}[stage]
    state_numel = buffer if stage == 0 else shard  # stage 0's "shard" is the whole buffer
    report = {
        "model_params": buffer * _elem_size(param_dtype),
        "grads": grad_numel * grad_elem,
        # fp32 master shard only for low-precision params; fp32 params are their own master
        "master_params": 0 if param_dtype == torch.float32 else state_numel * 4,
        "optimizer_state": state_numel * 4 * STATE_TENSORS[optimizer],
        "comm_buffers": planned_ring_bytes(
            [b.end - b.start for b in layout.bucket_ranges], stage=stage, world_size=world_size,
            elem_size=grad_elem, max_in_flight=max_in_flight, gloo=(backend == "gloo"),
            param_elem_size=_elem_size(param_dtype)),
    }
    report["total"] = sum(report[k] for k in REPORT_KEYS)
    report["host_bytes"] = 0
    if offload == "cpu":
        report["host_bytes"] = report["master_params"] + report["optimizer_state"]
        report["total"] -= report["host_bytes"]
    return report


def _formula_terms(stage: int, dtype: DtypeLike, optimizer: str):
    """(replicated, partitioned) bytes per parameter: per rank = replicated*Ψ + partitioned*Ψ/N.
    As in the ZeRO paper, gradients are in the parameters' precision; the optimizer's K bytes
    are its fp32 state plus an fp32 master copy for low-precision parameters."""
    param = _elem_size(_dtype(dtype, "dtype"))
    grad = param
    k = 4 * STATE_TENSORS[optimizer] + (4 if param < 4 else 0)
    return {0: (param + grad + k, 0), 1: (param + grad, k), 2: (param, grad + k)}[stage]


def zero_formula_bytes(num_params: int, *, world_size: int, stage: int, dtype: DtypeLike = "fp32",
                       optimizer: str = "adamw") -> int:
    """ZeRO's closed form per rank for params + grads + master + optimizer state, without
    padding: mixed-precision Adam 16Ψ, 4Ψ+12Ψ/N, 2Ψ+14Ψ/N (stages 0/1/2); fp32 Adam 16Ψ,
    8Ψ+8Ψ/N, 4Ψ+12Ψ/N."""
    _check_common(world_size, stage, optimizer)
    if not isinstance(num_params, int) or num_params < 0:
        raise ValueError(f"num_params must be a non-negative integer, got {num_params!r}")
    replicated, partitioned = _formula_terms(stage, dtype, optimizer)
    return replicated * num_params + -(-partitioned * num_params // world_size)


def formula_text(stage: int, dtype: DtypeLike = "fp32", optimizer: str = "adamw") -> str:
    """The closed form as text, e.g. "4Ψ+12Ψ/N"."""
    _check_common(1, stage, optimizer)
    replicated, partitioned = _formula_terms(stage, dtype, optimizer)
    parts = ([f"{replicated}Ψ"] if replicated else []) + ([f"{partitioned}Ψ/N"] if partitioned
                                                         else [])
    return "+".join(parts) or "0"


def param_numels_of(module: torch.nn.Module) -> List[int]:
    """Element counts of a module's trainable parameters, each shared tensor once, in order."""
    return [p.numel() for p in module.parameters() if p.requires_grad]


# ---- what fits ------------------------------------------------------------------------------

def largest_fitting_params(device_bytes: int, *, world_size: int, stage: int,
                           **settings) -> int:
    """The largest parameter count, split as model_shapes.uniform_numels does, whose `total`
    (device bytes of model states and comm buffers) is at most device_bytes; 0 if none fits.
    `settings` are estimate_model_states' keywords."""
    def fits(num_params: int) -> bool:
        report = estimate_model_states(uniform_numels(num_params), world_size=world_size,
                                       stage=stage, **settings)
        return report["total"] <= device_bytes

    if device_bytes < 1 or not fits(1):
        return 0
    # Every parameter costs at least its own 2 bytes on the device, so device_bytes never fits.
    lo, hi = 1, max(2, device_bytes)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ---- command line ---------------------------------------------------------------------------

_MEMORY_UNITS = {"b": 1, "kb": 10 ** 3, "kib": 2 ** 10, "mb": 10 ** 6, "mib": 2 ** 20,
                 "gb": 10 ** 9, "gib": 2 ** 30, "tb": 10 ** 12, "tib": 2 ** 40}
_COUNT_SUFFIXES = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "b": 10 ** 9, "t": 10 ** 12}
_NUMBER = r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)"


def parse_memory(text: str) -> int:
    """'80GB' (10^9), '80GiB' (2^30), also B/KB/KiB/MB/MiB/TB/TiB -> bytes."""
    match = re.fullmatch(_NUMBER + r"\s*([a-z]+)", text.strip().lower())
    if not match or match.group(2) not in _MEMORY_UNITS:
        raise ValueError(f"cannot read {text!r} as an amount of memory: write a number and a "
                         "unit, e.g. 80GB, 80GiB, 512MiB, 1.5TB")
    return int(float(match.group(1)) * _MEMORY_UNITS[match.group(2)])


def parse_count(text: str) -> int:
    """'1.5e9', '1500000000', '1.5B', '125M', '7b' -> an integer count of parameters."""
    # a sign is read so that "-5" is refused as negative, not as unreadable
    match = re.fullmatch("([+-]?)" + _NUMBER + r"\s*([kmbt]?)",
                         text.strip().lower().replace("_", ""))
    if not match:
        raise ValueError(f"cannot read {text!r} as a parameter count: write e.g. 1.5e9, "
                         "1500000000, 1.5B or 125M")
    count = round(float(match.group(1) + match.group(2)) * _COUNT_SUFFIXES[match.group(3)])
    if count < 1:
        raise ValueError(f"the parameter count must be at least 1, got {text!r}")
    return count


def format_bytes(n: int) -> str:
    if n == 0:
        return "0"
    if n >= 2 ** 30:
        return f"{n / 2 ** 30:.2f} GiB"
    return f"{n / 2 ** 20:.1f} MiB"


def format_count(n: int) -> str:
    for suffix, scale in (("T", 10 ** 12), ("B", 10 ** 9), ("M", 10 ** 6), ("K", 10 ** 3)):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def _argument(convert):
    """An argparse type from a converter that raises ValueError with a readable message."""
    def parse(text: str):
        try:
            return convert(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parse.__name__ = convert.__name__
    return parse


def _positive_int(what: str):
    def convert(text: str) -> int:
        if not re.fullmatch(r"[0-9]+", text.strip()) or int(text) < 1:
            raise ValueError(f"{what} is a positive integer, got {text!r}")
        return int(text)
    convert.__name__ = what
    return convert


def _stage(text: str) -> int:
    if text.strip() == "3":
        raise ValueError("stage 3 is not built yet; choose from 0, 1, 2")
    if text.strip() not in ("0", "1", "2"):
        raise ValueError(f"a stage is 0, 1 or 2, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"expected a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m zeroshard.estimate",
        description="Per-rank bytes a zeroshard ZeRO optimizer will hold for a model (parameters, "
                    "gradients, fp32 master, optimizer state, communication buffers), from the "
                    "same buffer layout the optimizer builds. Activations are not counted.",
        epilog="--offload cpu is the design of issue 11 (not built yet): the numbers are that "
               "design's prediction (master weights and optimizer state in host memory).")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--params", type=_argument(parse_count), metavar="N",
                       help="a parameter count (1.5e9, 1.5B, 125M), split into equal tensors "
                            "of at most 4096x4096 elements")
    model.add_argument("--preset", choices=sorted(PRESETS),
                       help="a model whose exact parameter shapes are built in")
    model.add_argument("--config", metavar="CONFIG_JSON",
                       help="a Hugging Face config.json of a GPT-2 or Llama-style model")
    parser.add_argument("--world-size", type=_argument(_positive_int("a world size")),
                        nargs="+", default=[1, 2, 4, 8], metavar="N",
                        help="data-parallel world sizes (default: 1 2 4 8)")
    parser.add_argument("--stage", type=_argument(_stage), nargs="+", default=[0, 1, 2],
                        metavar="S", help="ZeRO stages: 0, 1, 2 (default: all three)")
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), default="fp32",
                        help="parameter dtype (default fp32)")
    parser.add_argument("--reduce-dtype", choices=list(DTYPE_NAMES), default="fp32",
                        help="gradient dtype, as ZeroOptimizer's reduce_dtype (default fp32)")
    parser.add_argument("--optimizer", choices=list(STATE_TENSORS), default="adamw",
                        help="which optimizer state to count (default adamw; sgd = with momentum)")
    parser.add_argument("--offload", choices=["none", "cpu"], default="none",
                        help="cpu: master and optimizer state in host memory (issue 11's design, "
                             "not built yet)")
    parser.add_argument("--bucket-mb", type=_argument(_positive_float), default=None,
                        help="bucket size in MiB of gradients, as ZeroOptimizer's bucket_mb "
                             "(default: its automatic size, 25 MiB but at most an eighth of "
                             "the gradients)")
    parser.add_argument("--max-in-flight", type=_argument(_positive_int("max-in-flight")),
                        default=2, help="buckets reduced at once (default 2)")
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl",
                        help="collective backend (default nccl; gloo adds an all-to-all receive "
                             "buffer per bucket)")
    parser.add_argument("--device-memory", type=_argument(parse_memory), metavar="SIZE",
                        help="memory per device (80GB, 80GiB): also print the largest model "
                             "whose model states fit, per stage and world size")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="write a stacked bar chart of the bytes (needs matplotlib)")
    return parser


def _model_from_args(args, parser) -> Optional[tuple]:
    """(description, numels) of the model the arguments name, or None."""
    if args.params is not None:
        numels = uniform_numels(args.params)
        return "--params, split into equal tensors of at most 4096x4096", numels
    if args.preset is not None:
        return f"preset {args.preset}", preset_numels(args.preset)
    if args.config is not None:
        try:
            family, numels = read_config_numels(args.config)
        except ValueError as err:
            parser.error(str(err))
        return f"{args.config} ({family}-style)", numels
    return None


def _settings(args) -> dict:
    return dict(dtype=args.dtype, reduce_dtype=args.reduce_dtype, bucket_mb=args.bucket_mb,
                offload=args.offload, max_in_flight=args.max_in_flight, backend=args.backend,
                optimizer=args.optimizer)


def _table(rows: List[dict], *, host: bool, device_bytes: Optional[int]) -> str:
    columns = [("stage", lambda r: str(r["stage"])), ("N", lambda r: str(r["world_size"])),
               ("params", lambda r: format_bytes(r["model_params"])),
               ("grads", lambda r: format_bytes(r["grads"])),
               ("fp32 master", lambda r: format_bytes(r["master_params"])),
               ("optim state", lambda r: format_bytes(r["optimizer_state"])),
               ("comm bufs", lambda r: format_bytes(r["comm_buffers"])),
               ("total" + (" (device)" if host else ""), lambda r: format_bytes(r["total"]))]
    if host:
        columns.append(("host", lambda r: format_bytes(r["host_bytes"])))
    if device_bytes is not None:
        columns.append(("fits", lambda r: "yes" if r["total"] <= device_bytes else "no"))
    columns.append(("ZeRO formula", lambda r: f"{r['formula_text']} = "
                                              f"{format_bytes(r['formula'])}"))
    cells = [[name for name, _ in columns]] + [[cell(r) for _, cell in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(rows: List[dict], path: str, *, title: str, device_bytes: Optional[int] = None) -> None:
    """A stacked bar per stage x world size of the byte categories, in GiB."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib "
                           "(or pip install zeroshard[plot])") from None
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    labels = {"model_params": "parameters", "grads": "gradients", "master_params": "fp32 master",
              "optimizer_state": "optimizer state", "comm_buffers": "comm buffers"}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(rows) + 2), 4.5))
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    for key, label in labels.items():
        heights = [r[key] / 2 ** 30 for r in rows]
        ax.bar(x, heights, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    if device_bytes is not None:
        ax.axhline(device_bytes / 2 ** 30, color="black", linestyle="--", label="device memory")
    ax.set_xticks(list(x), [f"s{r['stage']}\nN={r['world_size']}" for r in rows])
    ax.set_ylabel("GiB per rank")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _bucket_text(args, model: Optional[tuple]) -> str:
    if args.bucket_mb is not None:
        return f"bucket {args.bucket_mb:g} MiB"
    if model is None:
        return "automatic bucket size"
    elem = _elem_size(DTYPE_NAMES[args.reduce_dtype])
    return f"bucket {auto_bucket_mb(sum(model[1]), elem):.3g} MiB (automatic)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    model = _model_from_args(args, parser)
    if model is None and args.device_memory is None:
        parser.error("name a model (--params, --preset or --config), or give --device-memory "
                     "to find the largest model that fits")
    settings = _settings(args)
    offload = args.offload == "cpu"
    described = (f"{args.dtype} params, {args.reduce_dtype} gradients, {args.optimizer}, "
                 f"{_bucket_text(args, model)}, {args.backend}"
                 + (", offload cpu (issue 11's design, not built yet)" if offload else ""))
    rows = []
    if model is not None:
        description, numels = model
        total_params = sum(numels)
        print(f"Model: {description}: {total_params:,} parameters in {len(numels)} tensors")
        print(f"Settings: {described}")
        print("Per-rank bytes (model states and gradient communication buffers; activations "
              "not counted):")
        for stage in args.stage:
            for world_size in args.world_size:
                report = estimate_model_states(numels, world_size=world_size, stage=stage,
                                               **settings)
                rows.append(dict(report, stage=stage, world_size=world_size,
                                 formula=zero_formula_bytes(total_params, world_size=world_size,
                                                            stage=stage, dtype=args.dtype,
                                                            optimizer=args.optimizer),
                                 formula_text=formula_text(stage, args.dtype, args.optimizer)))
        print(_table(rows, host=offload, device_bytes=args.device_memory))
        print("ZeRO formula: the paper's closed form (gradients in the parameter dtype, no "
              "padding, no comm buffers), Ψ parameters, N ranks.")
    if args.device_memory is not None:
        print(f"Largest model whose states fit in {args.device_memory:,} bytes "
              f"({format_bytes(args.device_memory)}) per device "
              f"(a parameter count split into 4096x4096 tensors; {described}):")
        for stage in args.stage:
            for world_size in args.world_size:
                n = largest_fitting_params(args.device_memory, world_size=world_size,
                                           stage=stage, **settings)
                print(f"  stage {stage}, N={world_size}: {format_count(n)} parameters ({n:,})")
    if args.plot:
        if not rows:
            parser.error("--plot needs a model (--params, --preset or --config)")
        try:
            plot(rows, args.plot, title=f"{model[0]}: {described}",
                 device_bytes=args.device_memory)
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"Wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
