"""Streaming pack: sharded checkpoints, a memory cap, refused configs and integrity errors (one line, exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from edgeopt.cli import cli as cli_main  # noqa: E402
from edgeopt.moe.offload import OffloadedLM, pack  # noqa: E402
from edgeopt.moe.store import ExpertStore  # noqa: E402
from edgeopt.moe.synth import write_random_checkpoint  # noqa: E402

TINY = dict(model_type="mixtral", vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=64)


def _manifest(store: Path) -> dict:
    return json.loads((store / "store.json").read_text())


def test_sharded_checkpoint_packs_to_the_same_store_as_one_file(tmp_path):
    sharded = write_random_checkpoint(TINY, tmp_path / "sharded", shard_bytes=20_000)
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 10
    assert len(list(sharded.glob("model-*.safetensors"))) >= 3
    single = tmp_path / "single"
    single.mkdir()
    state = {}
    for f in sharded.glob("model-*.safetensors"):
        state |= load_file(str(f))
    save_file(state, str(single / "model.safetensors"))
    (single / "config.json").write_text((sharded / "config.json").read_text())
    a, b = pack(sharded, tmp_path / "a", ("fp16", "int4")), pack(single, tmp_path / "b", ("fp16", "int4"))
    assert _manifest(a)["crc32"] == _manifest(b)["crc32"]
    assert (a / "experts.safetensors").read_bytes() == (b / "experts.safetensors").read_bytes()
    ra, rb = load_file(str(a / "resident.safetensors")), load_file(str(b / "resident.safetensors"))
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)
    # ...and the store runs: the same logits as transformers loading the sharded checkpoint itself.
    model = transformers.AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    lm = OffloadedLM(a, "lru-fp16", budget_fraction=0.3)
    got, _ = lm(ids)
    lm.close()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from edgeopt.moe.packer import pack_checkpoint
    from edgeopt.moe.synth import write_random_checkpoint
    src, tmp = Path(sys.argv[1]), Path(sys.argv[2])
    pack_checkpoint(Path(sys.argv[3]), tmp / "warm", ("fp16",))  # imports and first-use allocations
    def rss():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = rss()
    report = pack_checkpoint(src, tmp / "store", ("fp16",))
    hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
    print(json.dumps({"before": before, "hwm": hwm, "ckpt": report.checkpoint_bytes, "resident": report.resident_bytes}))
""")


CAP = 24 << 20  # extra peak RSS allowed for packing (the checkpoint is twice that)


def test_packing_a_checkpoint_larger_than_the_cap_stays_under_it(tmp_path):
    """A ~50 MiB checkpoint packs with at most 24 MiB of extra peak RSS (measured: ~13-16 MiB for 100 MiB)."""
    big = dict(TINY, hidden_size=256, intermediate_size=1024, num_local_experts=8, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=4)
    src = write_random_checkpoint(big, tmp_path / "big", shard_bytes=32 << 20)
    warm = write_random_checkpoint(TINY, tmp_path / "warm-src")
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(src), str(tmp_path), str(warm)],
                         capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    cap = CAP
    assert m["ckpt"] > 2 * CAP
    print(f"pack peak RSS growth {(m['hwm'] - m['before']) >> 20} MiB for a {m['ckpt'] >> 20} MiB checkpoint")
    assert m["hwm"] - m["before"] <= cap, f"packing took {(m['hwm'] - m['before']) >> 20} MiB over {int(cap) >> 20} MiB"
    store = ExpertStore(tmp_path / "store")
    assert store.n_layers == 4 and store.n_experts == 8
    store.close()


def _one_line_exit_2(args: list[str]) -> str:
    result = CliRunner().invoke(cli_main, args)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize("change,message", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantized (fp8)"),
    ({"model_type": "jamba"}, "unsupported model type 'jamba'"),
])
def test_refused_configs_are_one_line(tmp_path, change, message):
    src = write_random_checkpoint(TINY, tmp_path / "m")
    config = json.loads((src / "config.json").read_text()) | change
    (src / "config.json").write_text(json.dumps(config))
    assert message in _one_line_exit_2(["moe", "pack", str(src), str(tmp_path / "store")])
    assert not (tmp_path / "store" / "store.json").exists()


def test_expert_sizes_that_differ_by_layer_are_refused(tmp_path):
    src = write_random_checkpoint(TINY, tmp_path / "m")
    for shard in src.glob("model-*.safetensors"):
        state = load_file(str(shard))
        for k in [k for k in state if k.startswith("model.layers.2.block_sparse_moe.experts.")]:
            state[k] = (state[k][:32] if k.endswith(("w1.weight", "w3.weight")) else state[k][:, :32]).contiguous()
        save_file(state, str(shard))
    line = _one_line_exit_2(["moe", "pack", str(src), str(tmp_path / "store")])
    assert "expert sizes differ by layer" in line
    assert not (tmp_path / "store" / "experts.safetensors").exists()
    assert not list((tmp_path / "store").glob("*.tmp"))


def test_fp8_checkpoint_is_refused(tmp_path):
    src = write_random_checkpoint(TINY, tmp_path / "m")
    shard = next(src.glob("model-*.safetensors"))
    state = load_file(str(shard))
    name = next(k for k in state if ".experts.0.w1" in k)
    state[name] = state[name].to(torch.float8_e4m3fn)
    save_file(state, str(shard))
    assert "F8_E4M3" in _one_line_exit_2(["moe", "pack", str(src), str(tmp_path / "store")])


def test_integrity_errors_are_one_line(tmp_path):
    store = pack(write_random_checkpoint(TINY, tmp_path / "m"), tmp_path / "store", ("fp16", "int4"))
    line = _one_line_exit_2(["moe", "run", str(store), "--prompt-ids", "3 5 97", "--tokens", "2"])
    assert "token id 97 is outside the model's vocabulary (0..96)" in line
    assert "must not be negative" in _one_line_exit_2(["moe", "run", str(store), "--prompt-ids", "3 -1", "--tokens", "2"])
    resident = store / "resident.safetensors"
    data = bytearray(resident.read_bytes())
    data[-3] ^= 0x10  # one flipped bit in a weight
    resident.write_bytes(bytes(data))
    assert "corrupted resident weights" in _one_line_exit_2(["moe", "run", str(store), "--prompt-ids", "3 5", "--tokens", "2"])
