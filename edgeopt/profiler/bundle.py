"""A bundle is everything the device needs to profile one model, in one directory.

    model.<onnx|tflite|engine>   the artifact
    eval.npz                     x (inputs) and y (integer labels) of the eval split
    meta.json                    runtime, threads, batch size, tensor names, ids
    agent.py                     the device-side agent (stdlib + numpy + runtime)

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
MODEL_SUFFIXES = {"onnxruntime": (".onnx",), "tflite": (".tflite",), "tensorrt": (".engine", ".plan", ".trt")}
BUNDLE_FORMAT = 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _onnx_external_data(model_path: Path, runtime: str) -> list[Path]:
    """Files an ONNX model keeps its weights in (e.g. `model.onnx.data`); they must travel with it."""
    if runtime != "onnxruntime":
        return []
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a corrupt file
        raise InputError(f"{model_path}: not a readable ONNX model ({exc})") from None
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


def _eval_arrays(eval_x: np.ndarray, eval_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(eval_x), np.asarray(eval_y)  # torch CPU tensors convert too
    if x.ndim < 2 or len(x) == 0:
        raise InputError(f"eval_x must be a non-empty batch of inputs (N, ...), got shape {x.shape}")
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
    eval_y: np.ndarray,
    out_dir: Path,
    threads: int,
    input_name: str | None = None,
    batch_size: int = 1,
    output_name: str | None = None,
    providers: list[str] | None = None,
    extra_files: Iterable[Path] = (),
) -> Path:
    """Write a bundle for `model_path` to `out_dir` (replacing it) and return `out_dir`.

    `extra_files` travel next to the model (e.g. an ONNX external-data file);
    `providers` selects onnxruntime execution providers on the device (default CPU).
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
    extras = [Path(p) for p in extra_files] + _onnx_external_data(model_path, runtime)
    for extra in extras:
        if not extra.is_file():
            raise InputError(f"extra bundle file not found: {extra}")
    x, y = _eval_arrays(eval_x, eval_y)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model_name = "model" + model_path.suffix
        shutil.copyfile(model_path, tmp / model_name)
        for extra in extras:
            shutil.copyfile(extra, tmp / extra.name)
        np.savez(tmp / "eval.npz", x=x, y=y)
        shutil.copyfile(AGENT_PATH, tmp / "agent.py")
        model_sha, eval_sha = _sha256(tmp / model_name), _sha256(tmp / "eval.npz")
        meta = {
            "format": BUNDLE_FORMAT,
            "runtime": runtime,
            "model": model_name,
            "model_sha256": model_sha,
            "source_model": str(model_path),
            "eval": "eval.npz",
            "eval_sha256": eval_sha,
            "num_eval": len(y),
            "input_shape": list(x.shape[1:]),
            "input_name": input_name,
            "output_name": output_name,
            "batch_size": batch_size,
            "threads": threads,
            "providers": providers,
        }
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
        raise InputError(f"{bundle_dir} is not a profiler bundle (no meta.json); write one with make_bundle")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{meta_path}: malformed JSON: {exc}") from None
    for name in (meta.get("model"), meta.get("eval"), "agent.py"):
        if not name or not (Path(bundle_dir) / name).is_file():
            raise InputError(f"{bundle_dir}: bundle is incomplete (missing {name or 'model entry'})")
    return meta
