"""`edgeopt moe run` for a new user: text prompts on HF stores, every bad option in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from edgeopt.cli import cli
from edgeopt.models.moe import MoEConfig, MoELM

CFG = MoEConfig(d_model=32, n_layers=2, n_heads=4, n_experts=4, d_ff=64)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from click.testing import CliRunner

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("moe")
    state = {k: v.half().contiguous() for k, v in MoELM(CFG).state_dict().items()}
    save_file(state, str(d / "m.safetensors"), metadata={"config": json.dumps(CFG.to_dict())})
    result = CliRunner().invoke(cli, ["moe", "pack", str(d / "m.safetensors"), str(d / "store")])
    assert result.exit_code == 0, result.output
    return d / "store"


def _one_line_error(result, pattern: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and pattern in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("args", "pattern"), [
    (["--budget-fraction", "nan"], "--budget-fraction must be in (0, 1]"),
    (["--budget-fraction", "inf"], "--budget-fraction must be in (0, 1]"),
    (["--budget-fraction", "2"], "--budget-fraction must be in (0, 1]"),
    (["--budget-fraction", "0"], "--budget-fraction must be in (0, 1]"),
    (["--budget-mb", "-1"], "--budget-mb must be a positive number"),
    (["--budget-mb", "nan"], "--budget-mb must be a positive number"),
    (["--budget-mb", "4", "--budget-fraction", "0.5"], "give one cache budget, not --budget-fraction and --budget-mb"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt-ids", "1 2"], "--prompt-ids is for HF stores"),
])  # fmt: skip
def test_bad_run_options(cli_runner, store, args, pattern):
    _one_line_error(cli_runner.invoke(cli, ["moe", "run", str(store), "--tokens", "2", *args]), pattern)


def test_negative_tokens_is_a_usage_error(cli_runner, store):
    result = cli_runner.invoke(cli, ["moe", "run", str(store), "--tokens", "-1"])
    assert result.exit_code == 2 and "-1 is not in the range" in result.output


def test_budget_mb_alone_runs(cli_runner, store):
    result = cli_runner.invoke(cli, ["moe", "run", str(store), "--tokens", "3", "--budget-mb", "0.05", "--prompt", "ab"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ab") and "hit rate" in result.output


def test_pack_into_unwritable_out(cli_runner, store, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = store.parent / "m.safetensors"
    _one_line_error(cli_runner.invoke(cli, ["moe", "pack", str(model), str(blocker / "store")]), "cannot write to")


# -- Hugging Face stores ------------------------------------------------------------------------
WORDS = ["[UNK]", "<s>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]


def _tiny_hf(directory):
    transformers = pytest.importorskip("transformers")  # only these tests need the [hf] extra
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = transformers.MixtralConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                                        eos_token_id=None, bos_token_id=1, pad_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))


def test_hf_store_takes_a_text_prompt(cli_runner, tmp_path):
    _tiny_hf(tmp_path / "hf")
    packed = cli_runner.invoke(cli, ["moe", "pack", str(tmp_path / "hf"), str(tmp_path / "store")])
    assert packed.exit_code == 0, packed.output
    result = cli_runner.invoke(cli, ["moe", "run", str(tmp_path / "store"), "--prompt", "the cat sat", "--tokens", "4"])
    assert result.exit_code == 0, result.output
    words = result.output.splitlines()[0].split()
    assert words[:3] == ["the", "cat", "sat"] and len(words) == 7 and set(words) <= set(WORDS)
    by_ids = cli_runner.invoke(cli, ["moe", "run", str(tmp_path / "store"), "--prompt-ids", "2 3 4", "--tokens", "4"])
    assert by_ids.exit_code == 0
    ids = [int(t) for t in by_ids.output.splitlines()[0].split()]
    assert [WORDS[i] for i in ids] == words  # the same greedy continuation
    _one_line_error(cli_runner.invoke(cli, ["moe", "run", str(tmp_path / "store"), "--prompt-ids", "2 99"]),
                    "token id 99 is outside the model's vocabulary (0..9)")
    (tmp_path / "hf" / "tokenizer.json").unlink()
    _one_line_error(cli_runner.invoke(cli, ["moe", "run", str(tmp_path / "store"), "--prompt", "the cat"]),
                    "no tokenizer.json")


def test_hf_pickle_checkpoint_is_refused(cli_runner, tmp_path):
    _tiny_hf(tmp_path / "hf")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for weights in (tmp_path / "hf").glob("*.safetensors"):
        weights.unlink()
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    result = cli_runner.invoke(cli, ["moe", "pack", str(tmp_path / "hf"), str(tmp_path / "store")])
    _one_line_error(result, "no safetensors weights")
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())
