"""The committed digits VMamba checkpoint is a real trained model: eval top-1 >= 97%."""

from __future__ import annotations

from pathlib import Path

import torch

from edgeopt.data import load_dataset
from edgeopt.models import build_model
from edgeopt.models.train_digits import DEFAULT_OUT, accuracy

CHECKPOINT = Path(__file__).resolve().parents[1] / DEFAULT_OUT


def test_checkpoint_is_small():
    assert CHECKPOINT.stat().st_size < 5 * 2**20


def test_eval_accuracy_floor():
    torch.manual_seed(0)
    model = build_model("digits-vmamba", checkpoint=CHECKPOINT)
    top1 = accuracy(model, load_dataset("digits", size=32).eval)
    assert top1 >= 0.97, top1


def test_states_for_distillation():
    """Each SS2D block exposes its scan states (B, K*d_inner, L, N) for a state-distillation loss."""
    model = build_model("digits-vmamba", checkpoint=CHECKPOINT)
    block = model.layers[0].blocks[0]
    x = block.norm(model.patch_embed(load_dataset("digits", size=32).eval.x[:2]))
    out, states = block.op(x, return_states=True)
    assert states.shape == (2, 4 * block.op.d_inner, 64, 16)
    torch.testing.assert_close(out, block.op(x))
