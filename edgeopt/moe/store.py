"""The expert store: every expert in high and low precisions, each a separately readable record.

A store is a directory:

- `experts.safetensors`: one uint8 tensor per (layer, expert, precision) record, named
  `l{layer}.e{expert}.{precision}`; a record is the concatenation of its components
  (fp16 matrices, or packed codes + fp16 scales + fp16 zeros). The loader reads one
  record with a single `pread` at the offset the safetensors header gives, with O_DIRECT
  where the file system has it (see `ExpertStore.read_raw`).
- `resident.safetensors`: every non-expert parameter and buffer (they stay in memory).
- `store.json`: model description, component layouts, a crc32 per record and one for the
  resident file, so a truncated or corrupted file is reported as an InputError instead of
  garbage logits.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from zlib_ng.zlib_ng import crc32  # zlib's crc32 values, ~10x faster (PCLMUL), GIL released

from edgeopt.errors import InputError
from edgeopt.fileio import write_json, write_with
from edgeopt.models.moe import swiglu_expert
from edgeopt.moe import kernels
from edgeopt.moe.quant import QuantizedWeight, QuantSpec, quantize

FORMAT = "edgeopt-moe-store/1"
LOW_PRECISIONS = {"int4": QuantSpec(4, 64), "int2": QuantSpec(2, 32)}
HIGH_PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}
MATRICES = ("gate_up", "down")


_UNPREPARED = object()


@dataclass
class LoadedExpert:
    """One expert as held in memory: dense (fp16/fp32) or quantized matrices; `nbytes` is what it costs."""

    precision: str
    gate_up: torch.Tensor | QuantizedWeight
    down: torch.Tensor | QuantizedWeight
    nbytes: int
    _kernel: object = field(default=_UNPREPARED, init=False, repr=False, compare=False)  # kernels.prepare's, made on first use

    @property
    def hidden(self) -> int:
        return self.down.shape[0] if isinstance(self.down, torch.Tensor) else self.down.codes.shape[0]

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 dense matrices (only for dense records; quantized ones compute through `forward`)."""
        return tuple(m.float() if isinstance(m, torch.Tensor) else m.dequantize() for m in (self.gate_up, self.down))

    def upcast(self) -> LoadedExpert:
        """fp32 copies of the dense matrices, made once: what the fully resident policy holds where the
        expert kernels are unavailable, so that no token pays an fp16 → fp32 conversion (43% of a resident
        decode step on moe-lm when converted on every use). Costs twice the fp16 bytes, which `nbytes` says."""
        gate_up, down = (m.float() for m in (self.gate_up, self.down))
        return LoadedExpert(self.precision, gate_up, down, 4 * (gate_up.numel() + down.numel()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU expert on x (tokens, hidden) in fp32, the weights read in their stored precision by the
        expert kernels (`edgeopt.moe.kernels`); where those do not apply, fp16 weights are upcast on use
        (the same fp32 math, matching transformers) and low-bit ones dequantized."""
        if self._kernel is _UNPREPARED:
            self._kernel = kernels.prepare(self.gate_up, self.down)
        if self._kernel is not None and kernels.applies(x, self.hidden):
            return self._kernel(x)
        if isinstance(self.gate_up, torch.Tensor):
            return swiglu_expert(x, self.gate_up.to(x.dtype), self.down.to(x.dtype))
        gate, up = self.gate_up.matmul(x).chunk(2, dim=-1)
        return self.down.matmul(F.silu(gate) * up)


# int4 codes are stored HQQ-planar, the layout the expert kernels read. Stores written before in PyTorch's
# CPU int4 kernel layout ("aten-int4pack-cpu") are refused with a request to re-pack.
PORTABLE_LAYOUT = "hqq-planar"


def _components(precision: str, shapes: dict[str, list[int]]) -> list[tuple[str, str, list[int]]]:
    if precision in HIGH_PRECISIONS:
        return [(m, precision, shapes[m]) for m in MATRICES]
    out = []
    for m in MATRICES:
        rows, cols = shapes[m]
        spec = LOW_PRECISIONS[precision].for_width(cols)
        groups = cols // spec.group
        out += [
            (f"{m}.codes", "uint8", [rows, groups, spec.group // spec.per_byte]),
            (f"{m}.scale", "fp16", [rows, groups, 1]),
            (f"{m}.zero", "fp16", [rows, groups, 1]),
        ]
    return out


_NP = {"fp16": np.float16, "fp32": np.float32, "uint8": np.uint8}


def encode_expert(gate_up: torch.Tensor, down: torch.Tensor, precision: str, hqq: bool = True) -> bytes:
    if precision in HIGH_PRECISIONS:
        parts = [t.detach().to(HIGH_PRECISIONS[precision]).contiguous() for t in (gate_up, down)]
    elif precision in LOW_PRECISIONS:
        parts = []
        for t in (gate_up, down):
            q = quantize(t, LOW_PRECISIONS[precision], optimize=hqq)
            parts += [q.codes, q.scale, q.zero]
    else:
        raise InputError(f"unknown precision '{precision}' (known: {', '.join([*HIGH_PRECISIONS, *LOW_PRECISIONS])})")
    return b"".join(p.contiguous().numpy().tobytes() for p in parts)


def decode_expert(
    blob: bytes | bytearray | np.ndarray, precision: str, shapes: dict[str, list[int]]
) -> LoadedExpert:
    """Record bytes → in-memory expert, as views on the read buffer (no copy, no conversion)."""
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for name, dtype, shape in _components(precision, shapes):
        count = int(np.prod(shape))
        arr = np.frombuffer(blob, dtype=_NP[dtype], count=count, offset=offset).reshape(shape)
        tensors[name] = torch.from_numpy(arr)
        offset += arr.nbytes
    if precision in HIGH_PRECISIONS:
        mats = [tensors[m] for m in MATRICES]
    else:
        bits = LOW_PRECISIONS[precision].bits
        mats = [QuantizedWeight(tensors[f"{m}.codes"], tensors[f"{m}.scale"], tensors[f"{m}.zero"], bits) for m in MATRICES]
    return LoadedExpert(precision, mats[0], mats[1], len(blob))


def record_name(layer: int, expert: int, precision: str) -> str:
    return f"l{layer}.e{expert}.{precision}"


def record_nbytes(precision: str, shapes: dict[str, list[int]]) -> int:
    """A record's size, known before any expert is encoded (the streaming writer needs the header first)."""
    sizes = {"fp16": 2, "fp32": 4, "uint8": 1}
    return sum(sizes[dtype] * int(np.prod(shape)) for _, dtype, shape in _components(precision, shapes))


class StoreWriter:
    """Writes a store expert by expert: the experts file's header is computed from the shapes up front,
    each expert's records are appended as they are encoded, so only one expert is in memory at a time.

    `experts.safetensors` is assembled by hand (header, then records in header order) because
    `safetensors.save_file` takes every tensor at once; the result is a valid safetensors file.
    Files go to temporary names and are renamed into place by `finish`, so an interrupted pack leaves
    no half-written store.
    """

    def __init__(self, out: Path, n_layers: int, n_experts: int, shapes: dict[str, list[int]],
                 precisions: tuple[str, ...], hqq: bool = True) -> None:
        for precision in precisions:
            if precision not in HIGH_PRECISIONS and precision not in LOW_PRECISIONS:
                raise InputError(f"unknown precision '{precision}' (known: {', '.join([*HIGH_PRECISIONS, *LOW_PRECISIONS])})")
        self.out = Path(out)
        self.n_layers, self.n_experts = n_layers, n_experts
        self.shapes = {k: list(v) for k, v in shapes.items()}
        self.precisions = tuple(precisions)
        self.hqq = hqq  # False: min-max low-bit codes, ~5x faster to pack, a little less accurate
        self.names = [record_name(layer, e, p) for layer in range(n_layers) for e in range(n_experts) for p in precisions]
        header, offset = {}, 0
        for name in self.names:
            n = record_nbytes(name.rsplit(".", 1)[1], self.shapes)
            header[name] = {"dtype": "U8", "shape": [n], "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out / ".experts.safetensors.tmp"
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed by finish/abort)
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.crcs: dict[str, int] = {}
        self._next = 0

    def add(self, layer: int, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Encode and append one expert (records must come in (layer, expert) order)."""
        if [list(gate_up.shape), list(down.shape)] != [self.shapes["gate_up"], self.shapes["down"]]:
            raise InputError(f"expert sizes differ by layer: layer {layer} expert {expert} has gate_up "
                             f"{list(gate_up.shape)}, down {list(down.shape)}; the store needs {self.shapes} for every expert")
        for precision in self.precisions:
            name = record_name(layer, expert, precision)
            if self.names[self._next] != name:
                raise ValueError(f"record {name} written out of order (expected {self.names[self._next]})")
            blob = encode_expert(gate_up, down, precision, self.hqq)
            self.file.write(blob)
            self.crcs[name] = crc32(blob)
            self._next += 1

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def finish(self, resident: dict[str, torch.Tensor], model_info: dict) -> Path:
        if self._next != len(self.names):
            self.abort()
            raise ValueError(f"store incomplete: {self._next} of {len(self.names)} records written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        resident_path = self.out / "resident.safetensors"
        write_with(resident_path, lambda tmp: save_file({k: v.contiguous() for k, v in resident.items()}, str(tmp)))
        os.replace(self.tmp, self.out / "experts.safetensors")
        manifest = {
            "format": FORMAT,
            "model": model_info,
            "n_layers": self.n_layers,
            "n_experts": self.n_experts,
            "shapes": self.shapes,
            "precisions": list(self.precisions),
            "int4_layout": PORTABLE_LAYOUT,
            "torch": torch.__version__,
            "crc32": self.crcs,
            "low_bit_quantizer": "hqq" if self.hqq else "minmax",
            "resident_crc32": file_crc32(resident_path),
        }
        write_json(self.out / "store.json", manifest)
        return self.out


def file_crc32(path: Path, chunk: int = 16 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = crc32(block, crc)
    return crc


def write_store(
    out: Path,
    experts: list[list[tuple[torch.Tensor, torch.Tensor]]],
    resident: dict[str, torch.Tensor],
    model_info: dict,
    precisions: tuple[str, ...] = ("fp16", "int4", "int2"),
    progress=None,
) -> Path:
    """Write a store from in-memory experts; `experts[layer][expert] = (gate_up (2I, H), down (H, I))`."""
    shapes = {"gate_up": list(experts[0][0][0].shape), "down": list(experts[0][0][1].shape)}
    writer = StoreWriter(Path(out), len(experts), len(experts[0]), shapes, precisions)
    try:
        for layer, layer_experts in enumerate(experts):
            for e, (gate_up, down) in enumerate(layer_experts):
                writer.add(layer, e, gate_up, down)
                if progress:
                    progress()
    except BaseException:
        writer.abort()
        raise
    return writer.finish(resident, model_info)


DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers are multiples of the logical block size (<= 4 KiB)


def open_direct(path: Path) -> int | None:
    """A read-only O_DIRECT descriptor, or None where the OS or file system has none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError:
        return None


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
        layout = self.manifest.get("int4_layout", PORTABLE_LAYOUT)
        if layout != PORTABLE_LAYOUT and "int4" in self.precisions:
            raise InputError(f"{self.path}: int4 records in layout '{layout}' (written by an older edgeopt); "
                             f"re-pack the store with `edgeopt moe pack`")
        self.data_path = self.path / "experts.safetensors"
        self.offsets = self._read_header()
        self._fd = os.open(self.data_path, os.O_RDONLY)
        self._direct_fd = open_direct(self.data_path)
        self._lock = threading.Lock()
        self.drop_after_read = False
        self._verified: set[str] = set()
        self.bytes_read = 0
        self.read_seconds = 0.0

    def _read_header(self) -> dict[str, tuple[int, int]]:
        """Absolute (offset, length) per record from the safetensors header; checks the file is whole."""
        from edgeopt.moe.sharded import read_safetensors_header

        header, base, size = read_safetensors_header(self.data_path, "expert store")
        offsets = {}
        end = base
        for name, info in header.items():
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
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None

    def record_nbytes(self, precision: str) -> int:
        return self.offsets[record_name(0, 0, precision)][1]

    def total_bytes(self, precision: str) -> int:
        return self.record_nbytes(precision) * self.n_layers * self.n_experts

    def drop_page_cache(self) -> None:
        """Evict the store file from the OS page cache so the next reads come from the device."""
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read_raw(self, layer: int, expert: int, precision: str) -> np.ndarray:
        name = record_name(layer, expert, precision)
        if name not in self.offsets:
            raise InputError(f"expert store has no record {name} (precisions: {', '.join(self.precisions)})")
        offset, length = self.offsets[name]
        t0 = time.perf_counter()
        direct = self._read_direct(offset, length) if self._direct_fd is not None else None
        blob, got = direct or self._read_buffered(offset, length)
        dt = time.perf_counter() - t0
        with self._lock:
            self.bytes_read += len(blob)
            self.read_seconds += dt
        if got != length:
            raise InputError(f"truncated expert store record {name} in {self.data_path}")
        # Once per record and session; with zlib-ng (CPython's zlib, at 2.8 GB/s here, cost the loader as much
        # CPU as the read and halved one reader's throughput).
        if name not in self._verified:
            if crc32(blob) != self.manifest["crc32"][name]:
                raise InputError(f"corrupted expert store record {name} in {self.data_path} (checksum mismatch)")
            self._verified.add(name)
        return blob

    def _read_direct(self, offset: int, length: int) -> tuple[np.ndarray, int] | None:
        """(record, bytes of it read) through O_DIRECT: the device writes into an aligned buffer, with no
        page-cache copy, so a read costs the loader thread ~0.08 CPU-ms/MB against 0.45-1.2 buffered with the
        pages dropped after it (this host, 2 readers), and the page cache holds no second copy of experts
        that by assumption do not fit in memory. The record is a view into the block-aligned span around it.
        None where the device refuses the alignment (EINVAL): this read goes buffered instead."""
        start = offset - offset % DIRECT_ALIGN
        span = -(-(offset + length - start) // DIRECT_ALIGN) * DIRECT_ALIGN
        raw = np.empty(span + DIRECT_ALIGN, dtype=np.uint8)
        pad = -raw.ctypes.data % DIRECT_ALIGN
        try:
            got = os.preadv(self._direct_fd, [raw[pad : pad + span]], start)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # a logical block larger than DIRECT_ALIGN
                return None
            raise
        head = pad + offset - start
        return raw[head : head + length], max(0, min(got - (offset - start), length))

    def _read_buffered(self, offset: int, length: int) -> tuple[np.ndarray, int]:
        # Writable, so tensors can view it without a copy; not zero-filled (a bytearray's memset of a
        # 5 MB record ran on the loader thread holding the GIL, stalling the compute thread).
        blob = np.empty(length, dtype=np.uint8)
        got = os.preadv(self._fd, [blob], offset)
        if self.drop_after_read:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)
        return blob, got

    def read(self, layer: int, expert: int, precision: str) -> LoadedExpert:
        return decode_expert(self.read_raw(layer, expert, precision), precision, self.shapes)

    def resident_state(self):
        """The non-expert weights as a name → tensor reader (one tensor in memory at a time while the
        model is filled), after checking the file against the manifest's crc32: a flipped byte there
        would otherwise run silently and change every output."""
        from edgeopt.moe.sharded import ShardedCheckpoint

        path = self.path / "resident.safetensors"
        expected = self.manifest.get("resident_crc32")
        if expected is None:
            raise InputError(f"{self.path}: store has no checksum for its resident weights (packed by an older "
                             f"edgeopt); repack it")
        try:
            crc = file_crc32(path)
        except OSError as exc:
            raise InputError(f"cannot read resident weights {path}: {exc}") from exc
        if crc != expected:
            raise InputError(f"corrupted resident weights {path} (checksum mismatch)")
        return ShardedCheckpoint(path)
