"""Emulated results are flagged and their latency never judged (no board needed).

The agent spots qemu-user itself (an aarch64 process on an x86_64 kernel); an inventory entry
can also say `emulated: true`. Budgets, regress and the report then leave latency and memory out.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeopt.pipeline import StepResult, verdict
from edgeopt.profiler import agent
from edgeopt.profiler.inventory import INVENTORY_PATH, load_inventory
from edgeopt.profiles import Budgets, load_profile
from edgeopt.regress import compare, figures
from edgeopt.report.markdown import to_markdown
from edgeopt.report.model import build_report

QEMU_BINFMT = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\n"
X86_CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon\nflags\t\t: fpu avx2\n"
ARM_CPUINFO = "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n"


def _fake_proc(monkeypatch: pytest.MonkeyPatch, machine: str, files: dict[str, str]) -> None:
    monkeypatch.setattr(agent.platform, "machine", lambda: machine)
    monkeypatch.setattr(agent, "_read", lambda path: files.get(path))


def test_qemu_user_is_detected_from_the_kernel_arch(monkeypatch):
    _fake_proc(monkeypatch, "aarch64", {"/proc/sys/kernel/arch": "x86_64", "/proc/cpuinfo": X86_CPUINFO,
                                        "/proc/sys/fs/binfmt_misc/qemu-aarch64": QEMU_BINFMT})
    found = agent.emulation()
    assert found["guest_arch"] == "aarch64" and found["host_arch"] == "x86_64"
    assert found["emulator"] == "qemu-user (/usr/libexec/qemu-binfmt/aarch64-binfmt-P)"
    facts = agent.device_facts()
    assert facts["emulated"] == found
    assert facts["cpu_model"] == "Xeon (aarch64 emulated on a x86_64 host)"  # not passed off as the board's


def test_older_kernels_fall_back_to_the_cpuinfo_isa(monkeypatch):
    _fake_proc(monkeypatch, "aarch64", {"/proc/cpuinfo": X86_CPUINFO})
    assert agent.emulation()["host_arch"] == "x86_64"
    assert agent.emulation()["emulator"] == "a binfmt_misc emulator"


@pytest.mark.parametrize("machine,files", [
    ("aarch64", {"/proc/sys/kernel/arch": "aarch64", "/proc/cpuinfo": ARM_CPUINFO}),  # a real Pi
    ("aarch64", {"/proc/cpuinfo": ARM_CPUINFO}),  # a real Pi, older kernel
    ("x86_64", {"/proc/sys/kernel/arch": "x86_64", "/proc/cpuinfo": X86_CPUINFO}),
    ("arm64", {"/proc/sys/kernel/arch": "aarch64"}),  # aliases of one architecture
    ("aarch64", {}),  # nothing to compare with: not claimed
])
def test_native_machines_are_not_emulated(monkeypatch, machine, files):
    _fake_proc(monkeypatch, machine, files)
    assert agent.emulation() is None


def test_this_host_is_native():
    assert agent.device_facts()["emulated"] is None


def test_inventory_entry_is_declared_emulated():
    board = load_inventory(INVENTORY_PATH).get("rpi5-emulated")
    assert board.emulated and board.profile == "rpi5" and board.runner == "ssh"
    assert board.ssh_config == Path("/var/cache/edgeopt/emulated-rpi5/ssh_config")
    assert not load_inventory(INVENTORY_PATH).get("rpi5").emulated


def _steps(emulated: bool) -> list[StepResult]:
    def step(index: int, p50: float, accuracy: float) -> StepResult:
        profile = {"latency_ms": {"p50": p50, "p90": p50}, "peak_rss_mb": 900.0, "emulated": emulated}
        metrics = {"format": "tflite", "precision": "int8", "runtime": "tflite", "size_mb": 0.25,
                   "accuracy": accuracy, "profile": profile, "params": 10}
        return StepResult(index, f"s{index}", Path(f"0{index}-s"), None, metrics, False, 0.0)  # type: ignore[arg-type]

    return [step(0, 10.0, 0.98), step(1, 300.0, 0.975)]


BUDGETS = Budgets(max_latency_ms=40, max_accuracy_drop=1.0, max_model_size_mb=0.3, max_peak_memory_mb=500)


def test_emulated_latency_and_memory_are_not_held_to_budgets():
    native = verdict(_steps(False), BUDGETS)
    assert not native["max_latency_ms"]["ok"] and not native["max_peak_memory_mb"]["ok"]
    emulated = verdict(_steps(True), BUDGETS)
    assert set(emulated) == {"max_accuracy_drop", "max_model_size_mb"}  # accuracy and size are real
    assert emulated["max_accuracy_drop"]["measured"] == pytest.approx(0.5)


def test_regress_ignores_emulated_latency():
    measured = figures(_steps(True))
    assert "latency_ratio" not in measured and measured["accuracy"] == pytest.approx(97.5)
    baseline = {"accuracy": 98.0, "size_mb": 0.25, "latency_ratio": 1.0}
    checks = compare("r", load_profile("rpi5"), measured, baseline, {})
    assert [c.metric for c in checks] == ["accuracy", "size_mb"] and all(c.ok for c in checks)
    assert figures(_steps(False))["latency_ratio"] == pytest.approx(30.0)


def test_report_flags_emulated_results():
    rpi5 = load_profile("rpi5")
    report = build_report("r", rpi5, _steps(True), verdict(_steps(True), BUDGETS))
    assert report.measurement.emulated and not report.measurement.on_device and "emulated board" in report.measurement.label
    assert report.passed and "qemu-user" in to_markdown(report)
    native = build_report("r", rpi5, _steps(False), {})
    assert "emulated" not in native.measurement.label and "qemu-user" not in to_markdown(native)
