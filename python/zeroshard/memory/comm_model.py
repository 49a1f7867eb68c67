"""The bytes a training step sends, per rank and per link, before anything runs: what comm_stats()
will report for one step (forward, backward, step), from the same core Layouts the optimizer
builds and the same ring model (comm/topology.py's [Note: bytes across nodes]), for plain ZeRO,
hybrid sharding (shard_size) and ZeRO++'s hpZ, qwZ and qgZ; and the time those bytes take on
links of given speeds, a bound with no overlap.

[Note: what the traffic model covers] One param group of one dtype, no frozen parameters, one
backward a step (no accumulation), every unit run once in forward; control collectives (norms,
flags, tags) are comm_stats()' control_bytes and left out, as there. At stage 3 the units
run in the order of their index (the model's order of registration), so the highest is the one
kept from its forward into backward (param_units' [Note: unit lifecycle]).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from .. import _core
from ..sharding.quantized_gather import message_piece
from .estimate import (_checked_numels, _dtype, _elem_size, _layout, _stage3_bucket, _unit_groups,
                       bucket_elems)

KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast")


def _message(n: int, bits: int) -> int:
    """Bytes of n values block-quantized as the quantized collectives send them."""
    _, q_stride, blocks = message_piece(n, bits)
    return q_stride + 4 * blocks


class _Tally:
    def __init__(self, rank: int, node_size: int) -> None:
        self.rank, self.node_size = rank, node_size
        self.rows = {k: dict.fromkeys(("calls", "payload_bytes", "bytes_sent",
                                       "intra_node_bytes", "inter_node_bytes"), 0)
                     for k in KINDS}

    def add(self, kind: str, payload: int, group: Sequence[int]) -> None:
        """One collective of `payload` bytes over the global ranks `group` (this rank in it)."""
        n = len(group)
        sent = _core.gpu.ring_bytes_sent(kind, payload, n)
        me = group.index(self.rank)
        successor = group[(me + 1) % n]
        across = n > 1 and successor // self.node_size != self.rank // self.node_size
        row = self.rows[kind]
        row["calls"] += 1
        row["payload_bytes"] += payload
        row["bytes_sent"] += sent
        row["inter_node_bytes" if across else "intra_node_bytes"] += sent


def step_traffic(param_numels: Sequence[int], *, world_size: int, stage: int,
                 node_size: Optional[int] = None, rank: Optional[int] = None,
                 dtype="fp32", reduce_dtype="fp32", bucket_mb: Optional[float] = None,
                 units: Optional[Sequence[int]] = None, shard_size=None,
                 secondary_shard: Optional[str] = None, quantize_weights: Optional[str] = None,
                 quantize_grads: Optional[str] = None) -> Dict[str, Dict[str, int]]:
    """comm_stats() of one training step on `rank` (default: the last rank of the first node,
    whose ring successor is on the next node): per collective kind its calls, payload_bytes,
    bytes_sent, intra_node_bytes and inter_node_bytes. Options as ZeroOptimizer's."""
    numels = _checked_numels(param_numels)
    node_size = world_size if node_size is None else node_size
    if world_size % node_size:
        raise ValueError(f"node_size={node_size} does not divide world_size={world_size}")
    k = node_size if shard_size == "node" else (shard_size or world_size)
    if world_size % k:
        raise ValueError(f"shard_size={shard_size!r} does not divide world_size={world_size}")
    if stage == 3 and units is None:
        raise ValueError("stage 3 needs units= (param_units_of(model)), as the estimator")
    rank = node_size - 1 if rank is None else rank
    tally = _Tally(rank, node_size)
    param_elem = _elem_size(_dtype(dtype, "dtype"))
    grad_elem = _elem_size(_dtype(reduce_dtype, "reduce_dtype"))
    bucket = (_stage3_bucket(numels, units, bucket_mb, reduce_dtype) if stage == 3
              else bucket_elems(bucket_mb, reduce_dtype, sum(numels)))
    first = rank // k * k
    shard_group = list(range(first, first + k))
    replica_group = list(range(rank % k, world_size, k))
    node_first = rank // node_size * node_size
    node_group = list(range(node_first, node_first + node_size))
    cross_group = list(range(rank % node_size, world_size, node_size))
    nodes = world_size // node_size
    groups = ([(True, list(range(len(numels))))] if stage != 3 else
              [(u == 0, members) for u, members in _unit_groups(numels, units)])
    # Stage 3 without qwZ or hpZ keeps the unit that runs last in forward for its backward
    last = (len(groups) - 1 if stage == 3 and not (quantize_weights or secondary_shard)
            and not groups[-1][0] else None)
    for g, (is_root, members) in enumerate(groups):
        layout = _layout([numels[i] for i in members], k, _dtype(dtype, "dtype"), bucket)
        sizes = [r.end - r.start for r in layout.bucket_ranges]
        if stage == 3:  # the forward's gathers, then backward's of every unit but the kept ones
            if quantize_weights and not is_root:
                tally.add("all_gather", k * sum(_message(n // k, 8) for n in sizes), shard_group)
            else:
                for n in sizes:
                    tally.add("all_gather", n * param_elem, shard_group)
            if not is_root and g != last:
                for n in sizes:
                    tally.add("all_gather", n * param_elem,
                              node_group if secondary_shard else shard_group)
        for n in sizes:  # the gradient reduction, bucket by bucket
            if stage == 0:
                tally.add("all_reduce", n * grad_elem, shard_group)
            elif quantize_grads:
                bits = int(quantize_grads[3:])
                slice_numel = n // world_size
                tally.add("reduce_scatter", node_size * _message(nodes * slice_numel, bits),
                          node_group)
                tally.add("reduce_scatter", nodes * _message(slice_numel, bits), cross_group)
            else:
                tally.add("reduce_scatter", n * grad_elem, shard_group)
                if k < world_size:
                    tally.add("all_reduce", n // k * grad_elem, replica_group)
        if stage in (1, 2):  # the updated shards, all-gathered in step()
            for n in sizes:
                tally.add("all_gather", n * param_elem, shard_group)
    return tally.rows


def link_seconds(traffic: Dict[str, Dict[str, int]], *, intra_gbps: float,
                 inter_gbps: float) -> float:
    """Seconds the traffic's bytes take on links of these speeds (GB/s, 1e9 bytes), one after
    another: a bound without overlap with compute or between links."""
    intra = sum(row["intra_node_bytes"] for row in traffic.values())
    inter = sum(row["inter_node_bytes"] for row in traffic.values())
    return intra / (intra_gbps * 1e9) + inter / (inter_gbps * 1e9)


OPTIONS: Dict[str, dict] = {
    "plain": {},
    "shard_size=node": {"shard_size": "node"},
    "hpZ": {"secondary_shard": "node"},
    "qwZ": {"quantize_weights": "int8"},
    "qgZ int4": {"quantize_grads": "int4"},
    "ZeRO++ (hpZ+qwZ+qgZ)": {"secondary_shard": "node", "quantize_weights": "int8",
                             "quantize_grads": "int4"},
}


def options_for(stage: int) -> List[str]:
    """The OPTIONS that apply at `stage` (hpZ and qwZ need stage 3; nothing partitions at 0)."""
    if stage == 0:
        return ["plain"]
    if stage in (1, 2):
        return ["plain", "shard_size=node", "qgZ int4"]
    return list(OPTIONS)
