"""edgeopt vs llama.cpp on the same MoE model (moe-lm), one run, side by side.

    python -m venv /work/llamapy && /work/llamapy/bin/pip install llama-cpp-python   # 10-25 CPU-min build
    nice python benchmarks/bench_moe_llamacpp.py --llama-python /work/llamapy/bin/python

llama-cpp-python is a benchmark-only extra (never in `make setup` or the tests); it runs in its
own interpreter (`--llama-python`), driven through a child process. Steps:

1. `export_gguf` writes moe-lm as F16 GGUF (llama.cpp's Mixtral layout); the conversion is
   checked by perplexity on held-out text against edgeopt's fully resident engine (goal: within 1%).
2. Fully resident, 1 thread: decode tokens/s of both engines on the same prompts (llama.cpp's
   timed through its Python binding's `eval`, one token per call, as edgeopt is timed).
3. Memory-limited: llama.cpp in a cgroup (v1 `memory.limit_in_bytes`, or v2 `memory.max`) whose
   limit is its own anonymous memory + the non-expert weights + the same expert budget edgeopt's
   hobbit gets (25% of the fp16 expert bytes); its GGUF is mmapped, so the page cache under that
   limit is its offload. Edgeopt's hobbit runs the same prompts with cold reads (every record read
   is dropped from the page cache).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeopt.moe.corpus import prompts  # noqa: E402
from edgeopt.moe.gguf_export import export_gguf  # noqa: E402
from edgeopt.moe.offload import OffloadedLM, pack  # noqa: E402
from edgeopt.moe.train import DEFAULT_CHECKPOINT  # noqa: E402

LLAMA_CHILD = r"""
import json, os, sys, time
cfg = json.loads(sys.argv[1])
if cfg.get("cgroup_procs"):
    with open(cfg["cgroup_procs"], "w") as f:
        f.write(str(os.getpid()))
import numpy as np
from llama_cpp import Llama
llm = Llama(cfg["gguf"], n_ctx=cfg["n_ctx"], n_threads=1, n_threads_batch=1, logits_all=cfg["logits"], verbose=False,
            use_mmap=True, n_batch=cfg["n_ctx"])
out = {"nll": [], "decode_s": [], "tokens": 0}
for seq in cfg["seqs"]:
    llm.reset()
    if cfg["logits"]:
        llm.eval(seq[:-1])
        logits = np.asarray(llm.scores[: len(seq) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        out["nll"] += [float(-logp[i, seq[i + 1]]) for i in range(cfg["prompt_len"] - 1, len(seq) - 1)]
        continue
    llm.eval(seq[: cfg["prompt_len"]])
    t0 = time.perf_counter()
    for tok in seq[cfg["prompt_len"] : -1]:
        llm.eval([tok])
    out["decode_s"].append(time.perf_counter() - t0)
    out["tokens"] += len(seq) - 1 - cfg["prompt_len"]
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
out["rss_anon"] = int(status["RssAnon"].split()[0]) * 1024
out["rss_file"] = int(status["RssFile"].split()[0]) * 1024 + int(status["RssShmem"].split()[0]) * 1024
out["rss"] = int(status["VmHWM"].split()[0]) * 1024
print(json.dumps(out))
"""


def run_llama(python: str, cfg: dict) -> dict:
    out = subprocess.run([python, "-c", LLAMA_CHILD, json.dumps(cfg)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"llama.cpp child failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_cgroup(limit: int) -> tuple[Path, str]:
    """A memory-limited cgroup; returns (its procs file, which hierarchy was used)."""
    name = f"edgeopt-llamacpp-{os.getpid()}"
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").exists():
        d = v1 / name
        d.mkdir(exist_ok=True)
        (d / "memory.limit_in_bytes").write_text(str(limit))
        return d / "cgroup.procs", "cgroup v1 memory.limit_in_bytes"
    d = Path("/sys/fs/cgroup") / name
    d.mkdir(exist_ok=True)
    (d / "memory.max").write_text(str(limit))
    (d / "memory.swap.max").write_text("0")
    return d / "cgroup.procs", "cgroup v2 memory.max"


def edgeopt_run(store: Path, policy: str, seqs: list[list[int]], prompt_len: int, cold: bool) -> dict:
    lm = OffloadedLM(store, policy, budget_fraction=0.25)
    lm.store.drop_after_read = cold
    nll, decode_s, tokens = [], [], 0
    for seq in seqs:
        ids = torch.tensor(seq)
        lm.store.drop_page_cache()
        logits, state = lm(ids[None, :prompt_len])
        nll.append(F.cross_entropy(logits[0, -1:], ids[prompt_len : prompt_len + 1]).item())
        t0 = time.perf_counter()
        for i in range(prompt_len, len(seq) - 1):
            logits, state = lm(ids[None, i : i + 1], state)
            nll.append(F.cross_entropy(logits[0, -1:], ids[i + 1 : i + 2]).item())
        decode_s.append(time.perf_counter() - t0)
        tokens += len(seq) - 1 - prompt_len
        lm.engine.quiesce()
    stats = lm.engine.stats
    uses = max(stats.high_uses + stats.low_uses + stats.skipped, 1)
    lm.close()
    return {"nll": nll, "decode_s": decode_s, "tokens": tokens,
            "split": [stats.high_uses / uses, stats.low_uses / uses, stats.skipped / uses]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-python", default="/work/llamapy/bin/python")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    seqs = [s.tolist() for s in prompts(args.prompts, args.prompt_len + args.decode_tokens + 1, seed=1)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gguf = export_gguf(args.checkpoint, tmp / "moe-lm.gguf")
        store = pack(args.checkpoint, tmp / "store", ("fp16", "int4"))
        n_ctx = args.prompt_len + args.decode_tokens + 8
        base = {"gguf": str(gguf), "n_ctx": n_ctx, "seqs": seqs, "prompt_len": args.prompt_len}
        # 1. conversion check by perplexity over the decoded positions
        ref = edgeopt_run(store, "resident", seqs, args.prompt_len, cold=False)
        ll = run_llama(args.llama_python, base | {"logits": True})
        ppl_e, ppl_l = math.exp(sum(ref["nll"]) / len(ref["nll"])), math.exp(sum(ll["nll"]) / len(ll["nll"]))
        print(f"held-out perplexity (per byte) over {len(ref['nll'])} positions: edgeopt resident {ppl_e:.4f}, "
              f"llama.cpp F16 GGUF {ppl_l:.4f} ({ppl_l / ppl_e - 1:+.2%}; goal within 1%) -> "
              f"{'PASS' if abs(ppl_l / ppl_e - 1) <= 0.01 else 'FAIL'}")
        # 2. fully resident speed
        lr = run_llama(args.llama_python, base | {"logits": False})
        tok_l = lr["tokens"] / sum(lr["decode_s"])
        tok_e = ref["tokens"] / sum(ref["decode_s"])
        print(f"resident, 1 thread: llama.cpp {tok_l:.0f} tok/s, edgeopt {tok_e:.0f} tok/s "
              f"(edgeopt/llama.cpp {tok_e / tok_l:.2f}x; goal >= 0.5x)")
        # 3. memory-limited
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf))
        expert_bytes = sum(int(t.n_bytes) for t in reader.tensors if "_exps" in t.name)
        other_bytes = sum(int(t.n_bytes) for t in reader.tensors if "_exps" not in t.name)
        budget = int(0.25 * expert_bytes)
        # Everything the resident run kept in memory (anonymous + file pages: libraries' code, the mapped
        # GGUF), less the 75% of the expert bytes that do not fit the budget.
        limit = lr["rss_anon"] + lr["rss_file"] - expert_bytes + budget
        try:
            procs, how = make_cgroup(limit)
        except OSError as exc:
            print(f"memory-limited run skipped: cannot create a cgroup ({exc})")
            return
        subprocess.run(["sync"], check=False)
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError:
            pass
        lm_lim = run_llama(args.llama_python, base | {"logits": False, "cgroup_procs": str(procs)})
        procs.parent.rmdir()
        tok_lim = lm_lim["tokens"] / sum(lm_lim["decode_s"])
        hob = edgeopt_run(store, "hobbit", seqs, args.prompt_len, cold=True)
        tok_h = hob["tokens"] / sum(hob["decode_s"])
        print(f"memory-limited ({how} = {limit / 2**20:.1f} MiB: llama.cpp's resident-run RSS {(lr['rss_anon'] + lr['rss_file']) / 2**20:.1f} "
              f"MiB (non-expert weights {other_bytes / 2**20:.1f} MiB) less 75% of its {expert_bytes / 2**20:.1f} MiB experts): "
              f"llama.cpp {tok_lim:.0f} tok/s; edgeopt hobbit (25% budget, cold reads) "
              f"{tok_h:.0f} tok/s, hi/lo/skip {'/'.join(f'{x:.2f}' for x in hob['split'])} -> hobbit/llama.cpp "
              f"{tok_h / tok_lim:.2f}x (goal >= 2x)")


if __name__ == "__main__":
    main()
