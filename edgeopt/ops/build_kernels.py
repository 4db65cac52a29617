"""Build edgeopt's native libraries from source with g++: the ExecuTorch op library
(`edgeopt::selective_scan.out`) and the MoE expert kernels (`libedgeopt_moe.so`, plain C ABI).

    python -m edgeopt.ops.build_kernels [--out DIR] [--force]     (make setup runs this: both)
    python build_kernels.py --source selective_scan.cpp             (a bundle's copy, on a device)

The library is compiled against the installed executorch wheel's headers and linked to its
pybindings library (`_portable_lib`), so it only loads into that exact executorch (and the torch it
was built with): a stamp file next to the library records both versions and the source hash, and
`find_library` accepts a library only when the stamp matches what is installed. Nothing prebuilt is
downloaded. Stdlib only (no torch, no edgeopt import): a bundle carries this file next to the
kernel source so a board can build the library itself (devices/setup-rpi-os.sh does).
Hand-written because the wheel ships headers but no build helper for out-of-tree kernels.
The MoE library needs no executorch or torch (loaded with ctypes): its stamp records only the machine
and the source hash.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

LIBRARY = "edgeopt_ops"
OPS = ("edgeopt::selective_scan.out",)
SOURCE = Path(__file__).with_name("csrc") / "selective_scan.cpp"
MOE_LIBRARY = "edgeopt_moe"
MOE_SOURCE = Path(__file__).with_name("csrc") / "moe_experts.cpp"
INSTALL_HINT = "pip install 'executorch==1.4.*' torch==2.13.0 (and a C++ compiler: apt install g++)"
# no -ffast-math: it would let the compiler drop NaN/inf handling; these allow vectorized sums
BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility-inlines-hidden", "-fno-math-errno",
              "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math", "-ffp-contract=fast"]
FLAGS = [*BASE_FLAGS, "-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_USE_THREADPOOL"]


class BuildError(RuntimeError):
    """The op library cannot be built here (no executorch, no compiler, compile error)."""


def default_dir() -> Path:
    """Where libraries are built and looked for: $EDGEOPT_OPS_DIR, else ~/.cache/edgeopt/ops."""
    env = os.environ.get("EDGEOPT_OPS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "edgeopt" / "ops"


def library_name() -> str:
    return f"lib{LIBRARY}.so"


def portable_lib_path() -> Path:
    """The executorch pybindings extension the library links to (found without importing it)."""
    spec = importlib.util.find_spec("executorch.extension.pybindings._portable_lib")
    if spec is None or not spec.origin:
        raise BuildError(f"executorch is not installed for {sys.executable}: {INSTALL_HINT}")
    return Path(spec.origin)


def expected_stamp(source: Path = SOURCE) -> dict:
    """What a usable library must have been built from and for."""
    versions = {}
    for name in ("executorch", "torch"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise BuildError(f"{name} is not installed for {sys.executable}: {INSTALL_HINT}") from None
    return {"library": LIBRARY, "ops": list(OPS), "machine": platform.machine(),
            "source_sha256": hashlib.sha256(Path(source).read_bytes()).hexdigest(), **versions}


def find_library(directory: Path | None = None, source: Path = SOURCE) -> Path | None:
    """The built library in `directory` if its stamp matches the installed executorch/torch and
    the source; else None."""
    directory = Path(directory or default_dir())
    lib, stamp = directory / library_name(), directory / f"{LIBRARY}.json"
    if not (lib.is_file() and stamp.is_file()):
        return None
    try:
        recorded = json.loads(stamp.read_text())
        want = expected_stamp(source)
    except (OSError, ValueError, BuildError):
        return None
    return lib if all(recorded.get(k) == v for k, v in want.items()) else None


def compiler() -> str:
    exe = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not exe:
        raise BuildError("no C++ compiler found (apt install g++, or set CXX)")
    return exe


def _compile(name: str, directory: Path, args: list[str], source: Path) -> list[str]:
    """g++ `args` into directory/lib{name}.so atomically (-march=native first: built on the machine that
    runs it); returns the architecture flags that worked."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".so.tmp", dir=directory)
    os.close(fd)
    try:
        for arch in (["-march=native"], []):
            result = subprocess.run([compiler(), *arch, *args, "-o", tmp], capture_output=True, text=True)
            if result.returncode == 0:
                break
        else:
            raise BuildError(f"compiling {source.name} failed:\n{result.stderr[-3000:]}")
        os.replace(tmp, directory / f"lib{name}.so")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return arch


def _write_stamp(directory: Path, name: str, stamp: dict) -> None:
    tmp = directory / f".{name}.json.tmp"
    tmp.write_text(json.dumps(stamp, indent=2) + "\n")
    os.replace(tmp, directory / f"{name}.json")


def build(directory: Path | None = None, source: Path = SOURCE, force: bool = False) -> Path:
    """Compile the ExecuTorch op library into `directory` (atomically) unless an up-to-date one is there."""
    directory = Path(directory or default_dir())
    if not force and (found := find_library(directory, source)) is not None:
        return found
    stamp = expected_stamp(source)
    portable = portable_lib_path()
    include = portable.parents[2] / "include"  # site-packages/executorch/include
    if not (include / "executorch").is_dir():
        raise BuildError(f"the executorch wheel at {portable.parents[2]} has no C++ headers (include/)")
    arch = _compile(LIBRARY, directory, [*FLAGS, f"-I{include}", f"-I{include / 'executorch/runtime/core/portable_type/c10'}",
                                         str(source), str(portable), f"-Wl,-rpath,{portable.parent}"], source)
    _write_stamp(directory, LIBRARY, {**stamp, "flags": FLAGS + arch})
    return directory / library_name()


def moe_stamp(source: Path = MOE_SOURCE) -> dict:
    return {"library": MOE_LIBRARY, "machine": platform.machine(),
            "source_sha256": hashlib.sha256(Path(source).read_bytes()).hexdigest()}


def find_moe_library(directory: Path | None = None, source: Path = MOE_SOURCE) -> Path | None:
    """The built MoE kernel library in `directory` if it was built from this source on this kind of machine."""
    directory = Path(directory or default_dir())
    lib, stamp = directory / f"lib{MOE_LIBRARY}.so", directory / f"{MOE_LIBRARY}.json"
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    return lib if lib.is_file() and all(recorded.get(k) == v for k, v in moe_stamp(source).items()) else None


def build_moe(directory: Path | None = None, source: Path = MOE_SOURCE, force: bool = False) -> Path:
    """Compile the MoE expert kernels (no dependencies) unless an up-to-date library is there."""
    directory = Path(directory or default_dir())
    if not force and (found := find_moe_library(directory, source)) is not None:
        return found
    arch = _compile(MOE_LIBRARY, directory, [*BASE_FLAGS, str(source)], source)
    _write_stamp(directory, MOE_LIBRARY, {**moe_stamp(source), "flags": BASE_FLAGS + arch})
    return directory / f"lib{MOE_LIBRARY}.so"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build edgeopt's ExecuTorch op library and MoE kernels from source (g++).")
    parser.add_argument("--out", type=Path, default=None, help=f"output directory (default {default_dir()})")
    parser.add_argument("--source", type=Path, default=SOURCE, help="kernel source (default: the package's)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date library exists")
    args = parser.parse_args(argv)
    try:
        paths = [build(args.out, args.source, args.force)]
        if args.source == SOURCE and MOE_SOURCE.is_file():  # a bundle carries only the op library's source
            paths.append(build_moe(args.out, force=args.force))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
