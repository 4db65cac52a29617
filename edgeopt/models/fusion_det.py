"""RGB–IR fusion detector on a VMamba (SS2D) backbone: DLRMamba's architecture, edge-sized.

    (B, 4, H, W) in [0, 1] (ch 0-2 RGB, ch 3 IR)
      -> FusionStem: pixel-level fusion, a learned per-pixel gate on each band (MEPF-like, ~1 K params)
      -> VMamba backbone (patch embed /4, stages of VSSBlocks with SS2D, downsample between stages)
      -> P3/P4/P5 (strides 8/16/32) -> FPN + PAN neck
      -> YOLOv8-style anchor-free decoupled head (separate box and class branches per level)
      -> (B, A, 4 + C) raw head tensor: A anchors over P3, P4, P5 (row-major per level);
         4 raw box distances (left, top, right, bottom), C class logits.

The graph stops at raw head tensors so every runtime (PyTorch, ONNX Runtime, LiteRT, TensorRT)
runs the same graph; `edgeopt.tasks.yolo_decode` (numpy, torch-free) decodes and runs NMS.
Box decoding: distance = softplus(raw) * stride from the anchor centre ((i + 0.5) * stride).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeopt.models import register_model
from edgeopt.models.vmamba import VSSBlock, _downsample, _init_weights, _patch_embed

STRIDES = (8, 16, 32)


class ConvBNAct(nn.Sequential):
    """Conv + BatchNorm + SiLU, YOLO's basic block (BN folds into the conv on export)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.SiLU(),
        )


class FusionStem(nn.Module):
    """Pixel-level RGB+IR fusion: each band is re-weighted per pixel by a gate computed from both.

    fused = x * (1 + tanh(gate(x))) — starts as the identity (gate initialised to zero), so the
    backbone first sees the plain 4-channel stack (SuperYOLO's pixel fusion) and learns where to
    trust which band (MEPF's idea: a tiny module in front of a single-stream backbone).
    """

    def __init__(self, in_chans: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.mix = nn.Conv2d(in_chans, hidden, 3, padding=1)
        self.act = nn.SiLU()
        self.gate = nn.Conv2d(hidden, in_chans, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 + torch.tanh(self.gate(self.act(self.mix(x)))))


class Backbone(nn.Module):
    """VMamba stages; returns the channel-first outputs of the last three stages (P3, P4, P5)."""

    def __init__(self, in_chans: int, depths: Sequence[int], dims: Sequence[int], ssm: dict[str, Any],
                 mlp_ratio: float) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError("the detector backbone needs 4 stages (strides 4, 8, 16, 32)")
        self.patch_embed = _patch_embed("v2", in_chans, dims[0], 4, True)
        self.layers = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            last = i == len(depths) - 1
            self.layers.append(nn.Sequential(OrderedDict(
                blocks=nn.Sequential(*[VSSBlock(dim, mlp_ratio, **ssm) for _ in range(depth)]),
                downsample=nn.Identity() if last else _downsample("v3", dim, dims[i + 1]),
            )))  # fmt: skip

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        features = []
        for i, layer in enumerate(self.layers):
            x = layer.blocks(x)
            if i >= 1:
                features.append(x.permute(0, 3, 1, 2))
            x = layer.downsample(x)
        return features


class Neck(nn.Module):
    """FPN top-down then PAN bottom-up, all levels at `width` channels."""

    def __init__(self, in_dims: Sequence[int], width: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(ConvBNAct(d, width, 1) for d in in_dims)
        self.top_down = nn.ModuleList(ConvBNAct(width, width, 3) for _ in in_dims[:-1])
        self.down = nn.ModuleList(ConvBNAct(width, width, 3, stride=2) for _ in in_dims[:-1])
        self.bottom_up = nn.ModuleList(ConvBNAct(width, width, 3) for _ in in_dims[:-1])

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        p = [lat(f) for lat, f in zip(self.lateral, features, strict=True)]
        for i in range(len(p) - 2, -1, -1):  # top-down: P5 -> P4 -> P3
            p[i] = self.top_down[i](p[i] + F.interpolate(p[i + 1], size=p[i].shape[-2:], mode="nearest"))
        for i in range(1, len(p)):  # bottom-up: P3 -> P4 -> P5
            p[i] = self.bottom_up[i - 1](p[i] + self.down[i - 1](p[i - 1]))
        return p


class DecoupledHead(nn.Module):
    """YOLOv8's decoupled head: per level a box branch (-> 4) and a class branch (-> C)."""

    def __init__(self, width: int, num_classes: int, levels: int = 3, prior: float = 0.01) -> None:
        super().__init__()
        self.box = nn.ModuleList(
            nn.Sequential(ConvBNAct(width, width), ConvBNAct(width, width), nn.Conv2d(width, 4, 1)) for _ in range(levels)
        )
        self.cls = nn.ModuleList(
            nn.Sequential(ConvBNAct(width, width), ConvBNAct(width, width), nn.Conv2d(width, num_classes, 1))
            for _ in range(levels)
        )
        for branch in self.cls:  # few objects per image: start every anchor at a low score
            nn.init.constant_(branch[-1].bias, -math.log((1 - prior) / prior))
        for branch in self.box:  # softplus(0.5) * stride ~ one stride from the centre
            nn.init.constant_(branch[-1].bias, 0.5)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        outs = []
        for f, box, cls in zip(features, self.box, self.cls, strict=True):
            out = torch.cat([box(f), cls(f)], dim=1)  # (B, 4 + C, h, w)
            outs.append(out.flatten(2))
        return torch.cat(outs, dim=2).transpose(1, 2)  # (B, A, 4 + C)


class FusionDetector(nn.Module):
    """RGB–IR detector: fusion stem -> VMamba backbone -> FPN/PAN -> decoupled head (raw outputs)."""

    def __init__(
        self,
        num_classes: int = 3,
        in_chans: int = 4,
        img_size: int = 256,
        depths: Sequence[int] = (1, 1, 2, 1),
        dims: Sequence[int] = (16, 32, 64, 96),
        neck_width: int = 48,
        ssm_d_state: int = 8,
        ssm_ratio: float = 2.0,
        ssm_dt_rank: int | str = "auto",
        ssm_conv: int = 3,
        ssm_conv_bias: bool = True,
        forward_type: str = "v0",
        mlp_ratio: float = 0.0,
        fusion_hidden: int = 16,
        scan_backend: str | None = None,
    ) -> None:
        super().__init__()
        if img_size % 32:
            raise ValueError(f"img_size must be a multiple of 32, got {img_size}")
        self.num_classes, self.img_size, self.strides = num_classes, img_size, STRIDES
        ssm = dict(d_state=ssm_d_state, ssm_ratio=ssm_ratio, dt_rank=ssm_dt_rank, d_conv=ssm_conv,
                   conv_bias=ssm_conv_bias, forward_type=forward_type, scan_backend=scan_backend)  # fmt: skip
        self.fusion = FusionStem(in_chans, fusion_hidden)
        self.backbone = Backbone(in_chans, depths, dims, ssm, mlp_ratio)
        self.neck = Neck(dims[1:], neck_width)
        self.head = DecoupledHead(neck_width, num_classes)
        self.backbone.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.backbone(self.fusion(x))))

    def postprocess_config(self) -> dict[str, Any]:
        """What `yolo_decode` needs to turn the raw outputs into boxes (travels in bundles)."""
        return {"img_size": self.img_size, "strides": list(self.strides), "num_classes": self.num_classes}


# --- registered configurations ---------------------------------------------------------------

RGBT_DET_CONFIG: dict[str, Any] = dict(
    num_classes=3, in_chans=4, img_size=256, depths=(1, 1, 1, 1), dims=(8, 24, 48, 64), neck_width=32,
    ssm_d_state=16, ssm_ratio=1.0, forward_type="v0", fusion_hidden=8,
)  # fmt: skip
# d_state 16 is VMamba's (and DLRMamba's) default. It makes the scan's state what Low-Rank SS2D cuts:
# truncating N halves the scan and x_proj's B/C rows before their factorization halves them again,
# so SS2D shrinks 2.66x at rank ratio 0.5 (1.91x at d_state 4, where the fixed parts dominate).


@register_model("fusion-vmamba-det")
def fusion_vmamba_det(**kwargs: Any) -> FusionDetector:
    """Fully configurable RGB–IR fusion detector; kwargs are `FusionDetector`'s."""
    return FusionDetector(**kwargs)


@register_model("rgbt-vmamba-det")
def rgbt_vmamba_det(**kwargs: Any) -> FusionDetector:
    """Edge-sized detector for 4x256x256 RGB–IR input (targets/checkpoints/rgbt-vmamba-det.safetensors)."""
    return FusionDetector(**{**RGBT_DET_CONFIG, **kwargs})
