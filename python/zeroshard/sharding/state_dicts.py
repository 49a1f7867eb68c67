"""StateDicts: the optimizer's state dicts, this rank's shard and the whole state in torch.optim's
format.

Owns what ZeroOptimizer.state_dict(), load_state_dict() and full_state_dict() produce and accept,
and the checks that keep a state dict from loading where it would silently corrupt training (a
shard on another rank, another world size or stage). zeroshard.checkpoint owns sharded files on
disk; this module owns in-memory dicts that scripts pass to torch.save.

[Note: which state dict] `state_dict()` is not a collective, because scripts call it on rank 0
only; so it can only hold this rank's shard, and it refuses to load anywhere else.
`full_state_dict()` is a collective (every rank calls it) that returns torch.optim's format,
which loads on any rank, world size and stage, into zeroshard or into the stock optimizer.

Its inputs are the state's layout and values (the flat groups, their shard states, the param
groups, the loss scaler or None), the stage, and the communicator a full state dict is gathered
with. Loading writes into those values; the optimizer then re-checks its masters.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from .flat_group import FlatGroup

STATE_FORMAT = 1
PARAM_STEPS = "param_steps"  # per-parameter step counts (see [Note: per-parameter steps])


def _param_steps(fg: FlatGroup, shard_state: Dict[str, Any]) -> List[int]:
    steps = shard_state.get(PARAM_STEPS)
    if not isinstance(steps, list) or len(steps) != len(fg.params):
        return [int(shard_state.get("step", 0))] * len(fg.params)
    return steps


class StateDicts:
    def __init__(self, flat_groups: List[FlatGroup], shard_state: List[Dict[str, Any]],
                 param_groups: List[Dict[str, Any]], *, stage: int, comm, device: torch.device,
                 scaler=None) -> None:
        self.flat_groups = flat_groups
        self.shard_state = shard_state
        self.param_groups = param_groups
        self.stage = stage
        self.comm = comm
        self.device = device  # where a full state dict is gathered (NCCL cannot gather host memory)
        self.rank, self.world_size = comm.rank, comm.world_size
        self.scaler = scaler

    def group_state(self, index: int):
        """Flat group `index`'s state for zeroshard.checkpoint: (tensors by name, JSON-able
        scalars)."""
        state = self.shard_state[index]
        tensors = {k: v.detach() for k, v in state.items() if isinstance(v, torch.Tensor)}
        scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        return tensors, scalars

    def load_group_state(self, index: int, tensors: Dict[str, torch.Tensor],
                         scalars: Dict[str, Any]) -> None:
        """Copies already-validated state in (same keys and shapes as group_state)."""
        state = self.shard_state[index]
        with torch.no_grad():
            for k, v in tensors.items():
                state[k].copy_(v)
        state.update(scalars)

    def layout_signature(self) -> List[Dict[str, Any]]:
        return [{"group_index": fg.group_index, "dtype": str(fg.dtype),
                 "numels": [p.numel() for p in fg.params], "buffer_numel": fg.layout.buffer_numel,
                 "shard_numel": fg.shard_numel} for fg in self.flat_groups]


    def _indexed_groups(self):
        """torch.optim's numbering: parameters by position across param_groups, and the groups'
        hyper-parameters with 'params' as those numbers."""
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        groups = []
        for g in self.param_groups:
            entry = {k: v for k, v in g.items() if k != "params"}
            entry["params"] = [index[id(p)] for p in g["params"]]
            groups.append(entry)
        return index, groups


    def shard_state_dict(self) -> Dict[str, Any]:
        """This rank's shard of the optimizer state, torch.optim-shaped ('state' keyed by flat
        group, 'param_groups' with hyper-parameters) plus a 'zeroshard' section describing the
        layout. Loads back on the same rank at the same world size and stage; not a
        collective, so it may be called on one rank. For a rank-independent state dict see
        full_state_dict(); for sharded checkpoints, zeroshard.checkpoint."""
        _, groups = self._indexed_groups()
        state = {i: {k: (v.detach().clone() if isinstance(v, torch.Tensor) else
                         list(v) if isinstance(v, list) else v) for k, v in s.items()}
                 for i, s in enumerate(self.shard_state)}
        return {"state": state, "param_groups": groups,
                "zeroshard": {"format": STATE_FORMAT, "stage": self.stage, "rank": self.rank,
                              "world_size": self.world_size, "flat_groups": self.layout_signature(),
                              "loss_scaler": self.scaler.state_dict() if self.scaler else None}}


    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Validates everything first, then loads: on error nothing has changed. The optimizer
        then re-checks its masters: the model may be loaded after the optimizer."""
        if not isinstance(state_dict, dict) or "state" not in state_dict \
                or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state_dict (needs 'state' and 'param_groups')")
        meta = state_dict.get("zeroshard")
        if meta is None:  # torch.optim's format: the stock optimizer's state_dict
            self.load_full_state_dict(state_dict)
            return
        if meta["format"] > STATE_FORMAT:
            raise ValueError(f"state_dict format {meta['format']} is newer than this zeroshard "
                             f"understands ({STATE_FORMAT}); upgrade zeroshard")
        if meta.get("consolidated"):
            self.load_full_state_dict(state_dict)
            return
        saved_rank = meta.get("rank", self.rank)
        if meta["world_size"] != self.world_size or (self.stage != 0 and saved_rank != self.rank):
            raise ValueError(
                f"this state_dict is rank {saved_rank}'s part of a world-size-"
                f"{meta['world_size']} run (optimizer.state_dict() holds only the calling "
                f"rank's shard), and this is rank {self.rank} of {self.world_size}. Save "
                "self.full_state_dict() instead (every rank calls it; it loads on any rank and "
                "world size), use zeroshard.checkpoint.save/load (sharded, reshards), or give "
                "each rank its own self.state_dict() file.")
        if meta["stage"] != self.stage:
            raise ValueError(f"state_dict was saved with stage={meta['stage']}, this optimizer "
                             f"has stage={self.stage}; use self.full_state_dict() or "
                             "zeroshard.checkpoint to change stage")
        if meta["flat_groups"] != self.layout_signature():
            raise ValueError("state_dict's parameter layout differs from this optimizer's "
                             "(different model, param groups or dtypes)")
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(state_dict['param_groups'])} param groups, "
                             f"this optimizer {len(self.param_groups)}")
        loaded = state_dict["state"]
        for i, current in enumerate(self.shard_state):
            saved = loaded.get(i, loaded.get(str(i)))
            # Saved before per-parameter step counts (see [Note: per-parameter steps]): every
            # parameter had taken the flat group's steps.
            expected = set(current) - ({PARAM_STEPS} if saved is not None and PARAM_STEPS not in saved
                                       and "step" in saved else set())
            if saved is None or set(saved) != expected:
                raise ValueError(f"state_dict's state for flat group {i} has keys "
                                 f"{sorted(saved or [])}, expected {sorted(current)}")
            for k, v in current.items():
                if isinstance(v, torch.Tensor) and saved[k].shape != v.shape:
                    raise ValueError(f"state_dict's {k} of flat group {i} has shape "
                                     f"{tuple(saved[k].shape)}, expected {tuple(v.shape)}")
            steps = saved.get(PARAM_STEPS)
            if steps is not None and (not isinstance(steps, (list, tuple))
                                      or len(steps) != len(self.flat_groups[i].params)):
                raise ValueError(f"state_dict's {PARAM_STEPS} of flat group {i} is {steps!r}, "
                                 f"expected {len(self.flat_groups[i].params)} step counts")
        with torch.no_grad():
            for i, current in enumerate(self.shard_state):
                saved = loaded.get(i, loaded.get(str(i)))
                for k, v in saved.items():
                    if isinstance(current[k], torch.Tensor):
                        current[k].copy_(v)
                    else:
                        current[k] = list(v) if isinstance(v, (list, tuple)) else v
                if PARAM_STEPS in current and PARAM_STEPS not in saved:
                    current[PARAM_STEPS] = [int(saved["step"])] * len(current[PARAM_STEPS])
        for mine, saved in zip(self.param_groups, state_dict["param_groups"]):
            for k, v in saved.items():
                if k != "params":
                    mine[k] = v
        if self.scaler is not None and meta["loss_scaler"] is not None:
            self.scaler.load_state_dict(meta["loss_scaler"])

    def full_state_dict(self) -> Dict[str, Any]:
        """The whole optimizer state in torch.optim's format: 'state' keyed by parameter index
        (in param_groups order) with tensors shaped like the parameters ('step', 'exp_avg',
        'exp_avg_sq'...; 'master' too for bf16/fp16 parameters), and 'param_groups'. It loads
        back into a zeroshard optimizer on any rank, world size and stage, and into the stock
        torch.optim optimizer. A collective: every rank must call it (each gets the same dict);
        a call on one rank only fails with an error that says so."""
        index, groups = self._indexed_groups()
        state: Dict[int, Dict[str, Any]] = {}
        for fg, shard_state in zip(self.flat_groups, self.shard_state):
            whole = {k: self._whole_state(fg, v) for k, v in shard_state.items()
                     if isinstance(v, torch.Tensor)}
            steps = _param_steps(fg, shard_state)
            for j, p in enumerate(fg.params):
                start, end = fg.param_ranges[j]
                entry: Dict[str, Any] = {"step": torch.tensor(float(steps[j]))}
                for k, t in whole.items():
                    entry[k] = t[start:end].view(fg.shapes[j]).clone()
                state[index[id(p)]] = entry
        return {"state": state, "param_groups": groups,
                "zeroshard": {"format": STATE_FORMAT, "consolidated": True,
                              "loss_scaler": self.scaler.state_dict() if self.scaler else None}}


    def _whole_state(self, fg: FlatGroup, tensor: torch.Tensor) -> torch.Tensor:
        """A state tensor over the whole flat buffer: all-gathered from every rank's shard."""
        if self.stage == 0:
            return tensor.detach()
        # On the optimizer's device: with offload the state is in host memory, which NCCL
        # cannot gather.
        whole = torch.zeros(fg.layout.buffer_numel, dtype=tensor.dtype, device=self.device)
        for b0, b1, s0 in fg.shard_slices():
            whole[b0:b1].copy_(tensor[s0:s0 + (b1 - b0)])
        works = []
        for b, (b_start, b_end) in enumerate(fg.bucket_ranges):
            s_start, s_end, _ = fg.bucket_slice(b)
            works.append(self.comm.all_gather(whole[b_start:b_end], whole[s_start:s_end]))
        for w in works:
            w.wait()
        return whole


    def load_full_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads a torch.optim-format state dict (full_state_dict(), or the stock torch
        optimizer's): each rank takes its shard of every tensor. Validates first."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}")
        for gi, (mine, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(f"state_dict's param group {gi} has {len(saved['params'])} "
                                 f"parameters, this optimizer's {len(mine['params'])}")
        key_of = {}
        for mine, saved in zip(self.param_groups, saved_groups):
            for p, key in zip(mine["params"], saved["params"]):
                key_of[id(p)] = key
        saved_state = state_dict["state"]
        if not saved_state and self.flat_groups:
            fg = self.flat_groups[0]
            raise ValueError(f"state_dict has no state for {fg.names[0]}; it was saved before "
                             "the optimizer's first step, or for another model")
        copies = []  # (state tensor, [(state_start, saved values)]) for every parameter
        zeroed = []  # (state tensor, [(state_start, state_end)]): parameters without saved state
        step_counts = []  # (shard_state, per-parameter steps)
        for fg, shard_state in zip(self.flat_groups, self.shard_state):
            steps = []
            for j, p in enumerate(fg.params):
                entry = saved_state.get(key_of[id(p)], saved_state.get(str(key_of[id(p)])))
                name = fg.names[j]
                if not entry:
                    # torch.optim has no state for a parameter that never got a gradient (see
                    # [Note: per-parameter steps]): it starts from nothing, at step 0.
                    steps.append(0)
                    for k, v in shard_state.items():
                        if isinstance(v, torch.Tensor) and k != "master":
                            zeroed.append((v, [(s0, s0 + (p1 - p0))
                                               for p0, p1, s0 in fg.param_shard_pieces[j]]))
                    continue
                for k, v in shard_state.items():
                    if not isinstance(v, torch.Tensor) or (k == "master" and k not in entry):
                        continue
                    if k not in entry:
                        raise ValueError(f"state_dict's state for {name} has no '{k}' (it has "
                                         f"{sorted(entry)})")
                    saved_t = entry[k]
                    if (not isinstance(saved_t, torch.Tensor)
                            or saved_t.numel() != fg.shapes[j].numel()):
                        raise ValueError(f"state_dict's '{k}' for {name} has shape "
                                         f"{tuple(getattr(saved_t, 'shape', ()))}, the "
                                         f"parameter {tuple(fg.shapes[j])}")
                    flat = saved_t.detach().reshape(-1)
                    copies.append((shard_state[k], [(s0, flat[p0:p1])
                                                    for p0, p1, s0 in fg.param_shard_pieces[j]]))
                # torch's SGD keeps no "step": a parameter with state has stepped at least once.
                step = entry.get("step", 1)
                steps.append(int(step.item() if isinstance(step, torch.Tensor) else step))
            if "step" in shard_state:
                step_counts.append((shard_state, steps))
        with torch.no_grad():
            for fg, shard_state in zip(self.flat_groups, self.shard_state):
                if "master" in shard_state:  # refreshed from the parameters unless saved
                    fg.copy_shard_into(shard_state["master"])
            for target, pieces in copies:
                for s0, values in pieces:
                    target[s0:s0 + values.numel()].copy_(values)
            for target, ranges in zeroed:
                for s0, s1 in ranges:
                    target[s0:s1].zero_()
        for shard_state, steps in step_counts:
            shard_state["step"] = max(steps, default=0)
            if PARAM_STEPS in shard_state:
                shard_state[PARAM_STEPS] = steps
        for mine, saved in zip(self.param_groups, saved_groups):
            for k, v in saved.items():
                if k != "params":
                    mine[k] = v
        meta = state_dict.get("zeroshard") or {}
        if self.scaler is not None and meta.get("loss_scaler") is not None:
            self.scaler.load_state_dict(meta["loss_scaler"])
