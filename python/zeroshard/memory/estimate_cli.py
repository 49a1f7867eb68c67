"""The estimator's command line: `python -m zeroshard.estimate --help`. Parses the arguments,
builds the model's parameter list (model_shapes), asks estimate.py for each row and prints the
table (and optionally a plot). Owns no arithmetic of its own.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Dict, List, Optional, Sequence

from ..sharding.buffer_ring import auto_bucket_mb, largest_unit_numel
from .estimate import (DTYPE_NAMES, STATE_TENSORS, _device_peak, _elem_size,
                       estimate_model_states, format_bytes, format_count, formula_text,
                       largest_fitting_params, parse_count, parse_memory, zero_formula_bytes)
from .comm_model import OPTIONS, link_seconds, options_for, step_traffic
from .offload_time import offloaded_step_time
from .model_shapes import (PRESETS, UNIFORM_TENSOR_NUMEL, preset_model, read_config_model,
                           uniform_numels, uniform_units, units_after)


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
    if text.strip() not in ("0", "1", "2", "3"):
        raise ValueError(f"a stage is 0, 1, 2 or 3, got {text!r}")
    return int(text)


def _whole_number(what: str):
    def convert(text: str) -> int:
        if not re.fullmatch(r"[0-9]+", text.strip()):
            raise ValueError(f"{what} is a whole number >= 0, got {text!r}")
        return int(text)
    convert.__name__ = what
    return convert


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
        epilog="Stage 3 partitions the parameters too: its table row is between steps (as "
               "memory_report() counts it), and two more columns give the training peak: "
               "'live units', the root unit (embeddings, final norm, head) and the 1 + "
               "--prefetch largest blocks gathered whole during forward/backward, and 'peak', "
               "total + live units (what --device-memory must fit at stage 3). --offload cpu "
               "(stages 1-3) puts the fp32 master, optimizer state and reduced gradient shard "
               "in host memory: 'total' is then the device's bytes and 'host' the host's. "
               "--frozen adds frozen parameters (no gradients, master or optimizer state; a "
               "LoRA's base model) beside the trainable model: the 'frozen' column, whole on "
               "every rank except at stage 3, which partitions them over the N ranks unless "
               "--no-partition-frozen.")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--params", type=_argument(parse_count), metavar="N",
                       help="a parameter count (1.5e9, 1.5B, 125M), split into equal tensors "
                            "of at most 4096x4096 elements")
    model.add_argument("--preset", choices=sorted(PRESETS),
                       help="a model whose exact parameter shapes are built in")
    model.add_argument("--config", metavar="CONFIG_JSON",
                       help="a Hugging Face config.json of a GPT-2 or Llama-style model")
    parser.add_argument("--frozen", type=_argument(parse_count), metavar="N",
                        help="frozen parameters (requires_grad=False, e.g. a LoRA's base model) "
                             "beside the model's trainable ones, in --dtype, split into equal "
                             "tensors of at most 4096x4096 (stage 3: each a unit of its own)")
    parser.add_argument("--partition-frozen", action=argparse.BooleanOptionalAction,
                        default=True,
                        help="stage 3: partition the frozen parameters over the ranks, as "
                             "ZeroOptimizer's partition_frozen (default: yes)")
    parser.add_argument("--world-size", type=_argument(_positive_int("a world size")),
                        nargs="+", default=[1, 2, 4, 8], metavar="N",
                        help="data-parallel world sizes (default: 1 2 4 8)")
    parser.add_argument("--stage", type=_argument(_stage), nargs="+", default=None,
                        metavar="S", help="ZeRO stages: 0, 1, 2, 3 (default: 0 1 2; with "
                                          "--offload cpu 1 2 3)")
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), default="fp32",
                        help="parameter dtype (default fp32)")
    parser.add_argument("--reduce-dtype", choices=list(DTYPE_NAMES), default="fp32",
                        help="gradient dtype, as ZeroOptimizer's reduce_dtype (default fp32)")
    parser.add_argument("--optimizer", choices=list(STATE_TENSORS), default="adamw",
                        help="which optimizer state to count (default adamw; sgd = with momentum)")
    parser.add_argument("--offload", choices=["none", "cpu"], default="none",
                        help="cpu: master, optimizer state and reduced gradients in host "
                             "memory (stages 1-3)")
    parser.add_argument("--bucket-mb", type=_argument(_positive_float), default=None,
                        help="bucket size in MiB of gradients, as ZeroOptimizer's bucket_mb "
                             "(default: its automatic size, 25 MiB but at most 1/32 of the "
                             "gradients' bytes; a small model's up to 1/16 below 4 MiB)")
    parser.add_argument("--prefetch", type=_argument(_whole_number("prefetch")), default=1,
                        help="stage 3: units gathered ahead of the running one, as "
                             "ZeroOptimizer's prefetch (default 1)")
    parser.add_argument("--max-in-flight", type=_argument(_positive_int("max-in-flight")),
                        default=2, help="buckets reduced at once (default 2)")
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl",
                        help="collective backend (default nccl; gloo adds an all-to-all receive "
                             "buffer per bucket)")
    parser.add_argument("--host-gbps", type=_argument(_positive_float), default=None,
                        metavar="GB_S", help="with --offload cpu: this rank's host memory "
                        "bandwidth for the CPU update (GB/s; bench/bench_host_update.py's "
                        "'bound' column); prints the offloaded step time it predicts")
    parser.add_argument("--pcie-gbps", type=_argument(_positive_float), default=25.0,
                        metavar="GB_S", help="device-host copy bandwidth per rank, each way "
                        "(GB/s; default 25, PCIe 4 x16 in practice)")
    parser.add_argument("--device-step-s", type=_argument(_positive_float), default=None,
                        metavar="S", help="the step's time on the device without offload "
                        "(its forward + backward hide the gradients' landing)")
    parser.add_argument("--nodes", type=_argument(_positive_int("a node count")), default=None,
                        help="with --gpus-per-node: the bytes one training step sends per "
                             "rank within and across nodes, and the time they take, for each "
                             "stage and each topology option (plain, shard_size, hpZ, qwZ, qgZ)")
    parser.add_argument("--gpus-per-node", type=_argument(_positive_int("ranks a node")),
                        default=8, help="ranks on each node (default 8)")
    parser.add_argument("--intra-gbps", type=_argument(_positive_float), default=900.0,
                        metavar="GB_S", help="a rank's bandwidth to its node (default 900: "
                        "NVLink 4)")
    parser.add_argument("--inter-gbps", type=_argument(_positive_float), default=100.0,
                        metavar="GB_S", help="a rank's bandwidth to other nodes (default 100)")
    parser.add_argument("--device-memory", type=_argument(parse_memory), metavar="SIZE",
                        help="memory per device (80GB, 80GiB): also print the largest model "
                             "whose model states fit (stage 3: its peak), per stage and world "
                             "size")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="write a stacked bar chart of the bytes (needs matplotlib)")
    return parser


def _model_from_args(args, parser) -> Optional[tuple]:
    """(description, numels, units) of the model the arguments name, or None."""
    if args.params is not None:
        return ("--params, split into equal tensors of at most 4096x4096",
                uniform_numels(args.params), uniform_units(args.params))
    if args.preset is not None:
        return (f"preset {args.preset}",) + preset_model(args.preset)
    if args.config is not None:
        try:
            family, numels, units = read_config_model(args.config)
        except ValueError as err:
            parser.error(str(err))
        return f"{args.config} ({family}-style)", numels, units
    return None


def _frozen_numels(args) -> list:
    """The --frozen parameters' element counts (none without it)."""
    return uniform_numels(args.frozen) if args.frozen is not None else []


def _units_text(args, model: tuple) -> str:
    """What the stage-3 rows assume about the model's units."""
    _, numels, units = model
    sizes: Dict[int, int] = {}
    for n, u in zip(numels, units):
        sizes[u] = sizes.get(u, 0) + n
    if args.params is not None:
        return (f"Stage 3 units: --params gives no architecture, so each of the {len(numels)} "
                f"tensors (at most {UNIFORM_TENSOR_NUMEL:,} elements) is assumed to be a unit "
                "of its own and the root unit empty; a real model's blocks are larger and its "
                "root holds the embeddings, so 'live units' and 'peak' come out low (the other "
                "columns hardly depend on the split). --preset or --config give real units."
                + _frozen_units_text(args))
    blocks = [n for u, n in sizes.items() if u != 0]
    return (f"Stage 3 units: the root (embeddings, final norm, head) of "
            f"{format_count(sizes.get(0, 0))} parameters and {len(blocks)} blocks (the "
            f"nn.ModuleList children) of at most {format_count(max(blocks, default=0))}; "
            f"prefetch {args.prefetch}." + _frozen_units_text(args))


def _frozen_units_text(args) -> str:
    if args.frozen is None or not args.partition_frozen:
        return ""
    return (f" The --frozen parameters' {len(_frozen_numels(args))} tensors are assumed to be "
            "units of their own after the model's (a real model's frozen weights share its "
            "blocks, so 'live units' may come out low).")


def _settings(args) -> dict:
    return dict(dtype=args.dtype, reduce_dtype=args.reduce_dtype, bucket_mb=args.bucket_mb,
                offload=args.offload, max_in_flight=args.max_in_flight, backend=args.backend,
                optimizer=args.optimizer, frozen_numels=_frozen_numels(args),
                partition_frozen=args.partition_frozen)


def _table(rows: List[dict], *, host: bool, device_bytes: Optional[int]) -> str:
    stage3 = any("live_units" in r for r in rows)
    columns = [("stage", lambda r: str(r["stage"])), ("N", lambda r: str(r["world_size"])),
               ("params", lambda r: format_bytes(r["model_params"]))]
    if any(r["frozen_params"] for r in rows):
        columns.append(("frozen", lambda r: format_bytes(r["frozen_params"])))
    columns += [("grads", lambda r: format_bytes(r["grads"])),
               ("fp32 master", lambda r: format_bytes(r["master_params"])),
               ("optim state", lambda r: format_bytes(r["optimizer_state"])),
               ("comm bufs", lambda r: format_bytes(r["comm_buffers"])),
               ("total" + (" (device)" if host else ""), lambda r: format_bytes(r["total"]))]
    if stage3:
        columns.append(("live units", lambda r: format_bytes(r["live_units"])
                        if "live_units" in r else "-"))
        columns.append(("peak" + (" (device)" if host else ""),
                        lambda r: format_bytes(_device_peak(r))))
    if host:
        columns.append(("host", lambda r: format_bytes(r["host_bytes"])))
    if device_bytes is not None:
        columns.append(("fits", lambda r: "yes" if _device_peak(r) <= device_bytes else "no"))
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

    labels = {"model_params": "parameters", "frozen_params": "frozen parameters",
              "grads": "gradients", "master_params": "fp32 master",
              "optimizer_state": "optimizer state", "comm_buffers": "comm buffers"}
    if not any(r["frozen_params"] for r in rows):
        del labels["frozen_params"]
    if any("live_units" in r for r in rows):
        labels["live_units"] = "live units (stage 3, training)"
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(rows) + 2), 4.5))
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    for key, label in labels.items():
        heights = [r.get(key, 0) / 2 ** 30 for r in rows]
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
    _, numels, units = model
    base_mb = auto_bucket_mb(sum(numels), elem)
    text = f"bucket {base_mb:.3g} MiB (automatic"
    unit_mb = auto_bucket_mb(sum(numels), elem, largest_unit_numel(numels, units))
    if 3 in args.stage and unit_mb != base_mb:
        text += f"; {unit_mb:.3g} MiB at stage 3, the largest unit"
    return text + ")"


def _offload_time_text(args, total_params: int) -> str:
    """The offloaded step per rank, from offload_time's model (see its Note)."""
    lines = [f"Offloaded step per rank (host {args.host_gbps:g} GB/s, device-host link "
             f"{args.pcie_gbps:g} GB/s, device step {args.device_step_s or 0:g} s; "
             "zeroshard.offload_time):"]
    for world_size in args.world_size:
        t = offloaded_step_time(total_params, world_size=world_size,
                                host_bytes_per_s=args.host_gbps * 1e9,
                                link_bytes_per_s=args.pcie_gbps * 1e9,
                                device_step_s=args.device_step_s or 0.0,
                                param_dtype=DTYPE_NAMES[args.dtype],
                                reduce_dtype=DTYPE_NAMES[args.reduce_dtype],
                                optimizer=args.optimizer)
        lines.append(f"  N={world_size}: {t['step_s']:.3f} s a step ({t['added_s']:.3f} s added: "
                     f"update {t['update_s']:.3f} s over {format_bytes(int(t['host_update_bytes']))}"
                     f", landing {t['landing_s']:.3f} s of which {t['exposed_landing_s']:.3f} s "
                     f"outlasts backward, upload {t['upload_s']:.3f} s beside the update)")
    return "\n".join(lines)


def _traffic_text(args, model: tuple) -> str:
    """The per-step bytes of the last rank of node 0 (whose ring successor is on node 1) and
    their time on the given links, per stage and option (comm_model.py)."""
    _, numels, units = model
    world, k = args.nodes * args.gpus_per_node, args.gpus_per_node
    lines = [f"Traffic of one training step on {args.nodes} nodes x {k} ranks, per rank (the "
             f"last rank of a node: its ring neighbour is on the next node), links "
             f"{args.intra_gbps:g} GB/s within a node and {args.inter_gbps:g} GB/s across, "
             "one after another (no overlap):",
             f"  {'stage':>5s}  {'option':22s} {'within node':>12s} {'across':>12s} "
             f"{'seconds':>9s} {'vs plain':>8s}"]
    for stage in args.stage:
        plain = None
        for name in options_for(stage):
            traffic = step_traffic(numels, world_size=world, stage=stage, node_size=k,
                                   dtype=args.dtype, reduce_dtype=args.reduce_dtype,
                                   bucket_mb=args.bucket_mb,
                                   units=units if stage == 3 else None, **OPTIONS[name])
            seconds = link_seconds(traffic, intra_gbps=args.intra_gbps,
                                   inter_gbps=args.inter_gbps)
            plain = seconds if plain is None else plain
            intra = sum(r["intra_node_bytes"] for r in traffic.values())
            inter = sum(r["inter_node_bytes"] for r in traffic.values())
            lines.append(f"  {stage:5d}  {name:22s} {format_bytes(intra):>12s} "
                         f"{format_bytes(inter):>12s} {seconds:9.4f} {seconds / plain:8.2f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stage is None:
        args.stage = [1, 2, 3] if args.offload == "cpu" else [0, 1, 2]
    if args.offload == "cpu" and 0 in args.stage:
        parser.error("--offload cpu applies to stages 1, 2 and 3: drop stage 0 from --stage")
    model = _model_from_args(args, parser)
    if args.prefetch != 1 and 3 not in args.stage:
        parser.error("--prefetch applies to stage 3 only: add --stage 3")
    if not args.partition_frozen and (args.frozen is None or 3 not in args.stage):
        parser.error("--no-partition-frozen applies to frozen parameters at stage 3: add "
                     "--frozen N and --stage 3")
    if model is None and args.device_memory is None:
        parser.error("name a model (--params, --preset or --config), or give --device-memory "
                     "to find the largest model that fits")
    settings = _settings(args)
    offload = args.offload == "cpu"
    frozen_text = ""
    if args.frozen is not None:
        frozen_text = (f", {args.frozen:,} frozen parameters beside the trainable ones"
                       + ("" if args.partition_frozen else " (whole at stage 3 too)"))
    described = (f"{args.dtype} params, {args.reduce_dtype} gradients, {args.optimizer}, "
                 f"{_bucket_text(args, model)}, {args.backend}"
                 + (", offload cpu" if offload else "") + frozen_text)
    rows = []
    if model is not None:
        description, numels, units = model
        total_params = sum(numels)
        print(f"Model: {description}: {total_params:,} parameters in {len(numels)} tensors")
        print(f"Settings: {described}")
        print("Per-rank bytes (model states and gradient communication buffers; activations "
              "not counted):")
        for stage in args.stage:
            for world_size in args.world_size:
                extra = dict(units=units, prefetch=args.prefetch,
                             frozen_units=units_after(units, len(settings["frozen_numels"]))
                             ) if stage == 3 else {}
                report = estimate_model_states(numels, world_size=world_size, stage=stage,
                                               **settings, **extra)
                rows.append(dict(report, stage=stage, world_size=world_size,
                                 formula=zero_formula_bytes(total_params, world_size=world_size,
                                                            stage=stage, dtype=args.dtype,
                                                            optimizer=args.optimizer),
                                 formula_text=formula_text(stage, args.dtype, args.optimizer)))
        print(_table(rows, host=offload, device_bytes=args.device_memory))
        print("ZeRO formula: the paper's closed form (gradients in the parameter dtype, no "
              "padding, no comm buffers), Ψ parameters, N ranks"
              + (" (the trainable ones: frozen parameters are not in it)."
                 if args.frozen is not None else "."))
        if 3 in args.stage:
            print("Stage 3: the row is between steps; 'live units' are the parameters gathered "
                  "whole during forward/backward (the root unit and the 1 + prefetch largest "
                  "blocks), 'peak' = total + live units.")
            print(_units_text(args, model))
    if args.nodes is not None:
        if model is None:
            parser.error("--nodes predicts a step's traffic: name a model (--params, --preset "
                         "or --config)")
        print(_traffic_text(args, model))
    if args.host_gbps is not None:
        if not offload or model is None:
            parser.error("--host-gbps predicts the offloaded step: add --offload cpu and a model")
        print(_offload_time_text(args, sum(model[1])))
    if args.device_memory is not None:
        print(f"Largest model whose states fit in {args.device_memory:,} bytes "
              f"({format_bytes(args.device_memory)}) per device "
              f"(a parameter count split into 4096x4096 tensors; {described}"
              + ("; stage 3: its peak, each tensor a unit of its own" if 3 in args.stage
                 else "") + "):")
        for stage in args.stage:
            for world_size in args.world_size:
                extra = dict(prefetch=args.prefetch) if stage == 3 else {}
                n = largest_fitting_params(args.device_memory, world_size=world_size,
                                           stage=stage, **settings, **extra)
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
