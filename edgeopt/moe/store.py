"""The expert store: every expert in high and low precisions, each a separately readable record.

A store is a directory:

- `experts.safetensors`: one uint8 tensor per (layer, expert, precision) record, named
  `l{layer}.e{expert}.{precision}`; a record is the concatenation of its components
  (fp16 matrices, or packed codes + fp16 scales + fp16 zeros). The loader reads one
  record with a single `pread` at the offset the safetensors header gives.
- `resident.safetensors`: every non-expert parameter and buffer (they stay in memory).
- `store.json`: model description, component layouts and a crc32 per record, so a
  truncated or corrupted file is reported as an InputError instead of garbage logits.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from edgeopt.errors import InputError
from edgeopt.fileio import write_json, write_with
from edgeopt.models.moe import swiglu_expert
from edgeopt.moe.quant import Int4Kernel, QuantizedWeight, QuantSpec, quantize

FORMAT = "edgeopt-moe-store/1"
LOW_PRECISIONS = {"int4": QuantSpec(4, 64), "int2": QuantSpec(2, 32)}
HIGH_PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}
MATRICES = ("gate_up", "down")


@dataclass
class LoadedExpert:
    """One expert as held in memory: dense (fp16/fp32) or quantized matrices; `nbytes` is what it costs."""

    precision: str
    gate_up: torch.Tensor | QuantizedWeight | Int4Kernel
    down: torch.Tensor | QuantizedWeight | Int4Kernel
    nbytes: int

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 dense matrices (only for dense records; quantized ones compute through `forward`)."""
        return tuple(m.float() if isinstance(m, torch.Tensor) else m.dequantize() for m in (self.gate_up, self.down))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU expert on x (tokens, hidden); dense weights are upcast on use so memory stays compact."""
        if isinstance(self.gate_up, torch.Tensor):
            return swiglu_expert(x, self.gate_up.to(x.dtype), self.down.to(x.dtype))
        gate, up = self.gate_up.matmul(x).chunk(2, dim=-1)
        return self.down.matmul(F.silu(gate) * up)


KERNEL_LAYOUT, PORTABLE_LAYOUT = "aten-int4pack-cpu", "hqq-planar"


def int4_layout(shapes: dict[str, list[int]]) -> str:
    """int4 records are stored in the CPU int4 kernel's own layout when the kernel exists and fits:
    converting at load time costs more than reading the record (0.45 vs 0.17 ms measured)."""
    fits = all(Int4Kernel.fits(rows, LOW_PRECISIONS["int4"].for_width(cols)) for rows, cols in shapes.values())
    return KERNEL_LAYOUT if fits else PORTABLE_LAYOUT


def _components(precision: str, shapes: dict[str, list[int]], layout: str) -> list[tuple[str, str, list[int]]]:
    if precision in HIGH_PRECISIONS:
        return [(m, precision, shapes[m]) for m in MATRICES]
    out = []
    for m in MATRICES:
        rows, cols = shapes[m]
        spec = LOW_PRECISIONS[precision].for_width(cols)
        groups = cols // spec.group
        if precision == "int4" and layout == KERNEL_LAYOUT:
            out += [(f"{m}.packed", "uint8", [rows, cols // 2]), (f"{m}.scales_zeros", "bf16", [groups, rows, 2])]
            continue
        out += [
            (f"{m}.codes", "uint8", [rows, groups, spec.group // spec.per_byte]),
            (f"{m}.scale", "fp16", [rows, groups, 1]),
            (f"{m}.zero", "fp16", [rows, groups, 1]),
        ]
    return out


_NP = {"fp16": np.float16, "fp32": np.float32, "uint8": np.uint8, "bf16": np.int16}  # bf16 travels as raw int16


def encode_expert(gate_up: torch.Tensor, down: torch.Tensor, precision: str, layout: str = PORTABLE_LAYOUT) -> bytes:
    if precision in HIGH_PRECISIONS:
        parts = [t.detach().to(HIGH_PRECISIONS[precision]).contiguous() for t in (gate_up, down)]
    elif precision in LOW_PRECISIONS:
        parts = []
        for t in (gate_up, down):
            q = quantize(t, LOW_PRECISIONS[precision])
            if precision == "int4" and layout == KERNEL_LAYOUT:
                k = Int4Kernel.from_quantized(q)
                parts += [k.packed, k.scales_zeros.view(torch.int16)]
            else:
                parts += [q.codes, q.scale, q.zero]
    else:
        raise InputError(f"unknown precision '{precision}' (known: {', '.join([*HIGH_PRECISIONS, *LOW_PRECISIONS])})")
    return b"".join(p.contiguous().numpy().tobytes() for p in parts)


def decode_expert(
    blob: bytes | bytearray, precision: str, shapes: dict[str, list[int]], layout: str = PORTABLE_LAYOUT
) -> LoadedExpert:
    """Record bytes → in-memory expert, as views on the read buffer (no copy, no conversion)."""
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for name, dtype, shape in _components(precision, shapes, layout):
        count = int(np.prod(shape))
        arr = np.frombuffer(blob, dtype=_NP[dtype], count=count, offset=offset).reshape(shape)
        tensors[name] = torch.from_numpy(arr).view(torch.bfloat16) if dtype == "bf16" else torch.from_numpy(arr)
        offset += arr.nbytes
    if precision in HIGH_PRECISIONS:
        mats = [tensors[m] for m in MATRICES]
    elif precision == "int4" and layout == KERNEL_LAYOUT:
        mats = [
            Int4Kernel(tensors[f"{m}.packed"], tensors[f"{m}.scales_zeros"], shapes[m][1] // tensors[f"{m}.scales_zeros"].shape[0],
                       shapes[m][0], shapes[m][1])
            for m in MATRICES
        ]
    else:
        bits = LOW_PRECISIONS[precision].bits
        mats = [QuantizedWeight(tensors[f"{m}.codes"], tensors[f"{m}.scale"], tensors[f"{m}.zero"], bits) for m in MATRICES]
    return LoadedExpert(precision, mats[0], mats[1], len(blob))


def record_name(layer: int, expert: int, precision: str) -> str:
    return f"l{layer}.e{expert}.{precision}"


def write_store(
    out: Path,
    experts: list[list[tuple[torch.Tensor, torch.Tensor]]],
    resident: dict[str, torch.Tensor],
    model_info: dict,
    precisions: tuple[str, ...] = ("fp16", "int4", "int2"),
    progress=None,
) -> Path:
    """Write a store; `experts[layer][expert] = (gate_up (2I, H), down (H, I))`."""
    out = Path(out)
    shapes = {"gate_up": list(experts[0][0][0].shape), "down": list(experts[0][0][1].shape)}
    records: dict[str, torch.Tensor] = {}
    crcs: dict[str, int] = {}
    layout = int4_layout(shapes)
    for layer, layer_experts in enumerate(experts):
        for e, (gate_up, down) in enumerate(layer_experts):
            for precision in precisions:
                blob = encode_expert(gate_up, down, precision, layout)
                name = record_name(layer, e, precision)
                records[name] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
                crcs[name] = zlib.crc32(blob)
            if progress:
                progress()
    out.mkdir(parents=True, exist_ok=True)
    write_with(out / "experts.safetensors", lambda tmp: save_file(records, str(tmp)))
    write_with(out / "resident.safetensors", lambda tmp: save_file({k: v.contiguous() for k, v in resident.items()}, str(tmp)))
    manifest = {
        "format": FORMAT,
        "model": model_info,
        "n_layers": len(experts),
        "n_experts": len(experts[0]),
        "shapes": shapes,
        "precisions": list(precisions),
        "int4_layout": layout,
        "torch": torch.__version__,
        "crc32": crcs,
    }
    write_json(out / "store.json", manifest)
    return out


class ExpertStore:
    """Read-only access to a packed store; `read` is thread-safe (pread on one fd)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / "store.json"
        if not manifest_path.is_file():
            raise InputError(f"not an expert store (no store.json): {self.path}")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {manifest_path}: {exc}") from exc
        if self.manifest.get("format") != FORMAT:
            raise InputError(f"{manifest_path}: unsupported store format {self.manifest.get('format')!r}")
        self.n_layers: int = self.manifest["n_layers"]
        self.n_experts: int = self.manifest["n_experts"]
        self.shapes: dict[str, list[int]] = self.manifest["shapes"]
        self.precisions: list[str] = self.manifest["precisions"]
        self.int4_layout: str = self.manifest.get("int4_layout", PORTABLE_LAYOUT)
        if self.int4_layout == KERNEL_LAYOUT and "int4" in self.precisions and not Int4Kernel.available():
            raise InputError(f"{self.path}: int4 records use PyTorch's CPU int4 kernel layout, which PyTorch "
                             f"{torch.__version__} lacks; repack the store with this PyTorch")
        self.data_path = self.path / "experts.safetensors"
        self.offsets = self._read_header()
        self._fd = os.open(self.data_path, os.O_RDONLY)
        self._lock = threading.Lock()
        self.drop_after_read = False
        self._verified: set[str] = set()
        self.bytes_read = 0
        self.read_seconds = 0.0

    def _read_header(self) -> dict[str, tuple[int, int]]:
        """Absolute (offset, length) per record from the safetensors header; checks the file is whole."""
        try:
            size = self.data_path.stat().st_size
            with open(self.data_path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise InputError(f"truncated expert store {self.data_path} ({size} bytes)")
                (header_len,) = struct.unpack("<Q", raw)
                if header_len > min(size - 8, 100 << 20):
                    raise InputError(f"corrupted expert store header in {self.data_path}")
                header = json.loads(f.read(header_len))
        except OSError as exc:
            raise InputError(f"cannot read expert store {self.data_path}: {exc}") from exc
        except ValueError as exc:
            raise InputError(f"corrupted expert store header in {self.data_path}: {exc}") from exc
        base = 8 + header_len
        offsets = {}
        end = base
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, stop = info["data_offsets"]
            offsets[name] = (base + start, stop - start)
            end = max(end, base + stop)
        if end != size:
            raise InputError(f"truncated or padded expert store {self.data_path}: header says {end} bytes, file has {size}")
        missing = [n for n in self.manifest["crc32"] if n not in offsets]
        if missing:
            raise InputError(f"expert store {self.data_path} lacks record {missing[0]}")
        return offsets

    def close(self) -> None:
        os.close(self._fd)

    def record_nbytes(self, precision: str) -> int:
        return self.offsets[record_name(0, 0, precision)][1]

    def total_bytes(self, precision: str) -> int:
        return self.record_nbytes(precision) * self.n_layers * self.n_experts

    def drop_page_cache(self) -> None:
        """Evict the store file from the OS page cache so the next reads come from the device."""
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read_raw(self, layer: int, expert: int, precision: str) -> bytearray:
        name = record_name(layer, expert, precision)
        if name not in self.offsets:
            raise InputError(f"expert store has no record {name} (precisions: {', '.join(self.precisions)})")
        offset, length = self.offsets[name]
        t0 = time.perf_counter()
        blob = bytearray(length)  # writable, so tensors can view it without a copy
        got = os.preadv(self._fd, [blob], offset)
        if self.drop_after_read:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)
        dt = time.perf_counter() - t0
        with self._lock:
            self.bytes_read += len(blob)
            self.read_seconds += dt
        if got != length:
            raise InputError(f"truncated expert store record {name} in {self.data_path}")
        if name not in self._verified:  # once per record and session: a crc costs about as much as the read
            if zlib.crc32(blob) != self.manifest["crc32"][name]:
                raise InputError(f"corrupted expert store record {name} in {self.data_path} (checksum mismatch)")
            self._verified.add(name)
        return blob

    def read(self, layer: int, expert: int, precision: str) -> LoadedExpert:
        return decode_expert(self.read_raw(layer, expert, precision), precision, self.shapes, self.int4_layout)

    def resident_state(self) -> dict[str, torch.Tensor]:
        path = self.path / "resident.safetensors"
        try:
            return load_file(str(path))
        except Exception as exc:
            raise InputError(f"cannot read resident weights {path}: {exc}") from exc
