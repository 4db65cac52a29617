"""The deployable scan: C++ kernel vs the reference loop, `.pte` export with one scan node per SS2D,
a .pte bundle in the profiler agent (parity, missing op library), and the standard-op graphs
without the op library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("executorch.extension.pybindings.portable_lib")

from edgeopt.evaluate import parity, run_onnx, run_pte  # noqa: E402
from edgeopt.exporters import export  # noqa: E402
from edgeopt.exporters.pte import op_names  # noqa: E402
from edgeopt.models.ss2d import SS2D  # noqa: E402
from edgeopt.ops import build_kernels  # noqa: E402
from edgeopt.ops.selective_scan import default_backend, selective_scan  # noqa: E402
from edgeopt.profiler.bundle import make_bundle  # noqa: E402

SCAN = "edgeopt::selective_scan.out"


@pytest.fixture(scope="module")
def kernel_library():
    """The op library as `make setup` builds it (a no-op when it is up to date)."""
    return build_kernels.build()


def scan_inputs(batch, dim, length, nstate, groups, with_z, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(batch, dim, length, generator=g),
        delta=torch.randn(batch, dim, length, generator=g) * 0.5,
        A=-torch.exp(torch.randn(dim, nstate, generator=g)),
        B=torch.randn(batch, groups, nstate, length, generator=g) if groups else torch.randn(batch, nstate, length),
        C=torch.randn(batch, groups, nstate, length, generator=g) if groups else torch.randn(batch, nstate, length),
        D=torch.randn(dim, generator=g),
        z=torch.randn(batch, dim, length, generator=g) if with_z else None,
        delta_bias=torch.randn(dim, generator=g) - 2 if with_bias else None,
    )


@pytest.mark.parametrize(
    "batch, dim, length, nstate, groups, with_z, with_bias",
    [
        (2, 8, 37, 16, 4, True, True),  # VMamba v0: N = 16, B/C grouped per direction, z, delta_bias
        (1, 12, 50, 1, 3, False, True),  # vmamba_tiny_s1l8: N = 1, no z
        (2, 6, 23, 5, 0, True, False),  # ungrouped (B, N, L), an N with no specialised path
        (1, 40, 1, 16, 2, False, False),  # one token, channel count over one work block
        (1, 4, 4000, 16, 1, True, True),  # long L: the state carries over thousands of steps
        (1, 4, 4000, 1, 2, False, True),
        (2, 44, 300, 1, 2, True, True),  # N = 1 with z and batch 2
    ],
)
def test_cpp_kernel_matches_reference_loop(kernel_library, batch, dim, length, nstate, groups, with_z, with_bias):
    from edgeopt.ops.scan_op import cpp_selective_scan

    x = scan_inputs(batch, dim, length, nstate, groups, with_z, with_bias)
    want = selective_scan(**x, delta_softplus=True, backend="reference")
    got = cpp_selective_scan(**x, delta_softplus=True)
    assert got.shape == want.shape
    assert rel_error(got, want) <= 1e-5
    # without softplus, delta (kept positive, so the scan stays stable) is used as given
    x["delta"], x["delta_bias"] = x["delta"].abs(), None
    want = selective_scan(**x, delta_softplus=False, backend="reference")
    assert rel_error(cpp_selective_scan(**x), want) <= 1e-5


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_scan_op_is_one_export_node_with_eager_semantics():
    import edgeopt.ops.scan_op  # noqa: F401

    torch.manual_seed(0)
    block = SS2D(d_model=8, d_state=4).eval()
    x = torch.randn(1, 5, 6, 8)
    with torch.no_grad(), default_backend("op"):
        program = torch.export.export(block, (x,))
        eager_op = block(x)  # the op's PyTorch implementation
    targets = Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")
    assert targets["edgeopt.selective_scan.default"] == 1
    with torch.no_grad():
        want = block(x)
        assert (program.module()(x) - want).abs().max() <= 1e-5 * want.abs().max()
    assert (eager_op - want).abs().max() <= 1e-5 * want.abs().max()
    with pytest.raises(ValueError, match="hidden states"), default_backend("op"):
        block(x, return_states=True)


class TinySS2DNet(nn.Module):
    """Two SS2D blocks (v0 with N = 16, v05_noz with N = 1) and a 10-way head: export-test sized."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 4, stride=4)
        self.v0 = SS2D(d_model=16, d_state=16, forward_type="v0")
        self.noz = SS2D(d_model=16, d_state=1, ssm_ratio=1.0, forward_type="v05_noz", conv_bias=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).permute(0, 2, 3, 1)
        h = h + self.v0(h)
        h = h + self.noz(h)
        return self.head(h.mean((1, 2)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, kernel_library):
    """The net, eval inputs labelled by its own eager top-1, and its .pte export (scan op)."""
    torch.manual_seed(0)
    model = TinySS2DNet().eval()
    x = torch.randn(6, 1, 16, 16)
    with torch.no_grad():
        want = model(x).numpy()
    out = tmp_path_factory.mktemp("pte")
    custom = export("pte", model, x, out / "custom.pte")
    return model, x.numpy(), want, custom, out


def test_pte_export_holds_one_scan_node_per_ss2d_and_matches_eager(tiny):
    model, x, want, custom, _ = tiny
    assert Counter(op_names(custom))[SCAN] == 2
    check = parity(want, run_pte(custom, x))
    assert check["max_rel"] <= 1e-4 and check["top1_agreement"] == 1.0


def run_agent(bundle, env=None):
    result = subprocess.run([sys.executable, str(bundle / "agent.py"), str(bundle), "--runs", "3", "--min-seconds",
                             "0", "--warmup", "1"], capture_output=True, text=True, env=env, timeout=300)
    return result.returncode, json.loads(result.stdout.strip().splitlines()[-1])


def test_pte_bundle_runs_in_agent_with_parity(tiny):
    _, x, want, custom, out = tiny
    bundle = make_bundle(custom, "executorch", x, want.argmax(1), out / "bundle", threads=2)
    meta = json.loads((bundle / "meta.json").read_text())
    assert [lib["name"] for lib in meta["op_libraries"]] == [build_kernels.LIBRARY]
    assert (bundle / "ops" / "build_kernels.py").is_file() and (bundle / "ops" / "csrc" / "selective_scan.cpp").is_file()
    code, result = run_agent(bundle)
    assert code == 0, result
    assert result["runtime"] == "executorch" and result["runs"] >= 3
    assert result["accuracy"]["top1"] == 1.0  # labels are eager's top-1: the device run agrees on every sample
    assert result["latency_ms"]["p50"] > 0 and result["peak_rss_mb"] > 0
    assert result["device"]["op_libraries"][build_kernels.LIBRARY]["usable"] is True


def test_missing_op_library_is_one_line_naming_the_build(tiny, tmp_path):
    _, x, want, custom, out = tiny
    bundle = make_bundle(custom, "executorch", x, want.argmax(1), out / "bundle-missing", threads=1)
    env = dict(os.environ, HOME=str(tmp_path), EDGEOPT_OPS_DIR=str(tmp_path / "empty"))
    code, result = run_agent(bundle, env)
    assert code == 3 and result["kind"] == "missing_op_library"
    assert "edgeopt_ops" in result["error"] and "build_kernels.py" in result["error"] and "\n" not in result["error"]


def test_standard_op_onnx_graph_needs_no_op_library(tiny):
    """The portable default: ONNX export holds no custom op and matches eager."""
    import onnx

    model, x, want, _, out = tiny
    path = export("onnx", model, torch.from_numpy(x), out / "model.onnx")
    assert not {n.domain for n in onnx.load(str(path)).graph.node} - {"", "ai.onnx"}
    check = parity(want, run_onnx(path, x))
    assert check["max_rel"] <= 1e-4 and check["top1_agreement"] == 1.0


def test_stale_library_is_not_used(tmp_path, kernel_library):
    """A library built for another executorch (or from another source) is ignored, not loaded."""
    import shutil

    for name in (build_kernels.library_name(), f"{build_kernels.LIBRARY}.json"):
        shutil.copyfile(kernel_library.with_name(name), tmp_path / name)
    assert build_kernels.find_library(tmp_path) == tmp_path / build_kernels.library_name()
    stamp = json.loads((tmp_path / f"{build_kernels.LIBRARY}.json").read_text())
    (tmp_path / f"{build_kernels.LIBRARY}.json").write_text(json.dumps(dict(stamp, executorch="1.3.0")))
    assert build_kernels.find_library(tmp_path) is None


def test_default_backend_rejects_unknown_name():
    with pytest.raises(Exception, match="selective-scan backend"), default_backend("nope"):
        pass


def test_kernel_library_rejects_bad_shapes(kernel_library):
    from edgeopt.ops.scan_op import cpp_selective_scan

    x = scan_inputs(1, 6, 10, 4, 4, False, False)  # 6 channels do not split into 4 groups
    with pytest.raises(ValueError, match="rejected shapes"):
        cpp_selective_scan(**x)
    assert np.isfinite(cpp_selective_scan(**scan_inputs(1, 8, 10, 4, 4, False, False)).numpy()).all()


class FourInputScan(nn.Module):
    """The bare scan with its four activations as program inputs (the isolated-scan benchmark's program)."""

    def __init__(self, dim: int, nstate: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.A = nn.Parameter(-torch.exp(torch.randn(dim, nstate, generator=g)))
        self.D, self.bias = nn.Parameter(torch.randn(dim, generator=g)), nn.Parameter(torch.randn(dim, generator=g) - 2)

    def forward(self, u, delta, B, C):  # noqa: ANN001, ANN201
        return selective_scan(u, delta, self.A, B, C, self.D, delta_bias=self.bias, delta_softplus=True)


@pytest.mark.parametrize("nstate", [16, 1])
def test_multi_input_pte_is_one_scan_node_matching_the_reference(tmp_path, kernel_library, nstate):
    from executorch.extension.pybindings import portable_lib

    from edgeopt.exporters.pte import export_pte
    from edgeopt.ops.scan_op import load_library

    x = scan_inputs(1, 16, 300, nstate, 4, False, False)
    inputs = (x["u"], x["delta"], x["B"], x["C"])
    scan = FourInputScan(16, nstate).eval()
    path = export_pte(scan, inputs, tmp_path / "scan.pte")
    assert op_names(path) == [SCAN]
    load_library()
    got = portable_lib._load_for_executorch(str(path)).forward(inputs)[0]
    with torch.no_grad():
        want = selective_scan(*inputs[:2], scan.A, *inputs[2:], scan.D, delta_bias=scan.bias, delta_softplus=True,
                              backend="reference")
    assert rel_error(got, want) <= 1e-5


def test_int8_pte_bundle_keeps_accuracy_in_agent(tmp_path, kernel_library):
    """digits-vmamba (trained) as an int8 .pte: the agent's top-1 on 200 eval samples stays within
    2 points of eager fp32 (98%+), the scan stays one float op with no q/dq outside XNNPACK, the file shrinks."""
    from pathlib import Path

    from edgeopt.data import load_dataset
    from edgeopt.exporters.pte import export_pte
    from edgeopt.models import build_model

    model = build_model("digits-vmamba", checkpoint=Path("targets/checkpoints/digits-vmamba.safetensors")).eval()
    splits = load_dataset("digits", size=32)
    x, y = splits.eval.x[:200].float(), splits.eval.y[:200].numpy()
    with torch.no_grad():
        eager_top1 = float((model(x).argmax(1).numpy() == y).mean())
    fp32 = export_pte(model, x, tmp_path / "fp32.pte")
    int8 = export_pte(model, x, tmp_path / "int8.pte", quantize=True, calibration=[splits.calib.x[:64].float()])
    ops = op_names(int8)
    assert Counter(ops)[SCAN] == 2 and not [op for op in ops if "quantize" in op]
    assert int8.stat().st_size <= 0.8 * fp32.stat().st_size
    code, result = run_agent(make_bundle(int8, "executorch", x.numpy(), y, tmp_path / "bundle", threads=1))
    assert code == 0, result
    assert eager_top1 >= 0.97 and result["accuracy"]["top1"] >= eager_top1 - 0.02, (eager_top1, result["accuracy"])


@pytest.mark.parametrize("nstate, groups", [(16, 4), (1, 4), (5, 3)])
def test_reverse_half_scans_the_back_groups_backwards(kernel_library, nstate, groups):
    """`reverse_half` = the scan of the back half's flipped sequences, flipped back: in the C++
    kernel and in the op's PyTorch implementation."""
    from edgeopt.ops.scan_op import cpp_selective_scan

    x = scan_inputs(2, 20 * groups, 257, nstate, groups, True, True)
    gsplit = (groups + 1) // 2
    csplit = x["u"].shape[1] // groups * gsplit

    def flip(t, split):
        return torch.cat([t[:, :split], t[:, split:].flip(-1)], dim=1)

    flipped = dict(x, **{k: flip(x[k], csplit) for k in ("u", "delta", "z")},
                   **{k: flip(x[k], gsplit) for k in ("B", "C")})
    want = flip(selective_scan(**flipped, delta_softplus=True, backend="reference"), csplit)
    assert rel_error(cpp_selective_scan(**x, delta_softplus=True, reverse_half=True), want) <= 1e-5
    assert rel_error(torch.ops.edgeopt.selective_scan(*x.values(), delta_softplus=True, reverse_half=True), want) <= 1e-5


def test_ss2d_op_graph_has_no_flips_and_matches_the_cross_scan():
    """Under the op backend SS2D scans the reversed directions inside the op: same output as the
    flip-based cross-scan, and its exported graph holds no flip or expand (broadcast) copies."""
    torch.manual_seed(0)
    block = SS2D(d_model=16, d_state=16, forward_type="v0").eval()
    x = torch.randn(1, 5, 7, 16)
    with torch.no_grad():
        want = block(x)
        with default_backend("op"):
            got = block(x)
            program = torch.export.export(block, (x,), strict=False)
    assert rel_error(got, want) <= 1e-5
    targets = Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")
    assert not [t for t in targets if "flip" in t or "expand" in t or "matmul" in t], targets
    assert sum(v for t, v in targets.items() if "selective_scan" in t) == 1
