"""The Python API: `pack` a model into a store, then run it with `OffloadedLM`.

    from edgeopt.moe.offload import pack, OffloadedLM
    pack("targets/checkpoints/moe-lm.safetensors", "runs/moe-store")
    lm = OffloadedLM("runs/moe-store", policy="hobbit", budget_fraction=0.25)
    logits, state = lm(ids)            # prefill
    logits, state = lm(next_id, state)  # decode step
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from edgeopt.errors import InputError
from edgeopt.moe import blocks
from edgeopt.moe.models import build_skeleton, materialize, resident_state
from edgeopt.moe.policy import get_policy
from edgeopt.moe.runtime import Engine, OffloadedExperts
from edgeopt.moe.store import ExpertStore, write_store


def pack(model_path: Path, out: Path, precisions: tuple[str, ...] = ("fp16", "int4", "int2"), progress=None) -> Path:
    """Write every expert of the checkpoint in each precision, and its resident (non-expert) weights,
    streaming (see `packer`); `progress(bytes_done, bytes_total)`."""
    from edgeopt.moe.packer import pack_checkpoint

    return pack_checkpoint(Path(model_path), Path(out), tuple(precisions), progress).out


def pack_model(model, info: dict, out: Path, precisions=("fp16", "int4", "int2"), progress=None) -> Path:
    experts = [blocks.extract_experts(block) for _, block in blocks.find_moe_blocks(model)]
    return write_store(Path(out), experts, resident_state(model), info, precisions, progress)


def budget_from_profile(profile: str, store: ExpertStore, share: float = 0.5) -> int:
    """Expert-cache bytes on a profile: `share` of what its memory_mb leaves after the resident weights."""
    from edgeopt.profiles import load_profile

    memory = load_profile(profile).memory_mb * 2**20
    resident = (store.path / "resident.safetensors").stat().st_size
    budget = int((memory - resident) * share)
    if budget <= 0:
        raise InputError(f"profile {profile}: {memory >> 20} MiB does not hold the resident weights")
    return budget


class OffloadedLM:
    """A MoE LM whose experts live in a store and are served by an `Engine` under one policy."""

    def __init__(
        self,
        store: Path | str | ExpertStore,
        policy: str = "hobbit",
        budget_bytes: int | None = None,
        budget_fraction: float | None = None,
        profile: str | None = None,
        hot_counts: dict | None = None,
        model: torch.nn.Module | None = None,
        **policy_overrides,
    ) -> None:
        self.store = store if isinstance(store, ExpertStore) else ExpertStore(Path(store))
        self.policy = get_policy(policy, **policy_overrides)
        if budget_bytes is None and budget_fraction is not None:
            if budget_fraction <= 0:
                raise InputError(f"budget fraction must be positive, got {budget_fraction}")
            budget_bytes = int(budget_fraction * self.store.total_bytes(self.policy.high_precision))
        if budget_bytes is None and profile is not None:
            budget_bytes = budget_from_profile(profile, self.store)
        if budget_bytes is None and not self.policy.resident:
            raise InputError("give a cache budget (bytes, fraction of the high-precision expert bytes, or a profile)")
        info = self.store.manifest["model"]
        self.kind = info["kind"]
        # An in-memory model (e.g. with a per-expert module layout) can be given instead of
        # the store's skeleton; its expert weights are dropped in favour of the store's.
        self.model = model if model is not None else build_skeleton(info)
        holders: list[OffloadedExperts] = []

        def make(layer: int) -> OffloadedExperts:
            holders.append(OffloadedExperts(None, layer))  # engine attached below, once gates are known
            return holders[-1]

        blocks.install(self.model, make)
        if model is None:
            materialize(self.model, self.store.resident_state())
        # Gate weights are read after materializing: to_empty() replaced the meta tensors.
        gate_weights = [b.gate.weight for _, b in _gate_blocks(self.model)]
        if len(gate_weights) != self.store.n_layers:
            raise InputError(f"store has {self.store.n_layers} MoE layers, model has {len(gate_weights)}")
        self.engine = Engine(self.store, self.policy, budget_bytes, gate_weights, hot_counts)
        for h in holders:
            h.engine = self.engine
        config = info["config"]
        self.vocab_size = int(config.get("vocab_size") or self.model.get_input_embeddings().num_embeddings)
        # transformers renamed `past_key_values` to `cache` (5.24 warns on the old name, 5.40 drops it).
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def new_sequence(self) -> None:
        self.engine.reset_sequence()

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, state=None):
        """Logits (B, T, V) for `ids` (B, T) continuing `state` (None = new sequence)."""
        self.check_ids(ids)
        if state is None:
            self.new_sequence()
        if self.kind == "hf":
            out = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: state})
            return out.logits, getattr(out, self._cache_arg, None)
        return self.model(ids, state)

    def check_ids(self, ids: torch.Tensor) -> None:
        """Token ids must index the embedding table (else: a deep IndexError from inside the model)."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise InputError(f"token id {bad} is outside the model's vocabulary (0..{self.vocab_size - 1})")

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        logits, state = self(ids)
        out = [ids]
        for _ in range(new_tokens):
            nxt = logits[:, -1:].argmax(-1)
            out.append(nxt)
            logits, state = self(nxt, state)
        return torch.cat(out, dim=1)

    def close(self) -> None:
        self.engine.close()
        self.store.close()


def _gate_blocks(model):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "gate") and hasattr(m, "experts")
            and isinstance(m.experts, OffloadedExperts)]
