"""Run a recipe for a profile: steps into `runs/<recipe>-<profile>/<NN>-<pass>/`.

Every step writes its artifact and then `manifest.json` (config, input hash,
metrics, wall time) last, so a step without a manifest is incomplete. A step
whose input hash (previous artifact's bytes + pass name + config + profile +
dataset) matches its manifest is not recomputed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.artifact import TORCH, ModelArtifact, ModelSource, save_weights
from edgeopt.data import Splits, load_dataset
from edgeopt.errors import InputError
from edgeopt.evaluate import artifact_outputs, count_params, size_mb
from edgeopt.exporters import FORMAT_RUNTIME, SUFFIX, export
from edgeopt.fileio import exclusive, write_json
from edgeopt.models import build_model, check_input_shape, resolve_factory
from edgeopt.passes import Pass, PassContext, make_pass
from edgeopt.passes.export import host_format
from edgeopt.profiles import Budgets, Profile
from edgeopt.progress import step_label
from edgeopt.recipes import Recipe
from edgeopt.stepcache import StepCache, default_cache_dir, file_sha256
from edgeopt.tasks import Task, task_for

MANIFEST = "manifest.json"
Notify = Callable[[str], None]


@dataclass
class StepResult:
    index: int
    name: str
    dir: Path
    artifact: ModelArtifact
    metrics: dict[str, Any]
    cached: bool
    wall_s: float


@dataclass
class Timing:
    """How the profiler times each artifact (warm-up, then runs and a minimum duration)."""

    warmup: int = 10
    runs: int = 50
    min_seconds: float = 1.0


@dataclass
class Pipeline:
    recipe: Recipe
    profile: Profile
    run_dir: Path
    runner: str | None = None  # None: the device's runner, or local without a device
    device: str | None = None
    timing: Timing = field(default_factory=Timing)
    notify: Notify = lambda message: None
    cache_dir: Path | None = None  # the shared step cache [default: edgeopt.stepcache.default_cache_dir()]
    _data_digest: str | None = field(default=None, init=False, repr=False)

    def run(self) -> list[StepResult]:
        passes = [make_pass(spec.name, spec.config) for spec in self.recipe.passes]  # fail before any work
        splits = load_dataset(self.recipe.dataset.name, **self.recipe.dataset.kwargs)
        self._data_digest = _splits_digest(splits)  # changed files under the same dataset kwargs miss the cache
        self.task = task_for(splits)
        with exclusive(self.run_dir):  # writable, and no other run on it (checked before any work)
            steps = [self._original(splits)]
            for index, the_pass in enumerate(passes, start=1):
                steps.append(self._step(index, the_pass, splits, steps))
            self._remove_stale_steps(steps)
            self._write_bundle(steps[-1], splits)
        return steps

    # -- steps -------------------------------------------------------------
    def _original(self, splits: Splits) -> StepResult:
        spec = self.recipe.model
        if spec.checkpoint is not None and not spec.checkpoint.is_file():
            raise InputError(f"checkpoint not found: {spec.checkpoint}")
        key = _hash(
            {
                "model": spec.model_dump(mode="json", exclude={"checkpoint"}),
                "checkpoint": _file_hash(spec.checkpoint) if spec.checkpoint else None,
                **self._data_key(),
            }
        )
        step_dir = self.run_dir / "00-original"

        def make(ctx_metrics: dict[str, Any]) -> ModelArtifact:
            model = build_model(spec.name, spec.kwargs, spec.checkpoint)
            check_input_shape(model, spec.input_shape)
            path = step_dir / "model.safetensors"
            save_weights(model, path)
            source = ModelSource(spec.name, dict(spec.kwargs))
            return ModelArtifact(TORCH, path, source, tuple(spec.input_shape), module=model)

        return self._cached_or_run(0, "original", {}, key, step_dir, splits, make)

    def _step(self, index: int, the_pass: Pass, splits: Splits, done: list[StepResult]) -> StepResult:
        name = the_pass.name
        previous = done[-1]
        config = the_pass.config.model_dump(mode="json")
        key = _hash(
            {
                "previous": previous.metrics["key"],
                "input": _file_hash(previous.artifact.path),
                "pass": name,
                "pass_code": _source_hash(type(the_pass)),
                "config": config,
                # passes that never read the profile share their output across profiles
                "profile": self.profile.model_dump(mode="json") if the_pass.uses_profile else None,
                **self._data_key(),
            }
        )
        step_dir = self.run_dir / f"{index:02d}-{name}"

        def make(ctx_metrics: dict[str, Any]) -> ModelArtifact:
            ctx = PassContext(
                splits=splits,
                profile=self.profile,
                step_dir=step_dir,
                history=[s.artifact for s in done],
                seed=self.recipe.seed,
                metrics=ctx_metrics,
            )
            return the_pass.run(previous.artifact, ctx)

        return self._cached_or_run(index, name, config, key, step_dir, splits, make)

    def _cached_or_run(
        self,
        index: int,
        name: str,
        config: dict[str, Any],
        key: str,
        step_dir: Path,
        splits: Splits,
        make: Callable[[dict[str, Any]], ModelArtifact],
    ) -> StepResult:
        """Reuse this run's step, or the shared cache's, or run the pass; then measure if needed."""
        manifest = _read_manifest(step_dir)
        measure_key = _hash(self._measure_key())
        found = None
        if manifest and manifest.get("input_hash") == key:
            artifact = ModelArtifact.from_json(manifest["artifact"])
            if _intact(artifact.path, manifest.get("artifact_sha256")):
                if manifest.get("measure_key") == measure_key:
                    self.notify(f"{step_dir.name}: unchanged, skipped")
                    return StepResult(index, name, step_dir, artifact, manifest["metrics"], True, manifest["wall_s"])
                found = artifact, manifest["metrics"]["pass"], manifest["wall_s"]
        if found is None:
            found = self._from_shared_cache(key, step_dir)
        cached = found is not None
        try:
            if found is None:
                found = self._run_pass(step_dir, make)
                self._to_shared_cache(key, step_dir, *found)
            artifact, pass_metrics, wall = found
            metrics = {"key": key, "pass": pass_metrics, **self._measure(artifact, splits, step_dir)}
        except BaseException:
            _clear_step_dir(step_dir)  # nothing half-written survives (but a pass's resume state)
            raise
        write_json(
            step_dir / MANIFEST,
            {
                "step": step_dir.name,
                "pass": name,
                "config": config,
                "input_hash": key,
                "measure_key": measure_key,
                "artifact": artifact.to_json(),
                "artifact_sha256": file_sha256(artifact.path),
                "metrics": metrics,
                "wall_s": wall,
            },
        )
        return StepResult(index, name, step_dir, artifact, metrics, cached, wall)

    def _run_pass(
        self, step_dir: Path, make: Callable[[dict[str, Any]], ModelArtifact]
    ) -> tuple[ModelArtifact, dict[str, Any], float]:
        _clear_step_dir(step_dir)
        step_dir.mkdir(parents=True, exist_ok=True)
        self.notify(f"{step_dir.name}: running")
        start = time.perf_counter()
        pass_metrics: dict[str, Any] = {}
        with step_label(step_dir.name):  # progress lines in CI logs name the step
            artifact = make(pass_metrics)
        return artifact, pass_metrics, time.perf_counter() - start

    # -- the shared, content-addressed step cache ---------------------------
    @property
    def step_cache(self) -> StepCache:
        return StepCache(self.cache_dir or default_cache_dir(), warn=self.notify)

    def _to_shared_cache(self, key: str, step_dir: Path, artifact: ModelArtifact, pass_metrics: dict[str, Any],
                         wall: float) -> None:
        self.step_cache.store(key, step_dir, artifact, pass_metrics, wall)

    def _from_shared_cache(self, key: str, step_dir: Path) -> tuple[ModelArtifact, dict[str, Any], float] | None:
        found = self.step_cache.fetch(key, step_dir)
        if found is not None:
            self.notify(f"{step_dir.name}: reused from the step cache")
        return found

    # -- measurement -------------------------------------------------------
    def _measure(self, artifact: ModelArtifact, splits: Splits, step_dir: Path) -> dict[str, Any]:
        """Accuracy and size in-process; latency and memory through the profiler.

        A PyTorch step is profiled as its fp32 export in the profile's format, so
        every step is timed by the same runtime and the ratios between steps
        (e.g. against the original's fp32 export) mean something.
        """
        task: Task = self.task
        eval_x = task.inputs(splits.eval).numpy()
        scores = task.score(artifact_outputs(artifact, eval_x, self.threads), splits.eval)
        metrics: dict[str, Any] = {
            "format": artifact.format,
            "precision": artifact.precision,
            "size_mb": size_mb(artifact.path),
            "accuracy": scores["accuracy"],  # the task's primary metric in [0, 1]
            "metric": task.metric,
            "scores": scores,
        }
        if artifact.format == TORCH:
            module = artifact.load_module()
            metrics["params"] = count_params(module)
            fmt = host_format(self.profile)
            timed = export(fmt, module, artifact.example_input(2), step_dir / "profiled" / f"model{SUFFIX[fmt]}")
            runtime = FORMAT_RUNTIME[fmt]
        else:
            timed, runtime = artifact.path, FORMAT_RUNTIME[artifact.format]
        self.notify(f"{step_dir.name}: profiling with {runtime}")
        metrics["runtime"] = runtime
        metrics["profile"] = self._profile(timed, runtime, eval_x, task.bundle_eval(splits.eval), step_dir / "profiled")
        return metrics

    def _profile(self, model: Path, runtime: str, x: np.ndarray, scoring: dict[str, Any], work_dir: Path
                 ) -> dict[str, Any]:
        from edgeopt.profiler.runners import profile_model

        return profile_model(
            model,
            runtime,
            x,
            scoring.pop("eval_y", None),
            **scoring,
            threads=self.threads,
            work_dir=work_dir,
            runner=self.runner,
            device=self.device,
            runs=self.timing.runs,
            min_seconds=self.timing.min_seconds,
            warmup=self.timing.warmup,
        )

    def _remove_stale_steps(self, steps: list[StepResult]) -> None:
        """Step directories an earlier version of the recipe left behind would mislead."""
        current = {s.dir.name for s in steps}
        for path in self.run_dir.glob("[0-9][0-9]-*"):
            if path.is_dir() and path.name not in current and (path / MANIFEST).is_file():
                shutil.rmtree(path)

    @property
    def threads(self) -> int:
        """The profile's threads; on this host (no device) at most its cores, since more
        threads than cores only measures contention."""
        if self.device is None:
            return min(self.profile.threads, os.cpu_count() or 1)
        return self.profile.threads

    def _write_bundle(self, final: StepResult, splits: Splits) -> None:
        """The deployable bundle of the final artifact, for `make deploy` / `edgeopt devices profile`."""
        if final.artifact.format == TORCH:
            shutil.rmtree(self.run_dir / "bundle", ignore_errors=True)  # never ship an older recipe's model
            return
        from edgeopt.profiler.bundle import check_tensorrt_onnx, make_bundle

        shutil.rmtree(self.run_dir / "bundle", ignore_errors=True)
        runtime = FORMAT_RUNTIME[final.artifact.format]
        if runtime == "onnxruntime" and self.profile.runtimes[0] == "tensorrt":
            try:  # the Jetson's agent builds the engine from the ONNX on the device
                check_tensorrt_onnx(final.artifact.path, final.artifact.precision)
                runtime = "tensorrt"
            except InputError as error:
                self.notify(f"bundle: runs with onnxruntime, TensorRT would refuse this model: {error}")
        scoring = self.task.bundle_eval(splits.eval)
        make_bundle(
            final.artifact.path,
            runtime,
            self.task.inputs(splits.eval).numpy(),
            scoring.pop("eval_y", None),
            self.run_dir / "bundle",
            threads=self.profile.threads,  # the bundle is for the device
            precision=final.artifact.precision if runtime == "tensorrt" else None,
            **scoring,
        )

    def _data_key(self) -> dict[str, Any]:
        return {"dataset": self.recipe.dataset.model_dump(mode="json"), "data": self._data_digest, "seed": self.recipe.seed,
                "code": code_version(), "model_code": _source_hash(resolve_factory(self.recipe.model.name)),
                "toolchain": toolchain_versions()}

    def _measure_key(self) -> dict[str, Any]:
        return {"profile": self.profile.model_dump(mode="json"), "runner": [self.runner, self.device],
                "timing": vars(self.timing)}


def budgets_for(recipe: Recipe, profile: Profile) -> Budgets:
    return profile.budgets.merged(recipe.budgets.get(profile.name))


DEVICE_ONLY_BUDGETS = ("max_latency_ms", "max_peak_memory_mb")  # meaningless under an emulator


def verdict(steps: list[StepResult], budgets: Budgets) -> dict[str, dict[str, Any]]:
    """Each budget: the measured value of the final artifact, the limit, and whether it holds.

    On an emulated board latency and memory are the emulator's, so their budgets are left out.
    """
    from edgeopt.profiler.runners import is_emulated

    first, last = steps[0].metrics, steps[-1].metrics
    emulated = is_emulated(last["profile"])
    measured = {
        "max_latency_ms": last["profile"]["latency_ms"]["p50"],
        "max_accuracy_drop": 100.0 * (first["accuracy"] - last["accuracy"]),
        "max_model_size_mb": last["size_mb"],
        "max_peak_memory_mb": last["profile"]["peak_rss_mb"],
    }
    return {
        name: {"measured": measured[name], "limit": limit, "ok": measured[name] <= limit}
        for name, limit in budgets.model_dump().items()
        if limit is not None and not (emulated and name in DEVICE_ONLY_BUDGETS)
    }


RESUME_FILE = "resume.pt"  # a pass's own checkpoint (e.g. distill), fingerprinted by the pass


def _clear_step_dir(step_dir: Path) -> None:
    """Remove a step's files, keeping a resume checkpoint so an interrupted pass continues."""
    if not step_dir.exists():
        return
    for path in step_dir.iterdir():
        if path.name == RESUME_FILE:
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if not any(step_dir.iterdir()):
        step_dir.rmdir()


@functools.cache
def code_version() -> str:
    """Hash of edgeopt's own source: a changed pass implementation invalidates cached steps."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def toolchain_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "onnx", "onnxruntime", "onnxscript", "litert-torch", "ai-edge-litert", "ai-edge-quantizer"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def _source_hash(obj: Any) -> str | None:
    """Hash of the file defining `obj` (a user's `module:factory` or a plugin pass)."""
    import inspect

    try:
        return _file_hash(Path(inspect.getsourcefile(obj)))
    except (TypeError, OSError):
        return None


def _splits_digest(splits: Any) -> str:
    """Hash of every split's samples and labels (classification: x, y; detection: images, boxes,
    labels): a user's image folder or `module:factory` data can change while the recipe stays the same."""
    digest = hashlib.sha256()
    for split in (splits.train, splits.calib, splits.eval):
        arrays = (split.x, split.y) if hasattr(split, "x") else (split.images, *split.boxes, *split.labels)
        for array in arrays:
            array = np.ascontiguousarray(array.numpy() if hasattr(array, "numpy") else array)
            digest.update(str((array.shape, array.dtype)).encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def _read_manifest(step_dir: Path) -> dict[str, Any] | None:
    """The step's manifest; a damaged one counts as absent (the step is then redone)."""
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
        ModelArtifact.from_json(manifest["artifact"])
        manifest["metrics"], manifest["wall_s"]  # noqa: B018
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _intact(path: Path, sha256: str | None) -> bool:
    """The step's artifact exists and (when its manifest recorded one) matches its checksum."""
    return path.is_file() and (sha256 is None or file_sha256(path) == sha256)


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]
