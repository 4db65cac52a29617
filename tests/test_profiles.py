"""The profile schema accepts the shipped profiles and names the bad field in a bad one."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeopt.errors import InputError
from edgeopt.profiles import load_profile, load_profile_file, profile_paths

GOOD = """\
name: {name}
description: test board
arch: aarch64
cpu: {{model: Cortex-A76, cores: 4}}
memory_mb: 8192
runtimes: [tflite, onnxruntime]
threads: 4
budgets: {{max_latency_ms: 20}}
"""


def test_shipped_profiles_validate():
    names = set(profile_paths())
    assert {"rpi5", "jetson-orin-nano", "jetson-agx-orin", "x86-cpu"} <= names
    for name in names:
        profile = load_profile(name)
        assert profile.threads <= profile.cpu.cores
    rpi5 = load_profile("rpi5")
    assert rpi5.runtimes[:2] == ["executorch", "tflite"] and rpi5.cpu.cores == 4 and rpi5.arch == "aarch64"
    assert load_profile("jetson-orin-nano").accelerator.kind == "ampere-gpu"


def test_good_file(tmp_path: Path):
    path = tmp_path / "board.yaml"
    path.write_text(GOOD.format(name="board"))
    profile = load_profile_file(path)
    assert profile.budgets.max_latency_ms == 20 and profile.budgets.max_accuracy_drop is None


@pytest.mark.parametrize(
    "change, field",
    [
        (("arch: aarch64", "arch: riscv"), "arch"),
        (("cores: 4", "cores: 0"), "cpu.cores"),
        (("runtimes: [tflite, onnxruntime]", "runtimes: [coreml]"), "runtimes.0"),
        (("threads: 4", "threads: 4\ncolour: red"), "colour"),
        (("max_latency_ms: 20", "max_latency_ms: -1"), "budgets.max_latency_ms"),
    ],
)
def test_bad_field_is_named(tmp_path: Path, change, field):
    path = tmp_path / "board.yaml"
    path.write_text(GOOD.format(name="board").replace(*change))
    with pytest.raises(InputError, match=rf"field '{field}'"):
        load_profile_file(path)


def test_malformed_yaml_and_unknown_name(tmp_path: Path):
    path = tmp_path / "board.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(InputError, match="malformed YAML.*line"):
        load_profile_file(path)
    with pytest.raises(InputError, match="did you mean 'rpi5'"):
        load_profile("rpi6")
