"""A tiny VMamba trained on 16x16 digits, shared by the low-rank / distill / sweep tests.

Trained once per test session (a few seconds): one SS2D stage, d_model 16, d_state 8.
"""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from edgeopt.artifact import TORCH, ModelArtifact, ModelSource, save_weights
from edgeopt.data import Splits, load_dataset
from edgeopt.models import build_model
from edgeopt.training import train_classifier

TINY = dict(in_chans=1, num_classes=10, patch_size=4, depths=[1, 1], dims=[16, 24], ssm_d_state=8,
            ssm_ratio=2.0, forward_type="v0", mlp_ratio=0.0, downsample_version="v2")  # fmt: skip
INPUT_SHAPE = (1, 16, 16)


@lru_cache(maxsize=1)
def digits16() -> Splits:
    return load_dataset("digits", size=16)


def tiny_vmamba(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("vmamba", TINY)


@lru_cache(maxsize=1)
def trained_teacher() -> ModelArtifact:
    """The tiny VMamba after a short real training run, as a torch artifact in a temp dir."""
    torch.set_num_threads(1)
    model = tiny_vmamba()
    train_classifier(model, digits16(), epochs=8, lr=1e-2, batch_size=32, seed=0)
    path = Path(tempfile.mkdtemp(prefix="lowrank-teacher-")) / "model.safetensors"
    save_weights(model, path)
    return ModelArtifact(TORCH, path, ModelSource("vmamba", TINY), INPUT_SHAPE, module=model.eval())
