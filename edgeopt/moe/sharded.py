"""Tensor-by-tensor reads of a (sharded) safetensors checkpoint, without mapping it.

Hand-written rather than `safetensors.safe_open` because packing must read a checkpoint many
times the size of memory: safe_open maps each shard, and every page a read touches stays in
the process's resident set (and counts against a cgroup limit) until the shard is closed. Here
each tensor, or one row of a stacked expert tensor, is one `pread` into a fresh buffer, and the
pages it came through are dropped from the page cache afterwards, so peak memory is what the
caller holds, not what was read. The layout parsed is safetensors' documented one: an 8-byte
little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, then data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeopt.errors import InputError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute, in `file`
    nbytes: int


def read_safetensors_header(path: Path, kind: str) -> tuple[dict, int, int]:
    """A safetensors file's header (without `__metadata__`), the offset its data starts at and the
    file size; `kind` names the file in the one-line errors ("checkpoint shard", "expert store")."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise InputError(f"truncated {kind} {path} ({size} bytes)")
            (length,) = struct.unpack("<Q", raw)
            if length > min(size - 8, 100 << 20):
                raise InputError(f"corrupted {kind} header in {path}")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise InputError(f"cannot read {kind} {path}: {exc}") from exc
    except ValueError as exc:
        raise InputError(f"corrupted {kind} header in {path}: {exc}") from exc
    header.pop("__metadata__", None)
    return header, 8 + length, size


def _read_header(path: Path) -> dict[str, Entry]:
    header, base, size = read_safetensors_header(path, "checkpoint shard")
    out = {}
    for name, info in header.items():
        start, stop = info["data_offsets"]
        if base + stop > size:
            raise InputError(f"truncated checkpoint shard {path}: tensor {name} ends past the file")
        out[name] = Entry(path, info["dtype"], tuple(info["shape"]), base + start, stop - start)
    return out


def shard_files(path: Path) -> list[Path]:
    """The shard files of a checkpoint: an index's shards, a directory's `*.safetensors`, or one file."""
    path = Path(path)
    if path.is_file():
        return [path]
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"malformed checkpoint index {index}: {exc}") from exc
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise InputError(f"checkpoint shard {missing[0].name} named in {index} is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(f"no safetensors weights in {path} (pytorch_model.bin checkpoints are not read: convert them)")
    return files


class ShardedCheckpoint:
    """Name → tensor reads across every shard of a checkpoint (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.files = shard_files(path)
        self.entries: dict[str, Entry] = {}
        for f in self.files:
            self.entries.update(_read_header(f))
        self._fds = {f: os.open(f, os.O_RDONLY) for f in self.files}

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def read(self, name: str, row: int | None = None) -> torch.Tensor:
        """The tensor `name`, or only `tensor[row]` (one expert of a stacked expert tensor)."""
        entry = self.entries[name]
        if entry.dtype not in DTYPES:
            raise InputError(f"checkpoint tensor {name} has dtype {entry.dtype}, which the packer does not read "
                             f"(supported: {', '.join(DTYPES)}); give the bf16/fp16 checkpoint")
        shape, offset, nbytes = entry.shape, entry.offset, entry.nbytes
        if row is not None:
            nbytes //= shape[0]
            offset += row * nbytes
            shape = shape[1:]
        buf = bytearray(nbytes)
        fd = self._fds[entry.file]
        got = os.preadv(fd, [buf], offset)
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        if got != nbytes:
            raise InputError(f"truncated checkpoint: tensor {name} in {entry.file}")
        if nbytes == 0:
            return torch.empty(shape, dtype=DTYPES[entry.dtype])
        tensor = torch.frombuffer(buf, dtype=DTYPES[entry.dtype])
        if tensor.numel() != math.prod(shape):
            raise InputError(f"checkpoint tensor {name}: {nbytes} bytes do not hold shape {list(shape)}")
        return tensor.view(shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
