"""Retraining scripts: a new path unless --overwrite, and the same bytes for the same seed."""

from __future__ import annotations

import pytest

from edgeopt import training
from edgeopt.models import train_digits
from edgeopt.moe import train as moe_train

SCRIPTS = {
    "digits-mlp": (training.main, ["--epochs", "2"]),
    "digits-vmamba": (train_digits.main, ["--epochs", "1", "--train-samples", "48"]),
    "moe-lm": (moe_train.main, ["--steps", "2", "--batch", "2", "--seq", "16", "--d-ff", "16", "--d-model", "32"]),
}


@pytest.fixture(autouse=True)
def restore_torch_settings():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_same_seed_same_bytes_and_no_silent_overwrite(name, tmp_path, capsys):
    main, args = SCRIPTS[name]
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    main([*args, "--out", str(first)])
    main([*args, "--out", str(second)])
    assert first.read_bytes() == second.read_bytes()
    before = first.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(first), "--seed", "1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("exists; pass --overwrite to replace it, or choose another --out")
    assert first.read_bytes() == before
    main([*args, "--out", str(first), "--seed", "1", "--overwrite"])
    assert first.read_bytes() != before  # another seed, other weights


def test_default_output_is_not_the_committed_checkpoint():
    import argparse

    from edgeopt.retraining import add_options

    parser = argparse.ArgumentParser()
    add_options(parser, "digits-mlp")
    assert "targets" not in str(parser.parse_args([]).out)
