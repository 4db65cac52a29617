"""VMamba image classifier whose state_dict matches the public VMamba checkpoints.

Module nesting follows VMamba's current `VSSM`: `patch_embed.{0,2[,5,7]}`,
`layers.i.blocks.j.{norm,op,norm2,mlp}`, `layers.i.downsample`, `classifier.{norm,head}`.
Checkpoints saved by VMamba's first release (`patch_embed.proj`, `ln_1`, `self_attention`,
top-level `norm` / `head`) are renamed on load by `convert_state_dict`, as VMamba itself does.
Activations stay channel-last (B, H, W, C) throughout, which has the same parameters as
VMamba's channel-first ("ln2d") variant; `x -> logits` takes NCHW images like any classifier.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from edgeopt.models import register_model
from edgeopt.models.ss2d import SS2D


class Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class PatchMerging2D(nn.Module):
    """VMamba's "v1" downsample: 2x2 neighbours concatenated, normed, projected."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1], x.shape[2]
        if H % 2 or W % 2:
            x = nn.functional.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VSSBlock(nn.Module):
    """x + SS2D(LN(x)), then x + MLP(LN(x)) when mlp_ratio > 0."""

    def __init__(self, dim: int, mlp_ratio: float, **ssm: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(d_model=dim, **ssm)
        if mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.op(self.norm(x))
        if hasattr(self, "mlp"):
            x = x + self.mlp(self.norm2(x))
        return x


class GlobalAvgPool(nn.Module):
    """(B, H, W, C) -> (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2))


class VMamba(nn.Module):
    """VMamba (VSSM) classifier; see the factories below for the published configurations."""

    def __init__(
        self,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (2, 2, 9, 2),
        dims: int | Sequence[int] = 96,
        ssm_d_state: int = 16,
        ssm_ratio: float = 2.0,
        ssm_dt_rank: int | str = "auto",
        ssm_conv: int = 3,
        ssm_conv_bias: bool = True,
        forward_type: str = "v0",
        mlp_ratio: float = 0.0,
        patchembed_version: str = "v1",
        downsample_version: str = "v1",
        patch_norm: bool = True,
        scan_backend: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(dims, int):
            dims = [dims * 2**i for i in range(len(depths))]
        dims = list(dims)
        if len(dims) != len(depths):
            raise ValueError(f"VMamba: {len(dims)} dims for {len(depths)} stages")
        self.num_features = dims[-1]
        self.patch_embed = _patch_embed(patchembed_version, in_chans, dims[0], patch_size, patch_norm)
        ssm = dict(
            d_state=ssm_d_state,
            ssm_ratio=ssm_ratio,
            dt_rank=ssm_dt_rank,
            d_conv=ssm_conv,
            conv_bias=ssm_conv_bias,
            forward_type=forward_type,
            scan_backend=scan_backend,
        )
        self.layers = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            last = i == len(depths) - 1
            self.layers.append(
                nn.Sequential(
                    OrderedDict(
                        blocks=nn.Sequential(*[VSSBlock(dim, mlp_ratio, **ssm) for _ in range(depth)]),
                        downsample=nn.Identity() if last else _downsample(downsample_version, dim, dims[i + 1]),
                    )
                )
            )
        self.classifier = nn.Sequential(
            OrderedDict(
                norm=nn.LayerNorm(self.num_features),
                avgpool=GlobalAvgPool(),
                head=nn.Linear(self.num_features, num_classes),
            )
        )
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, H/32, W/32, C_last) channel-last features."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))

    @staticmethod
    def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename VMamba's first-release keys to the current ones; 1x1-conv weights to Linear."""
        out = {}
        for key, value in state.items():
            for pattern, repl in _LEGACY_KEYS:
                key = re.sub(pattern, repl, key)
            if value.dim() == 4 and value.shape[-2:] == (1, 1) and re.search(r"(proj|fc\d)\.weight$", key):
                value = value.flatten(1)
            out[key] = value
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # Lets `load_state_dict(strict=True)` accept first-release checkpoints too.
        converted = self.convert_state_dict({k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)})
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]
        state_dict.update({prefix + k: v for k, v in converted.items()})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


_LEGACY_KEYS = [
    (r"^patch_embed\.proj\.", "patch_embed.0."),
    (r"^patch_embed\.norm\.", "patch_embed.2."),
    (r"^(layers\.\d+\.blocks\.\d+\.)ln_1\.", r"\1norm."),
    (r"^(layers\.\d+\.blocks\.\d+\.)self_attention\.", r"\1op."),
    (r"^norm\.", "classifier.norm."),
    (r"^head\.", "classifier.head."),
]


def _patch_embed(version: str, in_chans: int, dim: int, patch_size: int, norm: bool) -> nn.Sequential:
    """Conv stem to channel-last tokens; indices match VMamba's (parameterless slots hold Permute)."""
    norm_layer = nn.LayerNorm if norm else (lambda _: nn.Identity())
    if version == "v1":
        return nn.Sequential(
            nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size), Permute(0, 2, 3, 1), norm_layer(dim)
        )
    if version == "v2":  # two stride-2 3x3 convs (patch size 4)
        return nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1),
            Permute(0, 2, 3, 1),
            norm_layer(dim // 2),
            Permute(0, 3, 1, 2),
            nn.GELU(),
            nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1),
            Permute(0, 2, 3, 1),
            norm_layer(dim),
        )
    raise ValueError(f"VMamba: patchembed_version must be 'v1' or 'v2', got {version!r}")


def _downsample(version: str, dim: int, out_dim: int) -> nn.Module:
    if version == "v1":
        return PatchMerging2D(dim, out_dim)
    if version in ("v2", "v3"):  # v2: 2x2 stride-2 conv; v3: 3x3 stride-2 conv
        k, pad = (2, 0) if version == "v2" else (3, 1)
        return nn.Sequential(
            Permute(0, 3, 1, 2), nn.Conv2d(dim, out_dim, k, stride=2, padding=pad), Permute(0, 2, 3, 1), nn.LayerNorm(out_dim)
        )
    raise ValueError(f"VMamba: downsample_version must be 'v1', 'v2' or 'v3', got {version!r}")


def _init_weights(m: nn.Module) -> None:
    """VMamba's init: truncated-normal Linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --- registered configurations ---------------------------------------------------------------

_VANILLA = dict(ssm_d_state=16, ssm_ratio=2.0, forward_type="v0", mlp_ratio=0.0,
                patchembed_version="v1", downsample_version="v1")  # fmt: skip


@register_model("vmamba")
def vmamba(**kwargs: Any) -> VMamba:
    """Fully configurable VMamba; kwargs are `VMamba`'s."""
    return VMamba(**kwargs)


@register_model("vanilla_vmamba_tiny")
def vanilla_vmamba_tiny(**kwargs: Any) -> VMamba:
    return VMamba(**{**_VANILLA, "depths": (2, 2, 9, 2), "dims": 96, **kwargs})


@register_model("vanilla_vmamba_small")
def vanilla_vmamba_small(**kwargs: Any) -> VMamba:
    return VMamba(**{**_VANILLA, "depths": (2, 2, 27, 2), "dims": 96, **kwargs})


@register_model("vanilla_vmamba_base")
def vanilla_vmamba_base(**kwargs: Any) -> VMamba:
    return VMamba(**{**_VANILLA, "depths": (2, 2, 27, 2), "dims": 128, **kwargs})


@register_model("vmamba_tiny_s1l8")
def vmamba_tiny_s1l8(**kwargs: Any) -> VMamba:
    config = dict(depths=(2, 2, 8, 2), dims=96, ssm_d_state=1, ssm_ratio=1.0, ssm_conv_bias=False,
                  forward_type="v05_noz", mlp_ratio=4.0, patchembed_version="v2", downsample_version="v3")  # fmt: skip
    return VMamba(**{**config, **kwargs})


DIGITS_CONFIG: dict[str, Any] = dict(
    in_chans=1, num_classes=10, patch_size=4, depths=(1, 1), dims=(32, 64), ssm_d_state=16, ssm_ratio=2.0,
    forward_type="v0", mlp_ratio=0.0, patchembed_version="v1", downsample_version="v2",
)  # fmt: skip


@register_model("digits-vmamba")
def digits_vmamba(**kwargs: Any) -> VMamba:
    """Small edge VMamba for 1x32x32 digits (targets/checkpoints/digits-vmamba.safetensors)."""
    return VMamba(**{**DIGITS_CONFIG, **kwargs})
