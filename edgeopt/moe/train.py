"""Train the committed byte-level MoE LM on the Python standard library source.

Reproduce the checkpoint with:

    python -m edgeopt.moe.train --out targets/checkpoints/moe-lm.safetensors --overwrite

(fixed seed, 600 steps of 16 x 128 bytes, d_ff 1024, 1 thread: 10 minutes measured on the
shared 2-core host; held-out 2.488 bits/byte; the same seed gives the same bytes on one
machine and Python version, whose stdlib is the corpus). Without `--out` it writes
runs/retrained/moe-lm.safetensors. Experts are wide (d_ff 1024, 97% of the weights) as in the
models offloading is for, where reading experts dominates decoding time. Weights are saved
in fp16 to keep the committed file small (26 MB); the model computes in fp32.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from edgeopt.fileio import write_json, write_with
from edgeopt.models.moe import MoEConfig, MoELM
from edgeopt.moe.corpus import load_corpus

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "targets" / "checkpoints" / "moe-lm.safetensors"


def load_balance_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss: E · Σ_e (token share routed to e) · (mean router prob of e)."""
    probs = logits.float().softmax(-1)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, probs.shape[-1]).sum(1).float()
    return probs.shape[-1] * (chosen.mean(0) / top_k * probs.mean(0)).sum()


@torch.no_grad()
def heldout_bits_per_byte(model: MoELM, seq: int = 256, n: int = 64) -> float:
    data = load_corpus("heldout")
    starts = torch.linspace(0, len(data) - seq - 2, n).long()
    batch = torch.stack([data[s : s + seq + 1] for s in starts]).long()
    logits, _ = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item() / math.log(2)


def train(cfg: MoEConfig, steps: int, batch: int, seq: int, lr: float, seed: int, log_every: int = 50) -> MoELM:
    torch.manual_seed(seed)
    data = load_corpus("train")
    model = MoELM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        warm = min(1.0, (step + 1) / 50)
        for group in opt.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        xy = torch.stack([data[s : s + seq + 1] for s in starts]).long()
        logits, _ = model(xy[:, :-1])
        lm = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), xy[:, 1:].reshape(-1))
        aux = sum(load_balance_loss(b.last_router_logits, cfg.top_k) for b in model.moe_blocks())
        loss = lm + 0.01 * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {lm.item():.3f}  aux {aux.item():.3f}  {time.time() - t0:6.0f}s", flush=True)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    from edgeopt.retraining import add_options, prepare

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d-ff", type=int, default=1024, help="expert width (the experts' share of the bytes)")
    p.add_argument("--d-model", type=int, default=MoEConfig().d_model)
    add_options(p, "moe-lm")
    args = p.parse_args(argv)
    prepare(args, args.out.with_suffix(".json"))
    cfg = MoEConfig(d_ff=args.d_ff, d_model=args.d_model)
    model = train(cfg, args.steps, args.batch, args.seq, args.lr, args.seed)
    bpb = heldout_bits_per_byte(model)
    print(f"held-out bits/byte {bpb:.3f}  perplexity/byte {2**bpb:.3f}")
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    write_with(args.out, lambda tmp: save_file(state, str(tmp), metadata={"config": json.dumps(cfg.to_dict())}))
    write_json(args.out.with_suffix(".json"), {"config": cfg.to_dict(), "heldout_bits_per_byte": round(bpb, 4),
                                               "train": vars(args) | {"out": str(args.out)}})


if __name__ == "__main__":
    main()
