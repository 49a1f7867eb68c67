"""The on-disk format of a zeroshard checkpoint: directory layout, metadata, tensor records.

Owns how bytes are laid out and verified; knows nothing of optimizers or ranks' collectives
(checkpoint.py drives those). A checkpoint at PATH is a directory:

    PATH/LATEST                      the name of the committed snapshot (replaced atomically:
                                     it is the completion marker, written last)
    PATH/ckpt-<token>/metadata.json  format version, versions, world size, stage, layouts,
                                     dtypes, tensor records with per-chunk CRC32 checksums
    PATH/ckpt-<token>/rank-RRRRR-of-NNNNN.bin   rank R's shard of every flat group: for each
                                     group g and state key k a record "g<g>.<k>" holding the
                                     rank's shard (shard space of the saving layout), raw
                                     little-endian; "param" is its slice of the flat param buffer
    PATH/ckpt-<token>/replicated.bin model tensors outside the optimizer's flat groups (frozen
                                     params, buffers), written whole by rank 0
    PATH/ckpt-<token>/extra.pt, rng-RRRRR.pt   the user's `extra` and RNG states (small pickles)

A record is {"offset", "nbytes", "dtype", "crc32": [one per CHUNK_BYTES chunk]}: a reader needs
only the chunks overlapping the range it wants, so a rank reads about what it needs.
Metadata "aliases" lists [alias, name, position] for each state_dict key naming a tensor saved
under another name (tied weights), position counting the state_dict's tensors; a checkpoint
without it has none.
Flat group metadata lists "pieces" [param, param_start, param_end, rank, shard_start]: which
rank-file shard range holds which param range (param space), so a loader at any world size
maps its own shard pieces to saved byte ranges without re-deriving the saving layout.
"""
from __future__ import annotations

import json
import os
import sys
import zlib
from typing import Any, Dict, List, Optional

import numpy as np
import torch

FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 20
LATEST = "LATEST"
METADATA = "metadata.json"
REPLICATED = "replicated.bin"
EXTRA = "extra.pt"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
          "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: missing, truncated or corrupted files, a newer
    format, or a model/optimizer that differs from the saved one. Names the file or tensor."""


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise CheckpointError(f"dtype {dtype} cannot be checkpointed (supported: {sorted(DTYPES)})")
    return name


def rank_file_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.bin"


def rng_file_name(rank: int) -> str:
    return f"rng-{rank:05d}.pt"


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise CheckpointError("zeroshard checkpoints are little-endian; this host is big-endian")


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's raw bytes as a flat uint8 numpy view (a copy only if not contiguous/CPU)."""
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return flat.contiguous().view(torch.uint8).numpy()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class RecordWriter:
    """Appends tensor records to one file, checksumming each CHUNK_BYTES chunk as it goes."""

    def __init__(self, path: str) -> None:
        _require_little_endian()
        self.path = path
        self.file = open(path, "wb")
        self.records: Dict[str, Dict[str, Any]] = {}
        self._open: Optional[Dict[str, Any]] = None

    def begin(self, name: str, dtype: torch.dtype, **info) -> None:
        if name in self.records or self._open is not None:
            raise ValueError(f"record {name!r} written twice or while another is open")
        self._open = dict(info, offset=self.file.tell(), nbytes=0, dtype=dtype_name(dtype),
                          crc32=[])
        self._crc, self._fill = 0, 0
        self.records[name] = self._open

    def write(self, t: torch.Tensor) -> None:
        data = memoryview(tensor_bytes(t))
        rec, pos = self._open, 0
        while pos < len(data):
            take = min(CHUNK_BYTES - self._fill, len(data) - pos)
            self._crc = zlib.crc32(data[pos:pos + take], self._crc)
            self._fill += take
            pos += take
            if self._fill == CHUNK_BYTES:
                rec["crc32"].append(self._crc)
                self._crc, self._fill = 0, 0
        self.file.write(data)
        rec["nbytes"] += len(data)

    def end(self) -> None:
        if self._fill:
            self._open["crc32"].append(self._crc)
        self._open = None

    def write_record(self, name: str, t: torch.Tensor, **info) -> None:
        self.begin(name, t.dtype, **info)
        self.write(t)
        self.end()

    def close(self) -> Dict[str, Any]:
        """fsyncs and closes; returns {"bytes", "records"} for the metadata."""
        self.file.flush()
        os.fsync(self.file.fileno())
        size = self.file.tell()
        self.file.close()
        return {"bytes": size, "records": self.records}


class RecordReader:
    """Reads element ranges of records from one file, verifying every chunk it touches."""

    def __init__(self, path: str, index: Dict[str, Any]) -> None:
        _require_little_endian()
        self.path = path
        self.index = index
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {path} is missing") from None
        size = os.fstat(self.fd).st_size
        if size != index["bytes"]:
            os.close(self.fd)
            raise CheckpointError(f"checkpoint file {path} has {size} bytes, the metadata says "
                                  f"{index['bytes']}: it is truncated or was overwritten")
        self._cached = (None, -1, b"")

    def close(self) -> None:
        os.close(self.fd)

    def record(self, name: str) -> Dict[str, Any]:
        rec = self.index["records"].get(name)
        if rec is None:
            raise CheckpointError(f"checkpoint file {self.path} has no record {name!r}")
        return rec

    def _chunk(self, name: str, rec: Dict[str, Any], c: int) -> bytes:
        if self._cached[0] == name and self._cached[1] == c:
            return self._cached[2]
        start = c * CHUNK_BYTES
        length = min(CHUNK_BYTES, rec["nbytes"] - start)
        data = os.pread(self.fd, length, rec["offset"] + start)
        if len(data) != length:
            raise CheckpointError(f"{self.path}: record {name!r} is truncated at byte "
                                  f"{rec['offset'] + start + len(data)}")
        if zlib.crc32(data) != rec["crc32"][c]:
            raise CheckpointError(
                f"{self.path}: checksum mismatch in record {name!r}, bytes "
                f"{rec['offset'] + start}..{rec['offset'] + start + length} of the file: the "
                "file is corrupted")
        self._cached = (name, c, data)
        return data

    def read_into(self, name: str, first_elem: int, out: torch.Tensor) -> None:
        """Fills the contiguous CPU tensor `out` with elements [first_elem, +out.numel()) of
        record `name`, whose dtype must be out's."""
        rec = self.record(name)
        if rec["dtype"] != dtype_name(out.dtype):
            raise CheckpointError(f"{self.path}: record {name!r} holds {rec['dtype']}, "
                                  f"expected {dtype_name(out.dtype)}")
        es = out.element_size()
        a, b = first_elem * es, (first_elem + out.numel()) * es
        if a < 0 or b > rec["nbytes"]:
            raise CheckpointError(f"{self.path}: record {name!r} has {rec['nbytes']} bytes, "
                                  f"asked for bytes {a}..{b}")
        if b == a:
            return
        dst = out.view(torch.uint8).numpy()
        for c in range(a // CHUNK_BYTES, (b - 1) // CHUNK_BYTES + 1):
            data = self._chunk(name, rec, c)
            c0 = c * CHUNK_BYTES
            lo, hi = max(a, c0), min(b, c0 + len(data))
            dst[lo - a:hi - a] = np.frombuffer(data, np.uint8, hi - lo, lo - c0)


def read_metadata(path: str) -> Dict[str, Any]:
    """The committed snapshot's metadata (with "_dir" set to its directory)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint at {path}: not a directory")
    latest = os.path.join(path, LATEST)
    try:
        with open(latest) as f:
            snapshot = f.read().strip()
    except FileNotFoundError:
        partial = [n for n in os.listdir(path) if n.startswith("ckpt-")]
        hint = f" (found {len(partial)} incomplete save(s), ignored)" if partial else ""
        raise CheckpointError(f"no complete checkpoint at {path}: {latest} is missing{hint}") from None
    if not snapshot.startswith("ckpt-") or os.sep in snapshot:
        raise CheckpointError(f"{latest} names {snapshot!r}, not a checkpoint snapshot")
    directory = os.path.join(path, snapshot)
    meta_path = os.path.join(directory, METADATA)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint metadata {meta_path} is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint metadata {meta_path} is corrupted: {e}") from None
    fmt = meta.get("format")
    if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
        raise CheckpointError(f"{meta_path} has format version {fmt!r}; this zeroshard reads "
                              f"format <= {FORMAT_VERSION} (upgrade zeroshard)")
    meta["_dir"] = directory
    return meta


def saved_piece_index(group_meta: Dict[str, Any]) -> List[List[tuple]]:
    """Per param of a saved flat group: [(rank, param_start, param_end, shard_start)]."""
    out: List[List[tuple]] = [[] for _ in group_meta["params"]]
    for p, p0, p1, r, s0 in group_meta["pieces"]:
        out[p].append((r, p0, p1, s0))
    return out


def read_param_range(readers: Dict[int, RecordReader], key: str, pieces: List[tuple],
                     start: int, out: torch.Tensor) -> None:
    """Fills `out` with param elements [start, start + out.numel()) of record `key` (e.g.
    "g0.exp_avg"), gathered from the saved rank files that hold them."""
    end = start + out.numel()
    covered = 0
    for r, p0, p1, s0 in pieces:
        lo, hi = max(start, p0), min(end, p1)
        if hi > lo:
            readers[r].read_into(key, s0 + (lo - p0), out[lo - start:hi - start])
            covered += hi - lo
    if covered != end - start:
        raise CheckpointError(f"record {key}: the saved pieces cover {covered} of the "
                              f"{end - start} elements asked for; the metadata is inconsistent")
