"""Side-by-side benchmark of every offloading policy on the same store, prompts and budget.

Per policy: drop the store from the page cache, then for each held-out prompt prefill it
(time to first token) and decode the held-out continuation one token at a time (teacher
forced, so perplexity is measured on real text along the same code path as generation).
With `cold=True` every record read is also dropped from the page cache right after it is
read, so each miss is a device read: the premise is that the experts do not fit in
memory, hence not in the page cache either.

Policies run interleaved prompt by prompt (load on a shared host hits them alike); with
`repeats` passes, decode tokens/s comes from each prompt's best pass (benchmarks/timing.py's
best-of-N), while bytes, stalls, hit rates and perplexity count every pass. HOBBIT's
replacement weights and its split of the budget between the high- and low-precision pools
are tuned on routing traces of training text (never the held-out prompts).
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from edgeopt.moe.corpus import load_corpus, prompts
from edgeopt.moe.offload import OffloadedLM
from edgeopt.moe.policy import POLICIES, Trace, get_policy, tune_weights
from edgeopt.moe.store import ExpertStore

BASELINE = "lru-fp16"
REFERENCE = "resident"
# Budget split between the high- and low-precision pools, tuned with the replacement weights.
HIGH_FRACTIONS = (0.0, 0.125, 0.25, 0.5)


@dataclass
class Result:
    policy: str
    tokens_per_s: float
    ttft_ms: float
    hit_rate: float
    bytes_per_token: float
    stall_ms_per_token: float
    perplexity: float
    read_mb_s: float
    bound_tokens_per_s: float
    high_low_skip: tuple[float, float, float]
    prefetch_accuracy: float
    peak_cache_bytes: int
    budget_bytes: int
    peak_held_bytes: int = 0  # finished prefetches held outside the cache until their layer runs


def calibration_trace(store: ExpertStore, sequences: int = 8, length: int = 128) -> Trace:
    """Routing of the resident model over training-split text (never the held-out prompts)."""
    lm = OffloadedLM(store, "resident")
    data = load_corpus("train")
    trace: Trace = []
    current: dict[int, dict[int, list]] = defaultdict(dict)  # layer → token → [(expert, weight)] by rank

    def record(layer, token, ranked):
        current[layer][token] = ranked

    lm.engine.tracer = record
    starts = torch.linspace(0, len(data) - length - 1, sequences).long().tolist()
    for start in starts:
        ids = data[start : start + length].long()[None]
        current.clear()
        lm(ids)
        trace.append([[current[layer][t] for layer in range(store.n_layers)] for t in range(length)])
    lm.engine.tracer = None
    lm.generate(ids[:, :8], 8)  # warm up the decode path before anything is timed
    lm.engine.close()
    return trace


def hot_counts(trace: Trace) -> Counter:
    counts: Counter = Counter()
    for sequence in trace:
        for token in sequence:
            for layer, ranked in enumerate(token):
                for expert, _ in ranked:
                    counts[(layer, expert)] += 1
    return counts


def tune_hobbit(trace: Trace, store: ExpertStore, budget: int, names: list[str],
                grid: tuple[float, ...] = (0.0, 0.5, 1.0)) -> dict[str, dict]:
    """Per HOBBIT-style policy: the replacement weights (each from `grid`) and pool split with the least
    replayed miss penalty on the calibration traces, among the splits its `min_high_experts` allows."""
    if not names:
        return {}
    hobbit = get_policy("hobbit")
    high_bytes, low_bytes = store.record_nbytes(hobbit.high_precision), store.record_nbytes(hobbit.low_precision)
    per_rule: dict[bool, dict] = {}  # the hit rule changes what a miss is, so each rule is tuned on its own replay
    out = {}
    for name in names:
        rule = POLICIES[name].low_serves_high
        if rule not in per_rule:
            base = replace(hobbit, low_serves_high=rule)
            per_rule[rule] = {f: tune_weights(base, trace, high_bytes, low_bytes, budget, grid=grid, high_fractions=(f,))
                              for f in HIGH_FRACTIONS}
        need = POLICIES[name].min_high_experts * high_bytes
        allowed = [f for f in HIGH_FRACTIONS if int(budget * f) >= need] or [max(HIGH_FRACTIONS)]
        best, _ = min((per_rule[rule][f] for f in allowed), key=lambda tuned: tuned[1])
        out[name] = {"weights": best.weights, "high_fraction": best.high_fraction}
    return out


class PolicyRun:
    """One policy's engine, store handle and running totals; prompts are fed one at a time so
    that all policies can be interleaved prompt by prompt (load on a shared host hits them alike)."""

    def __init__(self, store_path: Path, name: str, budget: int, hot: Counter, overrides: dict, cold: bool) -> None:
        self.name = name
        self.store = ExpertStore(store_path)  # own fd and counters per policy
        self.lm = OffloadedLM(self.store, name, budget_bytes=budget, hot_counts=dict(hot), **overrides)
        self.store.drop_after_read = cold
        self.base_read, self.base_secs = self.store.bytes_read, self.store.read_seconds
        self.decode_tokens, self.decode_bytes, self.stall = 0, 0, 0.0
        self.decode_s: dict[int, list[float]] = defaultdict(list)  # prompt → its decode time in each pass
        self.ttft: list[float] = []
        self.nll: list[float] = []

    def prompt(self, index: int, seq: torch.Tensor, prompt_len: int) -> None:
        store, stats = self.store, self.lm.engine.stats
        store.drop_page_cache()
        t0 = time.perf_counter()
        logits, state = self.lm(seq[None, :prompt_len])
        self.ttft.append(time.perf_counter() - t0)
        self.nll.append(F.cross_entropy(logits[0, -1:], seq[prompt_len : prompt_len + 1]).item())
        read0, stall0 = store.bytes_read, stats.stall_s
        t0 = time.perf_counter()
        for i in range(prompt_len, len(seq) - 1):
            logits, state = self.lm(seq[None, i : i + 1], state)
            self.nll.append(F.cross_entropy(logits[0, -1:], seq[i + 1 : i + 2]).item())
        self.decode_s[index].append(time.perf_counter() - t0)
        self.decode_tokens += len(seq) - 1 - prompt_len
        self.decode_bytes += store.bytes_read - read0
        self.stall += stats.stall_s - stall0
        self.lm.engine.quiesce()  # no reads of this policy may overlap the next policy's run

    def result(self) -> Result:
        store, engine = self.store, self.lm.engine
        stats = engine.stats
        read = store.bytes_read - self.base_read
        secs = store.read_seconds - self.base_secs
        bandwidth = read / secs if secs > 0 else float("inf")
        per_token = self.decode_bytes / max(self.decode_tokens, 1)
        uses = stats.high_uses + stats.low_uses + stats.skipped
        return Result(
            policy=self.name,
            # Best pass per prompt (as benchmarks/timing.py's best-of-N): the least noisy figure on a shared host.
            tokens_per_s=self.decode_tokens / sum(len(t) * min(t) for t in self.decode_s.values()),
            ttft_ms=1e3 * sum(self.ttft) / len(self.ttft),
            hit_rate=stats.hit_rate,
            bytes_per_token=per_token,
            stall_ms_per_token=1e3 * self.stall / max(self.decode_tokens, 1),
            perplexity=math.exp(sum(self.nll) / len(self.nll)),
            read_mb_s=bandwidth / 1e6,
            bound_tokens_per_s=bandwidth / per_token if per_token else float("inf"),
            high_low_skip=tuple(x / max(uses, 1) for x in (stats.high_uses, stats.low_uses, stats.skipped)),
            prefetch_accuracy=stats.prefetch_accuracy if stats.predicted else float("nan"),
            peak_cache_bytes=engine.cache.peak_used,
            budget_bytes=engine.budget,
            peak_held_bytes=stats.peak_held_bytes,
        )

    def close(self) -> None:
        self.lm.close()


def run_bench(
    store_path: Path,
    policies: list[str] | None = None,
    budget_fraction: float = 0.25,
    n_prompts: int = 8,
    prompt_len: int = 64,
    decode_tokens: int = 64,
    cold: bool = True,
    threads: int = 1,
    progress=None,
    calib_sequences: int = 8,
    repeats: int = 1,
) -> tuple[list[Result], dict]:
    torch.set_num_threads(threads)
    policies = policies or list(POLICIES)
    for name in policies:
        get_policy(name)  # unknown names fail before any work
    store = ExpertStore(Path(store_path))
    budget = int(budget_fraction * store.total_bytes("fp16"))
    trace = calibration_trace(store, calib_sequences)
    hot = hot_counts(trace)
    overrides = tune_hobbit(trace, store, budget, [name for name in policies if POLICIES[name].replacement == "hobbit"])
    seqs = prompts(n_prompts, prompt_len + decode_tokens + 1, seed=1) * repeats
    runs = [PolicyRun(Path(store_path), name, budget, hot, overrides.get(name, {}), cold) for name in policies]
    for i, seq in enumerate(seqs):  # pass after pass over the same prompts
        for run in runs[i % len(runs) :] + runs[: i % len(runs)]:  # rotate the order every prompt
            run.prompt(i % n_prompts, seq, prompt_len)
        if progress:
            progress(i)
    results = [run.result() for run in runs]
    for run in runs:
        run.close()
    store.close()
    info = {
        "budget_bytes": budget,
        "budget_fraction": budget_fraction,
        "high_expert_bytes": store.total_bytes("fp16"),
        "tuned": overrides,
        "prompts": n_prompts,
        "repeats": repeats,
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
        "cold": cold,
    }
    return results, info


def loading_share(result: Result, reference: Result) -> float:
    """Share of this policy's per-token decode time spent beyond the fully resident run's: the
    cost of offloading (reads, stalls, loader work). HOBBIT measured 85-95% for its baseline."""
    return max(0.0, 1 - result.tokens_per_s / reference.tokens_per_s)


def format_table(results: list[Result], info: dict) -> str:
    by = {r.policy: r for r in results}
    base, ref = by.get(BASELINE), by.get(REFERENCE)
    head = (
        f"{'policy':<17} {'tok/s':>7} {'xLRU':>6} {'load%':>5} {'TTFT ms':>8} {'hit':>5} {'KB/tok':>7} {'stall ms/tok':>12} "
        f"{'ppl':>6} {'ppl/res':>7} {'read MB/s':>9} {'bw-bound tok/s':>14} {'hi/lo/skip':>14} {'pred':>5}"
    )
    lines = [
        f"budget {info['budget_bytes'] / 2**20:.2f} MiB = {info['budget_fraction']:.0%} of {info['high_expert_bytes'] / 2**20:.2f} "
        f"MiB fp16 experts; {info['prompts']} held-out prompts x {info.get('repeats', 1)} x ({info['prompt_len']} prefill + "
        f"{info['decode_tokens']} decode), policies interleaved prompt by prompt, best pass per prompt; "
        f"cold reads: {info['cold']}",
        *(f"{name}: weights (lru, lfu, lhu, fld) = {t['weights']}, high-precision pool = {t['high_fraction']:.3g} of the "
          f"budget (both tuned on calibration traces)" for name, t in info["tuned"].items()),
        head,
        "-" * len(head),
    ]
    for r in results:
        speed = f"{r.tokens_per_s / base.tokens_per_s:5.2f}x" if base else "   -  "
        ppl = f"{r.perplexity / ref.perplexity:7.4f}" if ref else "      -"
        load = f"{100 * loading_share(r, ref):5.0f}" if ref else "    -"
        bound = f"{r.bound_tokens_per_s:14.0f}" if math.isfinite(r.bound_tokens_per_s) else f"{'inf':>14}"
        mix = "/".join(f"{x:.2f}" for x in r.high_low_skip)
        pred = f"{r.prefetch_accuracy:5.2f}" if math.isfinite(r.prefetch_accuracy) else "    -"
        lines.append(
            f"{r.policy:<17} {r.tokens_per_s:7.1f} {speed:>6} {load} {r.ttft_ms:8.1f} {r.hit_rate:5.2f} {r.bytes_per_token / 1024:7.1f} "
            f"{r.stall_ms_per_token:12.2f} {r.perplexity:6.3f} {ppl} {r.read_mb_s:9.0f} {bound} {mix:>14} {pred}"
        )
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgeopt.fileio import write_with

    names = [r.policy for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].bar(names, [r.tokens_per_s for r in results], color="tab:blue")
    axes[0].set_title("decode tokens/s")
    axes[1].bar(names, [r.bytes_per_token / 1024 for r in results], color="tab:orange")
    axes[1].set_title("KiB read per token")
    axes[2].bar(names, [r.perplexity for r in results], color="tab:green")
    axes[2].set_ylim(min(r.perplexity for r in results) * 0.95, max(r.perplexity for r in results) * 1.02)
    axes[2].set_title("held-out perplexity (per byte)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    write_with(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return Path(path)
