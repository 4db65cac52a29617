"""SS2D block and VMamba classifier: semantics, gradients, low-rank hook, VMamba checkpoint keys."""

from __future__ import annotations

import importlib

import pytest
import torch
from safetensors.torch import save_file

from edgeopt.errors import InputError
from edgeopt.models import build_model, load_checkpoint
from edgeopt.models.ss2d import SS2D, cross_merge, cross_scan
from edgeopt.models.vmamba import VMamba


@pytest.mark.parametrize("forward_type,d_state,ratio", [("v0", 16, 2.0), ("v05_noz", 1, 1.0)])
def test_ss2d_shapes_and_gradients_flow(forward_type, d_state, ratio):
    torch.manual_seed(0)
    block = SS2D(d_model=16, d_state=d_state, ssm_ratio=ratio, forward_type=forward_type)
    x = torch.randn(2, 5, 7, 16, requires_grad=True)
    out, states = block(x, return_states=True)
    assert out.shape == x.shape
    assert states.shape == (2, 4 * block.d_inner, 35, d_state)
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert block.in_proj.weight.shape[0] == block.d_inner * (2 if forward_type == "v0" else 1)


def test_ss2d_default_backend_matches_reference_loop():
    torch.manual_seed(1)
    block = SS2D(d_model=8, d_state=16)
    x = torch.randn(1, 6, 6, 8)
    want = SS2D.forward(_with_backend(block, "reference"), x)
    got = SS2D.forward(_with_backend(block, None), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("long_form", [False, True])
def test_ss2d_chunked_scan_matches_reference_loop(long_form, monkeypatch):
    """Both chunked forms: the few-node one for small scans (every exported digits graph) and the
    step-by-step one that scans past `_VECTORIZE_MAX` (VMamba-T's 56x56 stage) take."""
    if long_form:  # the module, not `edgeopt.ops.selective_scan` the function that shadows it
        monkeypatch.setattr(importlib.import_module("edgeopt.ops.selective_scan"), "_VECTORIZE_MAX", 0)
    torch.manual_seed(3)
    block = SS2D(d_model=8, d_state=4)
    x = torch.randn(2, 5, 7, 8)  # L = 35: six chunks of 6 tokens, the last one padded
    want, want_h = SS2D.forward(_with_backend(block, "reference"), x, return_states=True)
    got, got_h = SS2D.forward(_with_backend(block, "chunked"), x, return_states=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_h, want_h, rtol=1e-4, atol=1e-5)


def _with_backend(block: SS2D, backend: str | None) -> SS2D:
    block.scan_backend = backend
    return block


def test_cross_scan_and_merge_are_inverse_orders():
    """Each direction's order is undone on merge, so merging the scan of x sums x four times."""
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    xs = cross_scan(x)
    assert torch.equal(xs[:, 1, :, :4], x[:, :, :4, 0])  # column-major: first column first
    assert torch.equal(xs[:, 2], x.flatten(2).flip(-1))
    torch.testing.assert_close(cross_merge(xs, 4, 5), 4 * x.flatten(2))


class FactoredXProj(SS2D):
    """What a low-rank pass does: x_proj_weight -> U @ V, exposed through the hook."""

    def __init__(self, base: SS2D, rank: int) -> None:
        super().__init__(d_model=base.in_proj.in_features, d_state=base.d_state)
        self.load_state_dict(base.state_dict())
        U, S, Vh = torch.linalg.svd(base.x_proj_weight.detach(), full_matrices=False)
        self.U = torch.nn.Parameter(U[..., :rank] * S[..., None, :rank])
        self.V = torch.nn.Parameter(Vh[..., :rank, :])
        del self.x_proj_weight

    def x_proj_weights(self) -> torch.Tensor:
        return self.U @ self.V


def test_low_rank_hook_replaces_x_proj():
    torch.manual_seed(2)
    base = SS2D(d_model=16, d_state=16).eval()
    x = torch.randn(1, 4, 4, 16)
    full_rank = FactoredXProj(base, rank=min(base.x_proj_weight.shape[1:]))
    torch.testing.assert_close(full_rank(x), base(x), rtol=1e-4, atol=1e-5)
    low_rank = FactoredXProj(base, rank=2)
    assert "x_proj_weight" not in dict(low_rank.named_parameters())
    assert not torch.allclose(low_rank(x), base(x), atol=1e-4)


# Public VMamba checkpoint keys (current naming) and shapes.
TINY_KEYS = {
    "patch_embed.0.weight": (96, 3, 4, 4),
    "patch_embed.2.weight": (96,),
    "layers.0.blocks.0.norm.weight": (96,),
    "layers.0.blocks.0.op.in_proj.weight": (384, 96),
    "layers.0.blocks.0.op.conv2d.weight": (192, 1, 3, 3),
    "layers.0.blocks.0.op.conv2d.bias": (192,),
    "layers.0.blocks.0.op.x_proj_weight": (4, 38, 192),
    "layers.0.blocks.0.op.dt_projs_weight": (4, 192, 6),
    "layers.0.blocks.0.op.dt_projs_bias": (4, 192),
    "layers.0.blocks.0.op.A_logs": (768, 16),
    "layers.0.blocks.0.op.Ds": (768,),
    "layers.0.blocks.0.op.out_norm.weight": (192,),
    "layers.0.blocks.0.op.out_proj.weight": (96, 192),
    "layers.0.downsample.reduction.weight": (192, 384),
    "layers.0.downsample.norm.weight": (384,),
    "layers.2.blocks.8.op.x_proj_weight": (4, 56, 768),
    "layers.3.blocks.1.op.A_logs": (6144, 16),
    "classifier.norm.weight": (768,),
    "classifier.head.weight": (1000, 768),
}
S1L8_KEYS = {
    "patch_embed.0.weight": (48, 3, 3, 3),
    "patch_embed.5.weight": (96, 48, 3, 3),
    "patch_embed.7.weight": (96,),
    "layers.0.blocks.0.op.in_proj.weight": (96, 96),
    "layers.0.blocks.0.op.x_proj_weight": (4, 8, 96),
    "layers.0.blocks.0.op.A_logs": (384, 1),
    "layers.0.blocks.0.norm2.weight": (96,),
    "layers.0.blocks.0.mlp.fc1.weight": (384, 96),
    "layers.0.blocks.0.mlp.fc2.weight": (96, 384),
    "layers.0.downsample.1.weight": (192, 96, 3, 3),
    "layers.0.downsample.3.weight": (192,),
    "layers.2.blocks.7.op.Ds": (1536,),
    "classifier.head.weight": (1000, 768),
}


@pytest.mark.parametrize(
    "name,keys,n_keys,params",
    [("vanilla_vmamba_tiny", TINY_KEYS, 212, 22.9e6), ("vmamba_tiny_s1l8", S1L8_KEYS, 276, 30.2e6)],
)
def test_public_checkpoint_layout(name, keys, n_keys, params, tmp_path):
    model = build_model(name)
    state = model.state_dict()
    for key, shape in keys.items():
        assert tuple(state[key].shape) == shape, key
    assert len(state) == n_keys
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)
    if name == "vmamba_tiny_s1l8":
        assert "layers.0.blocks.0.op.conv2d.bias" not in state
    # strict round trip through a safetensors file
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    other = load_checkpoint(build_model(name), path)
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_first_release_key_names_load_strictly():
    """VMamba's first checkpoints used ln_1 / self_attention / patch_embed.proj / norm / head."""
    torch.manual_seed(3)
    small = dict(depths=(1, 1), dims=(8, 16), num_classes=3)
    model = build_model("vanilla_vmamba_tiny", small)
    legacy = {}
    for key, value in model.state_dict().items():
        key = key.replace("patch_embed.0.", "patch_embed.proj.").replace("patch_embed.2.", "patch_embed.norm.")
        key = key.replace(".blocks.0.norm.", ".blocks.0.ln_1.").replace(".op.", ".self_attention.")
        legacy[key.removeprefix("classifier.")] = value
    assert "layers.0.blocks.0.ln_1.weight" in legacy and "head.weight" in legacy
    fresh = build_model("vanilla_vmamba_tiny", small)
    fresh.load_state_dict(legacy, strict=True)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(fresh(x), model(x))


def test_bad_config_is_a_clear_error():
    with pytest.raises(InputError, match="rejected its arguments"):
        build_model("digits-vmamba", {"no_such_option": 1})
    with pytest.raises(ValueError, match="forward_type"):
        VMamba(depths=(1,), dims=8, forward_type="v9")
