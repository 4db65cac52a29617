"""Build edgeopt's ExecuTorch op library (`edgeopt::selective_scan.out`) from source with g++.

    python -m edgeopt.ops.build_kernels [--out DIR] [--force]     (make setup runs this)
    python build_kernels.py --source selective_scan.cpp             (a bundle's copy, on a device)

The library is compiled against the installed executorch wheel's headers and linked to its
pybindings library (`_portable_lib`), so it only loads into that exact executorch (and the torch it
was built with): a stamp file next to the library records both versions and the source hash, and
`find_library` accepts a library only when the stamp matches what is installed. Nothing prebuilt is
downloaded. Stdlib only (no torch, no edgeopt import): a bundle carries this file next to the
kernel source so a board can build the library itself (devices/setup-rpi-os.sh does).
Hand-written because the wheel ships headers but no build helper for out-of-tree kernels.
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
INSTALL_HINT = "pip install 'executorch==1.4.*' torch==2.13.0 (and a C++ compiler: apt install g++)"
# no -ffast-math: it would let the compiler drop NaN/inf handling; these allow vectorized sums
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility-inlines-hidden", "-fno-math-errno",
         "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math", "-ffp-contract=fast",
         "-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_USE_THREADPOOL"]


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


def build(directory: Path | None = None, source: Path = SOURCE, force: bool = False) -> Path:
    """Compile the library into `directory` (atomically) unless an up-to-date one is there."""
    directory = Path(directory or default_dir())
    if not force and (found := find_library(directory, source)) is not None:
        return found
    stamp = expected_stamp(source)
    portable = portable_lib_path()
    include = portable.parents[2] / "include"  # site-packages/executorch/include
    if not (include / "executorch").is_dir():
        raise BuildError(f"the executorch wheel at {portable.parents[2]} has no C++ headers (include/)")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{LIBRARY}.", suffix=".so.tmp", dir=directory)
    os.close(fd)
    base = [compiler(), *FLAGS, f"-I{include}", f"-I{include / 'executorch/runtime/core/portable_type/c10'}",
            str(source), str(portable), f"-Wl,-rpath,{portable.parent}", "-o", tmp]
    try:
        for arch in (["-march=native"], []):  # native first: built on the machine that runs it
            result = subprocess.run(base[:1] + arch + base[1:], capture_output=True, text=True)
            if result.returncode == 0:
                break
        else:
            raise BuildError(f"compiling {source.name} failed:\n{result.stderr[-3000:]}")
        os.replace(tmp, directory / library_name())
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    stamp["flags"] = FLAGS + arch
    stamp_tmp = directory / f".{LIBRARY}.json.tmp"
    stamp_tmp.write_text(json.dumps(stamp, indent=2) + "\n")
    os.replace(stamp_tmp, directory / f"{LIBRARY}.json")
    return directory / library_name()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build edgeopt's ExecuTorch op library from source (g++).")
    parser.add_argument("--out", type=Path, default=None, help=f"output directory (default {default_dir()})")
    parser.add_argument("--source", type=Path, default=SOURCE, help="kernel source (default: the package's)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date library exists")
    args = parser.parse_args(argv)
    try:
        path = build(args.out, args.source, args.force)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
