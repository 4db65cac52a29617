"""A small MLP classifier: the foundation's end-to-end subject on 8×8 digits."""

from __future__ import annotations

from torch import nn

from edgeopt.models import register_model


@register_model("mlp")
def mlp(in_features: int = 64, hidden: tuple[int, ...] = (256, 128), num_classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
