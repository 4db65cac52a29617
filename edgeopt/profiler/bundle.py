"""A bundle is everything the device needs to profile one model, in one directory.

    model.<onnx|tflite|engine|pte>  the artifact
    eval.npz                     x (inputs) and y (integer labels) of the eval split; for a detector
                                 the ground truth instead (boxes, labels, counts per image)
    yolo_decode.py               detectors only: numpy decode + NMS the agent runs on the raw outputs
    meta.json                    runtime, threads, batch size, tensor names, ids, op libraries
    agent.py                     the device-side agent (stdlib + numpy + runtime)
    ops/                         for a .pte calling edgeopt's custom ops: the kernel source and
                                 its stdlib-only builder, so the device builds the op library

A `tensorrt` bundle normally carries the ONNX model plus its `precision`
(fp32/fp16/int8/mixed) rather than an engine: engines only run on the GPU and
TensorRT version that built them, so the agent builds one on the device.

It is written to a temporary sibling directory and renamed into place, so a
failure never leaves a half-written bundle that a device could pick up.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from edgeopt.errors import InputError, unknown_name

AGENT_PATH = Path(__file__).with_name("agent.py")
DECODER_PATH = Path(__file__).resolve().parents[1] / "tasks" / "yolo_decode.py"
MODEL_SUFFIXES = {"onnxruntime": (".onnx",), "tflite": (".tflite",), "tensorrt": (".engine", ".plan", ".trt", ".onnx"),
                  "executorch": (".pte",)}
BUNDLE_FORMAT = 1
TENSORRT_PRECISIONS = ("fp32", "fp16", "int8", "mixed")  # = agent.TRT_PRECISIONS
# int8 forms TensorRT cannot build: onnxruntime's dynamic quantization and QOperator format
INTEGER_OPS = ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv",
               "QLinearAdd", "QLinearMul")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_onnx(model_path: Path):
    import onnx

    try:
        return onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a corrupt file
        raise InputError(f"{model_path}: not a readable ONNX model ({exc})") from None


def _onnx_external_data(model_path: Path) -> list[Path]:
    """Files an ONNX model keeps its weights in (e.g. `model.onnx.data`); they must travel with it."""
    if model_path.suffix != ".onnx":
        return []
    from onnx.external_data_helper import uses_external_data

    model = _load_onnx(model_path)
    names = {
        entry.value
        for tensor in model.graph.initializer
        if uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    for name in names:
        if Path(name).name != name:
            raise InputError(f"{model_path}: external data '{name}' must sit next to the model file")
    return [model_path.parent / name for name in sorted(names)]


def check_tensorrt_onnx(model_path: Path, precision: str | None = None) -> str:
    """The precision TensorRT will build `model_path` at, or a one-line error for what it cannot build.

    Checked here because on the device it only shows after a slow parse, with a
    cryptic message. TensorRT's int8 is explicit quantization: symmetric int8 Q/DQ
    (zero point 0, no int32 bias). `precision` None means what the file holds:
    Q/DQ → int8, fp16 weights → fp16, else fp32.
    """
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import uses_external_data

    model = _load_onnx(model_path)
    name = Path(model_path).name
    ops = {node.op_type for node in model.graph.node}
    integer_ops = sorted(ops.intersection(INTEGER_OPS))
    if integer_ops:
        raise InputError(f"{name}: TensorRT cannot build onnxruntime's integer int8 ops ({', '.join(integer_ops)}); "
                         f"use static Q/DQ int8 (quantize mode static) or fp16")
    has_qdq = bool(ops & {"QuantizeLinear", "DequantizeLinear"})
    if precision is None:
        has_fp16 = any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
        precision = "int8" if has_qdq else "fp16" if has_fp16 else "fp32"
    if precision not in TENSORRT_PRECISIONS:
        raise unknown_name("TensorRT precision", precision, TENSORRT_PRECISIONS)
    if precision in ("int8", "mixed") and not has_qdq:
        raise InputError(f"{name}: {precision} TensorRT engines need a Q/DQ ONNX model "
                         f"(quantize pass: format onnx, mode static)")
    if precision in ("fp32", "fp16") and has_qdq:
        raise InputError(f"{name} has Q/DQ nodes, so TensorRT runs it as int8: use precision int8 or mixed, "
                         f"not {precision}")
    initializers = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    for index, node in enumerate(model.graph.node):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        where = _qdq_place(index, node, consumers)
        data = initializers.get(node.input[0])
        if node.op_type == "DequantizeLinear" and data is not None and data.data_type == TensorProto.INT32:
            raise InputError(f"{name}: {where} holds an int32-quantized bias; TensorRT takes int8 Q/DQ only: "
                             f"quantize with QuantizeBias: False")
        zero = initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is None or uses_external_data(zero):
            continue
        values = numpy_helper.to_array(zero)
        if zero.data_type != TensorProto.INT8 or values.any():
            kind = TensorProto.DataType.Name(zero.data_type).lower()
            raise InputError(f"{name}: TensorRT supports only symmetric int8 Q/DQ, but {where} has {kind} "
                             f"zero point {values.ravel()[:3].tolist()}; quantize with symmetric int8 "
                             f"activations (the quantize pass does so for a Jetson profile)")
    for tensor in model.graph.input:
        dims = tensor.type.tensor_type.shape.dim[1:]
        if tensor.name not in initializers and any(d.dim_param or d.dim_value <= 0 for d in dims):
            raise InputError(f"{name}: input '{tensor.name}' is dynamic beyond the batch dimension; "
                             f"TensorRT engines here need a fixed input shape")
    return precision


def _qdq_place(index: int, node, consumers: dict[str, list]) -> str:
    """A Q/DQ node by the ops it quantizes for ("QuantizeLinear #4 (into MatMul)", looking through
    its DequantizeLinear): deployable graphs carry short generated node names, which say nothing."""
    into, frontier = set(), [node]
    while frontier:
        for user in consumers.get(frontier.pop().output[0], []):
            if user.op_type in ("QuantizeLinear", "DequantizeLinear"):
                frontier.append(user)
            else:
                into.add(user.op_type)
    return f"{node.op_type} #{index} (into {', '.join(sorted(into)) or 'the graph output'})"


def pte_op_libraries(model_path: Path) -> list[dict]:
    """The op libraries a .pte program needs (its operator table names `edgeopt::` ops): name,
    ops and the kernel source hash the device's build must match. [] for a standard-op program."""
    if Path(model_path).suffix != ".pte" or b"edgeopt::" not in Path(model_path).read_bytes():
        return []
    from edgeopt.ops import build_kernels

    return [{"name": build_kernels.LIBRARY, "ops": list(build_kernels.OPS),
             "source_sha256": _sha256(build_kernels.SOURCE)}]


def _copy_op_sources(bundle_dir: Path) -> None:
    from edgeopt.ops import build_kernels

    (bundle_dir / "ops" / "csrc").mkdir(parents=True)
    shutil.copyfile(build_kernels.__file__, bundle_dir / "ops" / "build_kernels.py")
    shutil.copyfile(build_kernels.SOURCE, bundle_dir / "ops" / "csrc" / build_kernels.SOURCE.name)


def _eval_arrays(eval_x: np.ndarray, eval_y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    x = np.asarray(eval_x)  # torch CPU tensors convert too
    if x.ndim < 2 or len(x) == 0:
        raise InputError(f"eval_x must be a non-empty batch of inputs (N, ...), got shape {x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
    if eval_y is None:
        return np.ascontiguousarray(x), None
    y = np.asarray(eval_y)
    if y.shape != (len(x),):
        raise InputError(f"eval_y must have shape ({len(x)},) to match eval_x, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"eval_y must hold integer class labels, got dtype {y.dtype}")
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
    return np.ascontiguousarray(x), y.astype(np.int64, copy=False)


def make_bundle(
    model_path: Path,
    runtime: str,
    eval_x: np.ndarray,
    eval_y: np.ndarray | None,
    out_dir: Path,
    threads: int,
    input_name: str | None = None,
    batch_size: int = 1,
    output_name: str | None = None,
    providers: list[str] | None = None,
    extra_files: Iterable[Path] = (),
    precision: str | None = None,
    labelled: bool = True,
    targets: list[tuple[np.ndarray, np.ndarray]] | None = None,
    postprocess: dict | None = None,
) -> Path:
    """Write a bundle for `model_path` to `out_dir` (replacing it) and return `out_dir`.

    `extra_files` travel next to the model (e.g. an ONNX external-data file);
    `providers` selects onnxruntime execution providers on the device (default CPU).
    `precision` is what a tensorrt bundle with an ONNX model builds its engine at
    (default: what the ONNX holds, see `check_tensorrt_onnx`); other bundles ignore it.
    `labelled=False`: `eval_y` is a placeholder (synthetic inputs), so the agent reports no accuracy.
    A detector passes `postprocess` (decode settings for `yolo_decode`) and `targets` (per image
    boxes, labels) instead of `eval_y`: the agent returns detections, the host scores them.
    """
    model_path, out_dir = Path(model_path), Path(out_dir)
    if runtime not in MODEL_SUFFIXES:
        raise unknown_name("runtime", runtime, MODEL_SUFFIXES)
    if not model_path.is_file():
        raise InputError(f"model file not found: {model_path}")
    if model_path.suffix not in MODEL_SUFFIXES[runtime]:
        raise InputError(
            f"{model_path.name}: runtime '{runtime}' expects a {'/'.join(MODEL_SUFFIXES[runtime])} file"
        )
    if threads < 1 or batch_size < 1:
        raise InputError(f"threads and batch_size must be >= 1 (got {threads}, {batch_size})")
    if runtime == "tensorrt" and model_path.suffix == ".onnx":
        precision = check_tensorrt_onnx(model_path, precision)
    else:
        precision = None
    extras = [Path(p) for p in extra_files] + _onnx_external_data(model_path)
    for extra in extras:
        if not extra.is_file():
            raise InputError(f"extra bundle file not found: {extra}")
    if (postprocess is None) == (eval_y is None) or (postprocess is not None and targets is None):
        raise InputError("a bundle needs eval_y (class labels) or postprocess + targets (detections)")
    x, y = _eval_arrays(eval_x, None if postprocess is not None else eval_y)
    op_libraries = pte_op_libraries(model_path)
    if postprocess is not None:
        if len(targets) != len(x):
            raise InputError(f"{len(targets)} target sets for {len(x)} eval inputs")
        arrays = {"x": x, "boxes": np.concatenate([np.asarray(b, np.float32).reshape(-1, 4) for b, _ in targets]),
                  "labels": np.concatenate([np.asarray(lab, np.int64).reshape(-1) for _, lab in targets]),
                  "counts": np.asarray([len(lab) for _, lab in targets], dtype=np.int64)}  # fmt: skip
    else:
        arrays = {"x": x, "y": y}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model_name = "model" + model_path.suffix
        shutil.copyfile(model_path, tmp / model_name)
        for extra in extras:
            shutil.copyfile(extra, tmp / extra.name)
        np.savez(tmp / "eval.npz", **arrays)
        shutil.copyfile(AGENT_PATH, tmp / "agent.py")
        if op_libraries:
            _copy_op_sources(tmp)
        if postprocess is not None:
            shutil.copyfile(DECODER_PATH, tmp / DECODER_PATH.name)
        model_sha, eval_sha = _sha256(tmp / model_name), _sha256(tmp / "eval.npz")
        meta = {
            "format": BUNDLE_FORMAT,
            "runtime": runtime,
            "model": model_name,
            "model_sha256": model_sha,
            "source_model": str(model_path),
            "eval": "eval.npz",
            "eval_sha256": eval_sha,
            "num_eval": len(x),
            "input_shape": list(x.shape[1:]),
            "input_name": input_name,
            "output_name": output_name,
            "batch_size": batch_size,
            "threads": threads,
            "providers": providers,
        }
        if not labelled:
            meta["labels"] = False
        if precision is not None:
            meta["precision"] = precision
        if op_libraries:
            meta["op_libraries"] = op_libraries
        if postprocess is not None:
            meta["postprocess"] = dict(postprocess)
        key = json.dumps({k: v for k, v in meta.items() if k != "source_model"}, sort_keys=True)
        meta["bundle_id"] = hashlib.sha256(key.encode()).hexdigest()[:16]
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Swap `new` into `target`; the old bundle is removed only after the swap."""
    if not target.exists():
        new.rename(target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def read_meta(bundle_dir: Path) -> dict:
    """meta.json of a bundle, or a one-line error if `bundle_dir` is not one."""
    meta_path = Path(bundle_dir) / "meta.json"
    if not meta_path.is_file():
        raise InputError(f"{bundle_dir} is not a profiler bundle (no meta.json); `edgeopt optimize` writes one to <run>/bundle")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{meta_path}: malformed JSON: {exc}") from None
    for name in (meta.get("model"), meta.get("eval"), "agent.py"):
        if not name or not (Path(bundle_dir) / name).is_file():
            raise InputError(f"{bundle_dir}: bundle is incomplete (missing {name or 'model entry'})")
    return meta
