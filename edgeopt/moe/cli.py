"""`edgeopt moe {pack,run,bench,export-gguf}`: pack experts to disk, run with offloading, compare policies."""

from __future__ import annotations

from pathlib import Path

import click
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from edgeopt.errors import InputError
from edgeopt.moe.policy import POLICIES
from edgeopt.moe.train import DEFAULT_CHECKPOINT

DEFAULT_STORE = Path("runs/moe-store")
console = Console()


@click.group("moe")
def moe() -> None:
    """Mixture-of-Experts inference with experts offloaded to disk (HOBBIT mixed-precision loading)."""


@moe.command("pack")
@click.argument("model", type=click.Path(path_type=Path), default=DEFAULT_CHECKPOINT)
@click.argument("out", type=click.Path(path_type=Path), default=DEFAULT_STORE)
@click.option("--precisions", default="fp16,int4,int2", show_default=True,
              help="Comma-separated record precisions: fp16/fp32 (high), int4/int2 (HQQ-style groupwise).")
@click.option("--hqq/--minmax", default=True, show_default=True,
              help="Low-bit codes with HQQ's zero-point search, or plain min-max (~5x faster packing, a bit less accurate).")
def pack_cmd(model: Path, out: Path, precisions: str, hqq: bool) -> None:
    """Pack MODEL's experts into an expert store at OUT, streaming.

    MODEL is a moe-lm .safetensors checkpoint (default: the committed one) or a local
    Hugging Face directory (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3; one
    model.safetensors or shards with model.safetensors.index.json). The model is never built
    in memory: experts are read one at a time, so peak memory is the resident weights plus a
    few experts.
    """
    from edgeopt.moe.packer import pack_checkpoint

    precs = tuple(p.strip() for p in precisions.split(",") if p.strip())
    if not any(p in ("fp16", "fp32") for p in precs):
        raise InputError("--precisions needs a high precision (fp16 or fp32)")
    if not Path(model).exists():
        raise InputError(f"model not found: {model}")
    columns = (TextColumn("packing experts"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("pack", total=None)
        report = pack_checkpoint(model, out, precs, hqq=hqq,
                                 progress=lambda done, total: progress.update(task, completed=done, total=total))
    size = sum(f.stat().st_size for f in Path(out).iterdir()) / 2**20
    console.print(
        f"packed {report.n_layers * report.n_experts} experts x {len(precs)} precisions into {out} ({size:.1f} MiB); "
        f"peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB for a {report.checkpoint_bytes / 2**20:.0f} MiB checkpoint "
        f"(resident weights {report.resident_bytes / 2**20:.0f} MiB)"
    )


@moe.command("export-gguf")
@click.argument("model", type=click.Path(path_type=Path), default=DEFAULT_CHECKPOINT)
@click.argument("out", type=click.Path(path_type=Path), default=Path("runs/moe-lm.gguf"))
@click.option("--dtype", type=click.Choice(["f16", "f32"]), default="f16", show_default=True)
def export_gguf_cmd(model: Path, out: Path, dtype: str) -> None:
    """Write MODEL as GGUF to run it in llama.cpp side by side: a moe-lm checkpoint (llama.cpp's
    Mixtral layout) or a local Qwen3-MoE directory (F16, streamed tensor by tensor)."""
    from edgeopt.moe.gguf_export import export_gguf, export_gguf_qwen3_moe

    if not Path(model).exists():
        raise InputError(f"model not found: {model}")
    path = export_gguf_qwen3_moe(model, out) if Path(model).is_dir() else export_gguf(model, out, dtype)
    console.print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {dtype})")


def _policy_choice() -> click.Choice:
    return click.Choice(sorted(POLICIES))


@moe.command("run")
@click.argument("store", type=click.Path(path_type=Path), default=DEFAULT_STORE)
@click.option("--prompt", default="def main(", show_default=True, help="Text prompt (bytes for moe-lm; token ids for HF: '1 2 3').")
@click.option("--tokens", "new_tokens", default=64, show_default=True, help="Tokens to generate (greedy).")
@click.option("--policy", type=_policy_choice(), default="hobbit", show_default=True)
@click.option("--budget-fraction", type=float, default=None, help="Cache budget as a fraction of the fp16 expert bytes.")
@click.option("--budget-mb", type=float, default=None, help="Cache budget in MiB.")
@click.option("--profile", default=None, help="Take the budget from a hardware profile's memory_mb.")
@click.option("--t1", type=float, default=None, help="s <= T1 loads high precision (hobbit: 0.6).")
@click.option("--t2", type=float, default=None, help="s > T2 is skipped (hobbit: 0.9).")
@click.option("--prefetch", "prefetch_layers", type=int, default=None, help="Layers to predict ahead (hobbit: 1).")
def run_cmd(store, prompt, new_tokens, policy, budget_fraction, budget_mb, profile, t1, t2, prefetch_layers) -> None:
    """Generate from STORE with offloaded experts and print cache statistics."""
    from edgeopt.moe.offload import OffloadedLM

    if budget_fraction is None and budget_mb is None and profile is None:
        budget_fraction = 0.25
    lm = OffloadedLM(
        store, policy,
        budget_bytes=int(budget_mb * 2**20) if budget_mb is not None else None,
        budget_fraction=budget_fraction, profile=profile,
        t1=t1, t2=t2, prefetch_layers=prefetch_layers,
    )
    if lm.kind == "hf":
        try:
            ids = torch.tensor([[int(t) for t in prompt.split()]])
        except ValueError:
            raise InputError("HF models take --prompt as space-separated token ids") from None
    else:
        ids = torch.tensor([list(prompt.encode())])
    with console.status("decoding"):
        out = lm.generate(ids, new_tokens)
    stats = lm.engine.stats
    lm.close()
    text = bytes(out[0].tolist()).decode(errors="replace") if lm.kind != "hf" else " ".join(map(str, out[0].tolist()))
    console.print(text, markup=False, highlight=False)
    console.print(
        f"[dim]policy {policy}: hit rate {stats.hit_rate:.2f}, high/low/skipped uses "
        f"{stats.high_uses}/{stats.low_uses}/{stats.skipped}, read {lm.store.bytes_read / 2**20:.1f} MiB, "
        f"loader stall {stats.stall_s * 1e3:.0f} ms[/dim]"
    )


@moe.command("bench")
@click.argument("store", type=click.Path(path_type=Path), default=DEFAULT_STORE)
@click.option("--policies", default=",".join(POLICIES), show_default=True, help="Comma-separated policy names.")
@click.option("--budget-fraction", type=float, default=0.25, show_default=True,
              help="Cache budget as a fraction of the fp16 expert bytes.")
@click.option("--prompts", "n_prompts", default=8, show_default=True, help="Held-out prompts.")
@click.option("--prompt-len", default=64, show_default=True)
@click.option("--decode-tokens", default=64, show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Passes over the prompts; tok/s from each prompt's best pass.")
@click.option("--warm/--cold", "warm", default=False, show_default=True,
              help="--cold drops each record from the page cache after reading it (every miss is a disk read).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=Path("runs/moe-bench.png"), show_default=True)
def bench_cmd(store, policies, budget_fraction, n_prompts, prompt_len, decode_tokens, repeats, warm, plot_path) -> None:
    """Decode speed, TTFT, hit rate, bytes/token, stalls and perplexity for every policy, in one run."""
    from edgeopt.moe.bench import format_table, plot, run_bench

    names = [p.strip() for p in policies.split(",") if p.strip()]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"benchmarking {len(names)} policies, prompt by prompt", total=n_prompts * repeats)
        results, info = run_bench(
            store, names, budget_fraction, n_prompts, prompt_len, decode_tokens, cold=not warm,
            progress=lambda i: progress.advance(task), repeats=repeats,
        )
    click.echo(format_table(results, info))
    click.echo(f"plot: {plot(results, plot_path)}")
