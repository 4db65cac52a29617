"""`edgeopt moe {pack,run,bench,export-gguf}`: pack experts to disk, run with offloading, compare policies."""

from __future__ import annotations

import math
from pathlib import Path

import click
import torch
from rich.console import Console

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
    from edgeopt.fileio import writable_dir
    from edgeopt.progress import progress

    writable_dir(out)  # before quantizing every expert, not after
    with progress("packing experts (MiB)") as tracker:
        report = pack_checkpoint(model, out, precs, hqq=hqq,
                                 progress=lambda done, total: tracker.update(round(done / 2**20), total=round(total / 2**20)))
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
@click.option("--prompt", default="def main(", show_default=True,
              help="Text prompt (bytes for moe-lm; an HF store encodes it with the model's tokenizer.json).")
@click.option("--prompt-ids", default=None, help="HF stores: the prompt as space-separated token ids instead of text.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path), default=None,
              help="HF stores: tokenizer.json (or its directory) [default: the store's, else the packed model directory's].")
@click.option("--tokens", "new_tokens", default=64, show_default=True, type=click.IntRange(min=0),
              help="Tokens to generate (greedy).")
@click.option("--policy", type=_policy_choice(), default="hobbit", show_default=True)
@click.option("--budget-fraction", type=float, default=None,
              help="Cache budget as a fraction (0, 1] of the fp16 expert bytes [default: 0.25 when no budget is given].")
@click.option("--budget-mb", type=float, default=None, help="Cache budget in MiB.")
@click.option("--profile", default=None, help="Take the budget from a hardware profile's memory_mb.")
@click.option("--t1", type=float, default=None, help="s <= T1 loads high precision (hobbit: 0.6).")
@click.option("--t2", type=float, default=None, help="s > T2 is skipped (hobbit: 0.9).")
@click.option("--prefetch", "prefetch_layers", type=int, default=None, help="Layers to predict ahead (hobbit: 2).")
def run_cmd(store, prompt, prompt_ids, tokenizer_path, new_tokens, policy, budget_fraction, budget_mb, profile, t1, t2,
            prefetch_layers) -> None:
    """Generate from STORE with offloaded experts and print cache statistics.

    Give at most one of --budget-fraction, --budget-mb and --profile.
    """
    from edgeopt.moe.offload import OffloadedLM

    budget_fraction, budget_bytes = _budget(budget_fraction, budget_mb, profile)
    if prompt_ids is None and not prompt:
        raise InputError("--prompt is empty; give some text to continue")
    lm = OffloadedLM(
        store, policy, budget_bytes=budget_bytes, budget_fraction=budget_fraction, profile=profile,
        t1=t1, t2=t2, prefetch_layers=prefetch_layers,
    )
    try:
        if lm.kind == "hf":
            tokenizer = None if prompt_ids is not None else load_tokenizer(Path(store), lm.store.manifest["model"],
                                                                          tokenizer_path)  # fmt: skip
            ids = _token_ids(prompt_ids) if tokenizer is None else tokenizer.encode(prompt).ids
            if not ids:
                raise InputError("the prompt encodes to no tokens")
            ids = torch.tensor([ids])
        else:
            if prompt_ids is not None:
                raise InputError("--prompt-ids is for HF stores; a moe-lm store takes --prompt text")
            ids = torch.tensor([list(prompt.encode())])
        with console.status("decoding"):
            out = lm.generate(ids, new_tokens)
        stats = lm.engine.stats
    finally:
        lm.close()
    if lm.kind != "hf":
        text = bytes(out[0].tolist()).decode(errors="replace")
    else:
        text = " ".join(map(str, out[0].tolist())) if tokenizer is None else tokenizer.decode(out[0].tolist())
    console.print(text, markup=False, highlight=False)
    console.print(
        f"[dim]policy {policy}: hit rate {stats.hit_rate:.2f}, high/low/skipped uses "
        f"{stats.high_uses}/{stats.low_uses}/{stats.skipped}, read {lm.store.bytes_read / 2**20:.1f} MiB, "
        f"loader stall {stats.stall_s * 1e3:.0f} ms[/dim]"
    )


def _budget(fraction: float | None, mb: float | None, profile: str | None) -> tuple[float | None, int | None]:
    """(fraction, bytes) after checking the budget options: at most one, finite and in range."""
    given = [name for name, value in (("--budget-fraction", fraction), ("--budget-mb", mb), ("--profile", profile))
             if value is not None]  # fmt: skip
    if len(given) > 1:
        raise InputError(f"give one cache budget, not {' and '.join(given)}")
    if fraction is not None and not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise InputError(f"--budget-fraction must be in (0, 1], got {fraction}")
    if mb is not None and not (math.isfinite(mb) and mb > 0):
        raise InputError(f"--budget-mb must be a positive number of MiB, got {mb}")
    if not given:
        fraction = 0.25
    return fraction, None if mb is None else int(mb * 2**20)


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split()]
    except ValueError:
        raise InputError("--prompt-ids takes space-separated token ids, e.g. '1 2 3'") from None
    if any(i < 0 for i in ids):
        raise InputError("--prompt-ids must not be negative")
    return ids


def load_tokenizer(store: Path, model_info: dict, given: Path | None):  # noqa: ANN201
    """The HF model's `tokenizers` tokenizer: --tokenizer, else the store's tokenizer.json, else the one
    in the model directory the store was packed from."""
    from tokenizers import Tokenizer

    candidates = [given] if given is not None else [store, Path(model_info.get("source", store))]
    for candidate in candidates:
        path = candidate / "tokenizer.json" if candidate.is_dir() else candidate
        if path.is_file():
            try:
                return Tokenizer.from_file(str(path))
            except Exception as exc:  # the tokenizers library raises a bare Exception on a bad file
                raise InputError(f"cannot read tokenizer {path}: {str(exc).splitlines()[0]}") from None
    where = " or ".join(str(c) for c in candidates)
    raise InputError(f"no tokenizer.json in {where}; give --tokenizer, or the prompt as --prompt-ids '1 2 3'")


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
    from edgeopt.progress import progress

    names = [p.strip() for p in policies.split(",") if p.strip()]
    with progress(f"benchmarking {len(names)} policies, prompt by prompt", total=n_prompts * repeats) as tracker:
        results, info = run_bench(
            store, names, budget_fraction, n_prompts, prompt_len, decode_tokens, cold=not warm,
            progress=lambda i: tracker.advance(), repeats=repeats,
        )
    click.echo(format_table(results, info))
    click.echo(f"plot: {plot(results, plot_path)}")
