"""`edgeopt moe pack / run / bench` end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from edgeopt.errors import InputError
from edgeopt.models.moe import MoEConfig, MoELM
from edgeopt.moe.bench import format_table, run_bench
from edgeopt.moe.cli import moe

CFG = MoEConfig(d_model=64, n_layers=3, n_heads=4, n_experts=4, d_ff=128)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("moe")
    state = {k: v.half().contiguous() for k, v in MoELM(CFG).state_dict().items()}
    save_file(state, str(d / "m.safetensors"), metadata={"config": json.dumps(CFG.to_dict())})
    return d / "m.safetensors"


def test_pack_run_and_errors(checkpoint, tmp_path):
    runner = CliRunner()
    store = tmp_path / "store"
    result = runner.invoke(moe, ["pack", str(checkpoint), str(store)])
    assert result.exit_code == 0, result.output
    assert "packed 12 experts x 3 precisions" in result.output
    result = runner.invoke(moe, ["run", str(store), "--prompt", "import os", "--tokens", "6", "--policy", "hobbit"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("import os") and "hit rate" in result.output
    result = runner.invoke(moe, ["run", str(tmp_path / "nowhere")])
    assert isinstance(result.exception, InputError)
    result = runner.invoke(moe, ["pack", str(tmp_path / "missing.safetensors"), str(store)])
    assert isinstance(result.exception, InputError)
    assert "--budget-fraction" in runner.invoke(moe, ["bench", "--help"]).output


def test_bench_reports_every_policy(checkpoint, tmp_path):
    from edgeopt.moe.offload import pack

    store = pack(checkpoint, tmp_path / "store")
    results, info = run_bench(store, None, 0.25, n_prompts=1, prompt_len=8, decode_tokens=6, calib_sequences=1)
    by = {r.policy: r for r in results}
    assert set(by) == {"resident", "lru-fp16", "all-low", "static-hot", "hobbit", "hobbit-noprefetch", "hobbit-highpool", "hobbit-strict"}
    assert by["resident"].hit_rate == 1.0 and by["resident"].bytes_per_token == 0
    assert by["lru-fp16"].bytes_per_token > 0 and by["lru-fp16"].perplexity == pytest.approx(by["resident"].perplexity, rel=1e-4)
    assert by["all-low"].high_low_skip[0] == 0
    assert all(r.peak_cache_bytes <= r.budget_bytes for r in results if r.policy != "resident")
    table = format_table(results, info)
    assert "hobbit" in table and "xLRU" in table
