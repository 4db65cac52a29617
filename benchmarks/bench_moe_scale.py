"""MoE offloading at real size: a ≥ 2 GB random-weight MoE from a real architecture's config.

    nice python benchmarks/bench_moe_scale.py [--model qwen3-moe-2g] [--budgets 0.1,0.25,0.5]
        [--cache-dir ~/.cache/edgeopt/moe-scale] [--decode-tokens 16] [--policies ...] [--read-mbps 450]

1. Writes the checkpoint once into the cache dir (never the repo): `edgeopt.moe.synth` makes
   random bf16 weights with the shapes of the architecture (`SCALE_CONFIGS`), in 512 MiB shards.
2. Packs it with the streaming packer in a child process (fp16 + int4; min-max int4 codes,
   `--minmax`, since HQQ's search costs ~1 CPU-s per expert and the weights are random anyway),
   printing the packer's peak RSS against the checkpoint's size (goal ≤ 25%).
3. Measures the cold read bandwidth of the store (page cache dropped, fp16 records read in a
   random order, as misses are).
4. Per budget and policy, in a fresh child process with the page cache dropped first, and every
   record dropped from it again right after it is read (each miss is a device read): time to
   first token (prefill of an 8-token prompt), decode tokens/s (greedy), bytes read per token,
   the bandwidth-bound tokens/s they imply (bandwidth / bytes per token) and the share reached,
   the high/low/skip split of expert uses, and peak RSS against budget + resident weights.

Weights are random, so perplexity means nothing here (quality is measured on the trained moe-lm
by bench_moe_offload.py). Routing is made realistic instead (`synth.RoutingSpec`: the embedding and
routers are built so routing is token-dependent with Zipf-skewed expert popularity), and the model
reads real text: word tokens of the Python standard library (`corpus.word_ids`), teacher-forced
(greedy decoding of a random model repeats itself and would route the same experts every token).
The bench prints the measured routing statistics of the decoded tokens (per-layer expert-switch
rate and top-expert share, raw and as lifts over random routing; the trained moe-lm measured a reuse
lift of 1.76 on held-out text). HOBBIT's replacement weights and its high/low pool split are tuned
on a routing trace of training-split text (never the decoded text); its importance thresholds stay
the paper's T1 = 0.6, T2 = 0.9. Policies run one after another, not interleaved, on a shared host:
compare ratios. The page cache is dropped with /proc/sys/vm/drop_caches (root), else with posix_fadvise.

`--read-mbps N` runs all of it with reads from the store's disk throttled to N MB/s (a blkio cgroup): the
storage of the boards HOBBIT targets is slower than this host's disk (measured here 1.5-2.0 GB/s with
O_DIRECT), e.g. a Raspberry Pi 5's NVMe on the M.2 HAT+ at its default PCIe Gen 2 x1 (link ~500 MB/s;
~840 MB/s read forced to Gen 3) or a microSD card (40-85 MB/s). The CPU stays this host's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4000000000", "MALLOC_TOP_PAD_": "268435456"}


def drop_page_cache(files: list[Path]) -> str:
    """Drop the whole page cache if allowed (root), else the given files' pages; returns which."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        return "fadvise"


def whole_disk(path: Path) -> str:
    """MAJ:MIN of the disk holding `path` (a partition's parent: block throttles act on whole disks)."""
    dev = os.stat(path).st_dev
    sys_dev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if (sys_dev / "partition").is_file():
        return (sys_dev.resolve().parent / "dev").read_text().strip()
    return f"{os.major(dev)}:{os.minor(dev)}"


@contextlib.contextmanager
def read_limit(path: Path, mbps: float | None):
    """Run the block below (this process and its children) with reads from `path`'s disk limited to `mbps`
    MB/s by a blkio cgroup (v1 blkio.throttle.read_bps_device, v2 io.max); yields a description."""
    if not mbps:
        yield "this host's disk, unthrottled"
        return
    disk, rate, name = whole_disk(path), int(mbps * 1e6), f"edgeopt-moe-scale-{os.getpid()}"
    v1 = Path("/sys/fs/cgroup/blkio")
    if (v1 / "blkio.throttle.read_bps_device").exists():
        root, how, knob, value = v1, "cgroup v1 blkio.throttle.read_bps_device", "blkio.throttle.read_bps_device", f"{disk} {rate}"
    else:
        root, how, knob, value = Path("/sys/fs/cgroup"), "cgroup v2 io.max", "io.max", f"{disk} rbps={rate}"
    group = root / name
    try:
        group.mkdir()
        (group / knob).write_text(value + "\n")
        (group / "cgroup.procs").write_text(f"{os.getpid()}\n")
    except OSError as exc:
        if group.is_dir():
            group.rmdir()
        raise SystemExit(f"--read-mbps needs a writable {root} (root, and the io controller on cgroup v2): {exc}") from None
    try:
        yield f"reads limited to {mbps:.0f} MB/s on disk {disk} by {how}"
    finally:
        (root / "cgroup.procs").write_text(f"{os.getpid()}\n")
        group.rmdir()


def child_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **MALLOC)
    return env


def prepare(model: str, cache: Path, tag: str) -> tuple[Path, dict]:
    """The checkpoint and its store in `cache` (made once); returns (store, pack report)."""
    from edgeopt.moe.synth import SCALE_CONFIGS, RoutingSpec, write_random_checkpoint

    ckpt, store = cache / f"{model}-{tag}" / "checkpoint", cache / f"{model}-{tag}" / "store"
    if not (ckpt / "model.safetensors.index.json").is_file():
        print(f"writing random-weight checkpoint {model} (routing: {RoutingSpec()}) to {ckpt} ...", flush=True)
        t0 = time.perf_counter()
        write_random_checkpoint(SCALE_CONFIGS[model], ckpt, routing=RoutingSpec())
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    report_path = store.parent / "pack-report.json"
    if not (store / "store.json").is_file() or not report_path.is_file():
        print(f"packing {ckpt} -> {store} (fp16 + min-max int4, streaming, child process) ...", flush=True)
        code = ("import json,sys,time,dataclasses; from pathlib import Path; from edgeopt.moe.packer import pack_checkpoint;"
                "t=time.perf_counter(); r=pack_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]), ('fp16','int4'), hqq=False);"
                "d=dataclasses.asdict(r); d['out']=str(r.out); d['seconds']=time.perf_counter()-t; print(json.dumps(d))")
        out = subprocess.run([sys.executable, "-c", code, str(ckpt), str(store)], env=child_env() | {"OMP_NUM_THREADS": "1"},
                             capture_output=True, text=True, check=True)
        report_path.write_text(out.stdout.strip().splitlines()[-1])
    return store, json.loads(report_path.read_text())


def cold_bandwidth(store_path: Path, samples: int = 64, readers: int = 2) -> tuple[float, str]:
    """MB/s of reading fp16 records in random order right after dropping the page cache, with as many
    parallel readers as the engine's loader has, through the store's own reads (O_DIRECT + checksum)."""
    from concurrent.futures import ThreadPoolExecutor

    from edgeopt.moe.store import ExpertStore

    store = ExpertStore(store_path)
    keys = [(layer, e) for layer in range(store.n_layers) for e in range(store.n_experts)]
    random.Random(0).shuffle(keys)
    how = drop_page_cache([store.data_path])
    t0 = time.perf_counter()
    with ThreadPoolExecutor(readers) as pool:
        total = sum(pool.map(lambda key: len(store.read_raw(key[0], key[1], "fp16")), keys[:samples]))
    seconds = time.perf_counter() - t0
    store.close()
    return total / seconds / 1e6, how


RUN = r"""
import json, sys, time, torch
def peak_rss():  # VmHWM: ru_maxrss would carry the parent's peak across fork + exec
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
from edgeopt.moe.offload import OffloadedLM
from edgeopt.moe.routing import routing_stats
store, policy, fraction, overrides, text = sys.argv[1], sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4]), json.loads(sys.argv[5])
prompt_len, ids = text["prompt_len"], torch.tensor([text["ids"]])
decode = ids.shape[1] - prompt_len
torch.set_num_threads(1)
lm = OffloadedLM(store, policy, budget_fraction=fraction, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
# The experts do not fit in memory, so neither do they fit in the page cache (this host's RAM would otherwise
# serve every re-read): the store reads through O_DIRECT, and where the file system has none every record
# read is dropped from the page cache right after.
lm.store.drop_after_read = True
resident = sum(t.numel() * t.element_size() for t in list(lm.model.parameters()) + list(lm.model.buffers()))
preload_read = lm.store.bytes_read
route = {}
t0 = time.perf_counter()
logits, state = lm(ids[:, :prompt_len])
ttft = time.perf_counter() - t0
lm.engine.tracer = lambda layer, t, ranked: route.setdefault(layer, []).append(ranked)
read0, secs0, t0 = lm.store.bytes_read, lm.store.read_seconds, time.perf_counter()
for i in range(prompt_len, ids.shape[1]):  # teacher-forced: the text goes on, whatever the random model predicts
    logits, state = lm(ids[:, i : i + 1], state)
dt = time.perf_counter() - t0
trace = [[[route[layer][t] for layer in sorted(route)] for t in range(decode)]]
routing = [vars(r) for r in routing_stats(trace, lm.store.n_experts)]
s = lm.engine.stats
uses = max(s.high_uses + s.low_uses + s.skipped, 1)
print(json.dumps({"tok_s": decode / dt, "ttft_ms": ttft * 1e3, "bytes_per_token": (lm.store.bytes_read - read0) / decode,
                  "hit": s.hit_rate, "split": [s.high_uses / uses, s.low_uses / uses, s.skipped / uses],
                  "budget": lm.engine.budget, "resident": resident, "peak_cache": lm.engine.cache.peak_used,
                  "peak_rss": peak_rss(), "preload": preload_read,
                  "stall_ms_tok": 1e3 * s.stall_s / (decode + 1), "routing": routing}))
lm.close()
"""


def run_policy(store: Path, policy: str, fraction: float, text: dict, overrides: dict | None = None,
               limit_mbps: float | None = None) -> dict:
    """One policy in a fresh child; the cold bandwidth is measured again right before it (this host's
    disk drifts between runs: lru-fp16 read 582 vs 915 MB/s in two runs with the same start-up figure).
    Under a read limit the figure is capped at the limit: a short probe ran above it at times (1.9 GB/s under
    an 840 MB/s limit once; cause not pinned down), while the decoding children read at the limit."""
    bandwidth = min(cold_bandwidth(store, samples=32)[0], limit_mbps or float("inf"))
    drop_page_cache([store / "experts.safetensors"])
    out = subprocess.run([sys.executable, "-c", RUN, str(store), policy, str(fraction), json.dumps(overrides or {}), json.dumps(text)],
                         env=child_env(), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{policy} @ {fraction}: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"bandwidth": bandwidth}


def calibration_trace(store: Path, vocab: int, sequences: int = 2, length: int = 64) -> list:
    """Routing of `sequences` stretches of training-split text (prefill; never the decoded text)."""
    from edgeopt.moe.corpus import word_ids
    from edgeopt.moe.offload import OffloadedLM

    ids = word_ids("train", vocab)
    lm = OffloadedLM(store, "lru-fp16", budget_fraction=0.5)
    current: dict[int, dict[int, list]] = {}
    lm.engine.tracer = lambda layer, t, ranked: current.setdefault(layer, {}).__setitem__(t, ranked)
    trace = []
    for start in torch_linspace(0, len(ids) - length - 1, sequences):
        current.clear()
        lm(ids[None, start : start + length])
        trace.append([[current[layer][t] for layer in sorted(current)] for t in range(length)])
    lm.close()
    return trace


def torch_linspace(lo: int, hi: int, n: int) -> list[int]:
    return [lo + (hi - lo) * i // max(n - 1, 1) for i in range(n)]


def tuned_overrides(trace: list, store: Path, fraction: float, policies: list[str]) -> dict[str, dict]:
    """Per HOBBIT-style policy: replacement weights and high/low pool split with the least replayed miss penalty."""
    from edgeopt.moe.bench import tune_hobbit
    from edgeopt.moe.policy import POLICIES
    from edgeopt.moe.store import ExpertStore

    st = ExpertStore(store)
    budget = int(fraction * st.total_bytes("fp16"))
    # A coarse grid (0 or 1 per weight): the replay of a 64-expert trace costs ~1 s per candidate here.
    out = tune_hobbit(trace, st, budget, [n for n in policies if POLICIES[n].replacement == "hobbit"], grid=(0.0, 1.0))
    st.close()
    return out


def baseline_rss(store: Path) -> int:
    """Peak RSS of a child that loads the same code and holds no weights: interpreter + torch + transformers
    + the model's own classes (its skeleton built on the meta device: transformers imports the modeling
    module lazily, ~140 MiB here, code the engine needs whatever the budget)."""
    code = ("import sys, json, torch, transformers, edgeopt.moe.offload; from edgeopt.moe.models import build_skeleton; "
            "build_skeleton(json.load(open(sys.argv[1]))['model']); "
            "print(int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(store / "store.json")], env=child_env(), capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-moe-2g")
    p.add_argument("--tag", default="routed", help="cache sub-directory suffix (a new tag = a new generated model)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "edgeopt" / "moe-scale")
    p.add_argument("--budgets", default="0.1,0.25,0.5")
    p.add_argument("--policies", default="lru-fp16,all-low,hobbit,hobbit-strict")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--read-mbps", type=float, default=None,
                   help="limit reads from the store's disk to this many MB/s (a blkio cgroup; root), e.g. 450 for a "
                        "Raspberry Pi 5's NVMe on the M.2 HAT+ at its default PCIe Gen 2 x1 (link ~500 MB/s)")
    p.add_argument("--llama-python", default=None,
                   help="an interpreter with llama-cpp-python: also run llama.cpp on the same model (resident and "
                        "under a cgroup memory limit at the 25%% budget)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    store, report = prepare(args.model, args.cache_dir.expanduser(), args.tag)
    base_rss = baseline_rss(store)
    ckpt = report["checkpoint_bytes"]
    pack_extra = report["peak_rss_bytes"] - base_rss
    print(f"model {args.model}: {report['n_layers']} MoE layers x {report['n_experts']} experts, "
          f"{report['expert_bytes'] / 2**30:.2f} GiB bf16 experts, checkpoint {ckpt / 2**30:.2f} GiB, "
          f"resident (non-expert) {report['resident_bytes'] / 2**20:.0f} MiB")
    print(f"pack: {report['seconds']:.0f} s, peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB "
          f"({report['peak_rss_bytes'] / ckpt:.1%} of the checkpoint; goal <= 25%); above an idle interpreter with "
          f"torch + transformers + the model's classes ({base_rss / 2**20:.0f} MiB): {pack_extra / 2**20:.0f} MiB")
    if args.prepare_only:
        return
    with read_limit(store / "experts.safetensors", args.read_mbps) as where:
        print(f"storage: {where}")
        measure(args, store, base_rss)


def measure(args, store: Path, base_rss: int) -> None:
    """Resident, then every policy per budget, then llama.cpp; each in a fresh child process."""
    bandwidth, how = cold_bandwidth(store)
    print(f"cold read bandwidth {bandwidth:.0f} MB/s (fp16 records in random order, 2 parallel readers as the loader; page cache dropped by {how})")
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    from edgeopt.moe.corpus import word_ids
    from edgeopt.moe.routing import LayerRouting, format_stats

    vocab = json.loads((store / "store.json").read_text())["model"]["config"]["vocab_size"]
    held = word_ids("heldout", vocab)
    text = {"prompt_len": args.prompt_len, "ids": held[1000 : 1000 + args.prompt_len + args.decode_tokens].tolist()}
    t0 = time.perf_counter()
    trace = calibration_trace(store, vocab)
    print(f"calibration trace: {len(trace)} x {len(trace[0])} tokens of training-split text, {time.perf_counter() - t0:.0f} s")
    hobbit25 = None
    resident = run_policy(store, "resident", 1.0, text)
    print(f"resident (all experts in memory): {resident['tok_s']:.2f} tok/s, peak RSS {resident['peak_rss'] / 2**20:.0f} MiB")
    print(f"routing of the {args.decode_tokens} decoded tokens (held-out text), per layer "
          f"(random routing: switch rate {1 - 8 / 64:.2f} for top-8 of 64; moe-lm, trained, reuse lift 1.76):")
    print(format_stats([LayerRouting(**r) for r in resident["routing"]]))
    for fraction in (float(x) for x in args.budgets.split(",")):
        t0 = time.perf_counter()
        tuned = tuned_overrides(trace, store, fraction, policies)
        for name, t in tuned.items():
            print(f"{name} @ {fraction:.0%}: weights (lru, lfu, lhu, fld) = {t['weights']}, fp16 pool = "
                  f"{t['high_fraction']:.3g} of the budget (tuned on the calibration trace, {time.perf_counter() - t0:.0f} s)")
        rows = {name: run_policy(store, name, fraction, text, tuned.get(name), args.read_mbps) for name in policies}
        lru = rows.get("lru-fp16")
        r0 = next(iter(rows.values()))
        print(f"\nbudget {fraction:.0%} = {r0['budget'] / 2**20:.0f} MiB; resident (non-expert) weights in memory "
              f"{r0['resident'] / 2**20:.0f} MiB; idle interpreter {base_rss / 2**20:.0f} MiB")
        head = (f"{'policy':<14} {'tok/s':>6} {'xLRU':>5} {'TTFT ms':>8} {'hit':>5} {'MB/tok':>7} {'MB/s':>5} {'bound tok/s':>11} "
                f"{'% bound':>7} {'hi/lo/skip':>14} {'peak RSS MiB':>12} {'RSS/(budget+res+idle)':>21}")
        print(head)
        print("-" * len(head))
        for name, r in rows.items():
            bound = r["bandwidth"] * 1e6 / r["bytes_per_token"] if r["bytes_per_token"] else float("inf")
            limit = r["budget"] + r["resident"] + base_rss
            print(f"{name:<14} {r['tok_s']:6.2f} {r['tok_s'] / lru['tok_s'] if lru else float('nan'):5.2f} "
                  f"{r['ttft_ms']:8.0f} {r['hit']:5.2f} {r['bytes_per_token'] / 1e6:7.1f} {r['bandwidth']:5.0f} {bound:11.2f} "
                  f"{r['tok_s'] / bound:7.0%} {'/'.join(f'{x:.2f}' for x in r['split']):>14} "
                  f"{r['peak_rss'] / 2**20:12.0f} {r['peak_rss'] / limit:21.2f}")
        if fraction == 0.25 and "hobbit" in rows:
            hobbit25 = rows["hobbit"]
        if "hobbit" in rows and lru:
            h = rows["hobbit"]
            bound = h["bandwidth"] * 1e6 / h["bytes_per_token"] if h["bytes_per_token"] else float("inf")
            print(f"hobbit: {h['tok_s'] / lru['tok_s']:.2f}x lru-fp16 (goal >= 3x at 25%), {h['tok_s'] / bound:.0%} of its "
                  f"bandwidth bound (goal >= 70%), peak RSS {h['peak_rss'] / (h['budget'] + h['resident'] + base_rss):.2f}x "
                  f"budget + resident + idle interpreter (goal <= 1.10)")
            # DESIGN's limit model: time/token >= bytes read / bandwidth + compute (the resident run's time/token).
            limit = 1 / (h["bytes_per_token"] / (h["bandwidth"] * 1e6) + 1 / resident["tok_s"])
            print(f"hobbit vs the limit model (reads at the cold bandwidth + the resident run's compute, "
                  f"{limit:.2f} tok/s): {h['tok_s'] / limit:.0%}")
    if args.llama_python:
        llama_side_by_side(args, store, resident, hobbit25)




def llama_side_by_side(args, store: Path, resident: dict, hobbit25: dict | None) -> None:
    """llama.cpp on the same weights (F16 GGUF): fully resident, then in a cgroup whose memory limit
    is its own anonymous memory + the non-expert weights + 25% of the expert bytes."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_moe_llamacpp import make_cgroup, run_llama
    from gguf import GGUFReader

    from edgeopt.moe.gguf_export import export_gguf_qwen3_moe

    gguf_path = store.parent / "model-f16.gguf"
    if not gguf_path.is_file():
        export_gguf_qwen3_moe(store.parent / "checkpoint", gguf_path)
    reader = GGUFReader(str(gguf_path))
    expert_bytes = sum(int(t.n_bytes) for t in reader.tensors if "_exps" in t.name)
    other_bytes = sum(int(t.n_bytes) for t in reader.tensors if "_exps" not in t.name)
    del reader
    from edgeopt.moe.corpus import word_ids

    vocab = json.loads((store / "store.json").read_text())["model"]["config"]["vocab_size"]
    seq = word_ids("heldout", vocab)[1000 : 1000 + args.prompt_len + args.decode_tokens + 1].tolist()
    cfg = {"gguf": str(gguf_path), "n_ctx": len(seq) + 8, "seqs": [seq], "prompt_len": args.prompt_len, "logits": False}
    drop_page_cache([gguf_path])
    full = run_llama(args.llama_python, cfg)
    tok_full = full["tokens"] / sum(full["decode_s"])
    print(f"\nllama.cpp F16 GGUF ({gguf_path.stat().st_size / 2**30:.2f} GiB, mmapped), 1 thread: resident {tok_full:.2f} tok/s "
          f"vs edgeopt resident {resident['tok_s']:.2f} tok/s (edgeopt/llama.cpp {resident['tok_s'] / tok_full:.2f}x)")
    # Everything llama.cpp kept in memory fully resident (anonymous + file pages: library code and the
    # mapped GGUF), less the 75% of the expert bytes that do not fit the budget.
    limit = full["rss_anon"] + full["rss_file"] - expert_bytes + int(0.25 * expert_bytes)
    procs, how = make_cgroup(limit)
    drop_page_cache([gguf_path])
    try:
        lim = run_llama(args.llama_python, cfg | {"cgroup_procs": str(procs)})
    finally:
        procs.parent.rmdir()
    tok_lim = lim["tokens"] / sum(lim["decode_s"])
    line = (f"llama.cpp under {how} = {limit / 2**20:.0f} MiB (its resident-run RSS "
            f"{(full['rss_anon'] + full['rss_file']) / 2**20:.0f} MiB, non-expert weights {other_bytes / 2**20:.0f} MiB, less 75% of "
            f"{expert_bytes / 2**30:.2f} GiB experts): {tok_lim:.2f} tok/s")
    if hobbit25:
        line += f"; edgeopt hobbit at 25%: {hobbit25['tok_s']:.2f} tok/s -> {hobbit25['tok_s'] / tok_lim:.2f}x (goal >= 2x)"
    print(line)


if __name__ == "__main__":
    main()
