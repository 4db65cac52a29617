"""Streaming pack: checkpoint (one file or sharded) → expert store, one expert in memory at a time.

The model is never built with weights: its skeleton is made on the meta device only to learn
which tensors are experts, what the resident (non-expert) weights are called and what shapes
they must have. Experts are then read from the checkpoint tensor by tensor (or row by row from
a stacked expert tensor), encoded in every precision and appended to the store, so peak memory
is the resident weights plus a few experts whatever the checkpoint's size.

Checkpoint layouts read: stacked experts named like the module (`…experts.gate_up_proj` (E, 2I, H)
and `…experts.down_proj` (E, H, I): moe-lm, and transformers 5 in memory) and per-expert
tensors (`…experts.{e}.{w1,w3,w2}.weight` (Mixtral, whose block is `block_sparse_moe` on disk) or
`…experts.{e}.{gate,up,down}_proj.weight` (Qwen-MoE, OLMoE, DeepSeek)), which is what
transformers writes with `save_pretrained` and what the hub ships.
"""

from __future__ import annotations

import json
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from edgeopt.errors import InputError
from edgeopt.moe import blocks
from edgeopt.moe.models import build_skeleton
from edgeopt.moe.sharded import ShardedCheckpoint
from edgeopt.moe.store import StoreWriter

# Module name in transformers 5 → names older checkpoints use for the same module.
_ALIASES = ((".mlp.", ".block_sparse_moe."),)
_PER_EXPERT = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


@dataclass
class PackReport:
    out: Path
    n_layers: int
    n_experts: int
    checkpoint_bytes: int
    expert_bytes: int
    resident_bytes: int
    peak_rss_bytes: int


def model_info(source: Path) -> dict:
    """{'kind', 'config'} of a moe-lm .safetensors checkpoint or a local HF model directory."""
    source = Path(source)
    if source.is_dir():
        from edgeopt.moe.hf import check_config

        config_path = source / "config.json"
        if not config_path.is_file():
            raise InputError(f"{source} is not a Hugging Face model directory (no config.json)")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {config_path}: {exc}") from exc
        check_config(config, str(source))
        # `source` lets `moe run` find the model's tokenizer.json next to the weights
        return {"kind": "hf", "config": config, "source": str(source.resolve())}
    if source.suffix != ".safetensors" or not source.is_file():
        raise InputError(f"model must be a moe-lm .safetensors checkpoint or a local HF model directory: {source}")
    try:
        with safe_open(str(source), "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise InputError(f"cannot read checkpoint {source}: {exc}") from exc
    if "config" not in meta:
        raise InputError(f"{source} has no moe-lm config in its metadata")
    return {"kind": "moe-lm", "config": json.loads(meta["config"])}


def _candidates(name: str) -> list[str]:
    out = [name]
    for new, old in _ALIASES:
        if new in name:
            out.append(name.replace(new, old))
    return out


def _find(ckpt: ShardedCheckpoint, name: str) -> str | None:
    return next((c for c in _candidates(name) if c in ckpt), None)


def expert_reader(ckpt: ShardedCheckpoint, block_name: str) -> tuple[int, Callable[[int], tuple[torch.Tensor, torch.Tensor]]]:
    """(number of experts, expert index → (gate_up (2I, H), down (H, I))) for one MoE block on disk."""
    prefix = f"{block_name}.experts" if block_name else "experts"
    fused = _find(ckpt, f"{prefix}.gate_up_proj")
    if fused is not None:
        down = fused.rsplit(".", 1)[0] + ".down_proj"
        if down not in ckpt:
            raise InputError(f"checkpoint has {fused} but no {down}")
        if fused + "_bias" in ckpt or down + "_bias" in ckpt:
            raise InputError(f"{block_name}: experts with biases are not supported (SwiGLU experts without bias only)")
        return ckpt.shape(fused)[0], lambda e: (ckpt.read(fused, e), ckpt.read(down, e))
    for base in _candidates(prefix):
        for g, u, d in _PER_EXPERT:
            names = [f"{base}.0.{n}.weight" for n in (g, u, d)]
            if all(n in ckpt for n in names):
                if f"{base}.0.{g}.bias" in ckpt:
                    raise InputError(f"{block_name}: experts with biases are not supported (SwiGLU experts without bias only)")
                count = 0
                while f"{base}.{count}.{g}.weight" in ckpt:
                    count += 1

                def read(e: int, base=base, g=g, u=u, d=d) -> tuple[torch.Tensor, torch.Tensor]:
                    gate, up, down = (ckpt.read(f"{base}.{e}.{n}.weight") for n in (g, u, d))
                    return torch.cat([gate, up]), down

                return count, read
    raise InputError(f"checkpoint has no expert weights for MoE block {block_name} (looked for {prefix}.gate_up_proj "
                     f"and {prefix}.0.w1.weight / .gate_proj.weight)")


def _rebuilt_buffers(skeleton: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers a checkpoint does not hold (rotary `inv_freq`): each owning module rebuilt on CPU
    from its own config, which is how transformers computes them (they are cheap and tiny)."""
    out = {}
    for mod_name, module in skeleton.named_modules():
        own = [n for n, _ in module.named_buffers(recurse=False)]
        if not own or getattr(module, "config", None) is None:
            continue
        try:
            rebuilt = type(module)(module.config)
        except Exception:
            continue
        for n in own:
            value = getattr(rebuilt, n, None)
            if isinstance(value, torch.Tensor):
                out[f"{mod_name}.{n}" if mod_name else n] = value.detach().clone()
    return out


def resident_weights(ckpt: ShardedCheckpoint, skeleton: nn.Module) -> dict[str, torch.Tensor]:
    """Every non-expert parameter and buffer, read from the checkpoint under the skeleton's names."""
    skip = blocks.expert_param_names(skeleton)
    state: dict[str, torch.Tensor] = {}
    by_identity: dict[int, list[str]] = {}
    params = list(skeleton.named_parameters(remove_duplicate=False))
    for name, p in params:
        by_identity.setdefault(id(p), []).append(name)
    rebuilt = None
    for name, tensor in params + list(skeleton.named_buffers(remove_duplicate=False)):
        if name in skip:
            continue
        found = _find(ckpt, name)
        if found is None:  # a tied weight stored once (lm_head = embed_tokens)
            found = next((f for other in by_identity.get(id(tensor), []) if (f := _find(ckpt, other))), None)
        if found is not None:
            value = ckpt.read(found)
        else:
            rebuilt = _rebuilt_buffers(skeleton) if rebuilt is None else rebuilt
            if name not in rebuilt:
                raise InputError(f"checkpoint lacks weight {name}")
            value = rebuilt[name]
        if tuple(value.shape) != tuple(tensor.shape):
            raise InputError(f"checkpoint weight {found or name} has shape {tuple(value.shape)}, the config wants {tuple(tensor.shape)}")
        state[name] = value
    return state


def pack_checkpoint(
    source: Path, out: Path, precisions: tuple[str, ...] = ("fp16", "int4", "int2"),
    progress: Callable[[int, int], None] | None = None, hqq: bool = True,
) -> PackReport:
    """Pack `source` into a store at `out`; `progress(bytes_done, bytes_total)` after each expert.
    `hqq=False` quantizes int4/int2 min-max, without HQQ's zero-point search (~5x faster to pack)."""
    info = model_info(source)
    skeleton = build_skeleton(info)
    ckpt = ShardedCheckpoint(source)
    try:
        block_names = [name for name, _ in blocks.find_moe_blocks(skeleton)]
        readers = [expert_reader(ckpt, name) for name in block_names]
        counts = {n for n, _ in readers}
        if len(counts) != 1:
            raise InputError(f"MoE layers have different expert counts {sorted(counts)}; the store needs one")
        n_experts = counts.pop()
        resident = resident_weights(ckpt, skeleton)
        del skeleton
        first = readers[0][1](0)
        shapes = {"gate_up": list(first[0].shape), "down": list(first[1].shape)}
        expert_bytes = sum(t.numel() * t.element_size() for t in first)
        total = expert_bytes * n_experts * len(readers)
        writer = StoreWriter(Path(out), len(readers), n_experts, shapes, precisions, hqq)
        try:
            done = 0
            for layer, (_, read) in enumerate(readers):
                for e in range(n_experts):
                    gate_up, down = first if (layer, e) == (0, 0) else read(e)
                    writer.add(layer, e, gate_up, down)
                    done += gate_up.numel() * gate_up.element_size() + down.numel() * down.element_size()
                    del gate_up, down
                    first = None
                    if progress:
                        progress(done, total)
        except BaseException:
            writer.abort()
            raise
        writer.finish(resident, info)
        resident_bytes = sum(t.numel() * t.element_size() for t in resident.values())
        return PackReport(Path(out), len(readers), n_experts, ckpt.total_bytes, total, resident_bytes, peak_rss())
    finally:
        ckpt.close()


def peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
