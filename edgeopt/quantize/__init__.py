"""Post-training quantization through the runtimes' own toolchains.

`onnx_quant` (onnxruntime.quantization + its float16 converter), `tflite_quant`
(ai-edge-quantizer recipes on the fp32 .tflite), `sensitivity` (per-layer
mixed precision) and `parity` (per-precision acceptance of a quantized file).
Layers are named by their PyTorch module path ("features.0", "head.fc") in
every format, so a report and a `keep_float` list mean the same thing everywhere.
"""

from __future__ import annotations

from torch import nn

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def quantizable_layers(model: nn.Module) -> list[str]:
    """Module paths of the weight layers a quantizer turns into int8 kernels, in definition order:
    linear/conv layers, and modules that hold a matrix parameter themselves (SS2D's `x_proj_weight`)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, QUANTIZABLE) or any(p.ndim >= 2 for p in module.parameters(recurse=False))
    ]
