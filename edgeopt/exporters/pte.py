"""PyTorch → ExecuTorch program (`.pte`): torch.export, XNNPACK delegation, custom scan op.

`format: pte` exports with every selective scan as one `edgeopt::selective_scan` node (run on the
device by the C++ kernel in `edgeopt/ops/csrc`, see `edgeopt.ops.build_kernels`); linear, conv and
the other standard ops go to XNNPACK partitions. `scan_op=False` keeps the portable chunked scan
(standard ops only, no op library needed). Static shapes, batch 1 unless `batch_size` says
otherwise; a tuple of example inputs exports a multi-input program (int8 takes one input, since
calibration batches feed one).
`quantize=True` quantizes the XNNPACK partitions to int8 with the PT2E XNNPACK quantizer
(symmetric per-channel weights, calibrated on `calibration` batches).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from edgeopt.exporters import EXPORTERS, ExportError
from edgeopt.exporters.onnx import describe_export_failure
from edgeopt.fileio import write_with
from edgeopt.ops.selective_scan import default_backend

INSTALL_HINT = "pip install 'edgeopt[pte]' (executorch==1.4.* with torch==2.13.0)"


@EXPORTERS.register("pte")
def export_pte(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    path: Path,
    scan_op: bool = True,
    quantize: bool = False,
    calibration: Iterable[torch.Tensor] = (),
    batch_size: int = 1,
) -> Path:
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    except ImportError as exc:
        raise ExportError(f"format 'pte' needs ExecuTorch ({exc}): {INSTALL_HINT}") from None
    if scan_op:
        import edgeopt.ops.scan_op  # noqa: F401  (defines torch.ops.edgeopt.selective_scan)
    model = model.eval()
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    if quantize and len(inputs) > 1:
        raise ExportError("int8 .pte export takes a single-input model (calibration batches feed one input)")
    if batch_size < 1 or any(len(t) < batch_size for t in inputs):
        raise ExportError(f"batch_size {batch_size}: the example input holds {len(inputs[0])} sample(s)")
    sample = tuple(t[:batch_size] for t in inputs)

    def write(tmp: Path) -> None:
        try:
            with _quiet(), torch.no_grad(), default_backend("op" if scan_op else "chunked"):
                program = torch.export.export(model, sample, strict=False)
                if quantize:
                    program = _quantize(program, sample, calibration)
                edge = to_edge_transform_and_lower(
                    program,
                    partitioner=[XnnpackPartitioner()],
                    compile_config=EdgeCompileConfig(_check_ir_validity=False),
                )
                tmp.write_bytes(edge.to_executorch().buffer)
        except Exception as exc:
            raise ExportError(describe_export_failure("ExecuTorch", model, sample[0], exc)) from exc

    return write_with(Path(path), write)


def _quantize(program, sample: tuple[torch.Tensor, ...], calibration: Iterable[torch.Tensor]):  # noqa: ANN001, ANN202
    """int8 XNNPACK partitions via PT2E: annotate, calibrate, convert, re-export."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(program.module(), quantizer)
    batches = list(calibration) or [sample[0]]
    size = len(sample[0])
    for batch in batches:
        for rows in batch.split(size):
            if len(rows) == size:  # static shapes: calibrate with whole batches
                prepared(rows)
    converted = convert_pt2e(prepared)
    return torch.export.export(converted, sample, strict=False)


def op_names(path: Path) -> list[str]:
    """What a .pte program executes, one entry per instruction: operator names (e.g.
    `edgeopt::selective_scan.out`) and `delegate:<backend>` for each delegated partition."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(Path(path).read_bytes())
    program = getattr(program, "program", program)
    plan = program.execution_plan[0]
    names = [op.name + (f".{op.overload}" if op.overload else "") for op in plan.operators]
    delegates = [f"delegate:{d.id}" for d in plan.delegates]
    calls = []
    for chain in plan.chains:
        for instruction in chain.instructions:
            args = instruction.instr_args
            if hasattr(args, "op_index"):
                calls.append(names[args.op_index])
            elif hasattr(args, "delegate_index"):
                calls.append(delegates[args.delegate_index])
    return calls


@contextlib.contextmanager
def _quiet():
    for name in ("executorch", "torch.export", "torch._export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
