"""Bring your own: image-folder data, a `module:factory` dataset, a board described in a YAML file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from edgeopt.cli import cli
from edgeopt.data import load_dataset
from edgeopt.errors import InputError

FAST = ["--runs", "3", "--min-seconds", "0", "--warmup", "1"]


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory) -> Path:
    """scikit-learn's digits written as PNG files in the ImageFolder layout, with the digits
    dataset's own train / calibration / eval split (so accuracies can be compared)."""
    from edgeopt.data.digits_png import write_digits

    return write_digits(tmp_path_factory.mktemp("digits-png"))


def test_imagefolder_reads_the_same_pixels_as_the_built_in_digits(digit_folders):
    from edgeopt.data.digits import _raw, _split_indices

    ours = load_dataset("imagefolder", path=str(digit_folders), size=8, channels=1, flatten=True)
    reference = load_dataset("digits", flatten=True)
    labels = _raw()[1]
    assert ours.num_classes == 10
    pairs = zip((ours.train, ours.calib, ours.eval), (reference.train, reference.calib, reference.eval), strict=True)
    for (mine, theirs), indices in zip(pairs, _split_indices(labels, 0), strict=True):
        # the folder is read class by class, files by name (= original index)
        order = torch.tensor(sorted(range(len(indices)), key=lambda k: (labels[indices[k]], indices[k])))
        assert torch.equal(mine.y, theirs.y[order])
        assert torch.allclose(mine.x, theirs.x[order], atol=1 / 255 + 1e-6, rtol=0)  # 8-bit PNG rounding


def test_imagefolder_holds_out_calibration_when_there_is_no_calib_folder(digit_folders, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(digit_folders / "train", root / "train")
    shutil.copytree(digit_folders / "val", root / "val")
    splits = load_dataset("imagefolder", path=str(root), size=16, channels=3, calib_fraction=0.2)
    assert splits.train.x.shape[1:] == (3, 16, 16)
    assert len(splits.train) + len(splits.calib) == len(list((root / "train").rglob("*.png")))
    assert 0.15 < len(splits.calib) / (len(splits.train) + len(splits.calib)) < 0.25
    assert set(splits.calib.y.tolist()) == set(range(10))  # every class held out


def test_imagefolder_errors_are_one_line(digit_folders, tmp_path):
    import shutil

    with pytest.raises(InputError, match="train not found"):
        load_dataset("imagefolder", path=str(tmp_path))
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "a.png").write_bytes(b"not a png")
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(InputError, match="cannot read image .*a.png: not an image Pillow can decode"):
        load_dataset("imagefolder", path=str(tmp_path))
    (tmp_path / "train" / "cat" / "a.png").unlink()
    with pytest.raises(InputError, match="no images in .*train"):
        load_dataset("imagefolder", path=str(tmp_path))
    shutil.copy(next((digit_folders / "train").rglob("*.png")), tmp_path / "train" / "cat" / "b.png")
    (tmp_path / "val" / "dog").mkdir()
    with pytest.raises(InputError, match="classes not in train: dog"):
        load_dataset("imagefolder", path=str(tmp_path), channels=1)


def test_optimize_on_an_image_folder(cli_runner, root, digit_folders, tmp_path):
    recipe = yaml.safe_load((root / "targets" / "digits-mlp.yaml").read_text())
    recipe["model"]["checkpoint"] = str(root / recipe["model"]["checkpoint"])
    recipe["dataset"] = {"name": "imagefolder", "kwargs": {"path": str(digit_folders), "size": 8, "channels": 1,
                                                          "flatten": True}}  # fmt: skip
    recipe["passes"] = ["export"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = cli_runner.invoke(cli, ["optimize", str(path), "--profile", "x86-cpu", "--out", str(tmp_path / "r"), *FAST])
    assert result.exit_code == 0, result.output
    steps = json.loads((tmp_path / "r" / "report.json").read_text())["steps"]
    assert steps[0]["accuracy"] >= 0.96 and steps[-1]["accuracy"] == pytest.approx(steps[0]["accuracy"])


MODULE = '''
from edgeopt.data import load_dataset


def small_digits(keep=200):
    full = load_dataset("digits", flatten=True)
    return type(full)(full.train, full.calib, type(full.eval)(full.eval.x[:keep], full.eval.y[:keep]), 10)


def not_splits():
    return [1, 2, 3]
'''


def test_dataset_from_module_factory(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    splits = load_dataset("my_data:small_digits", keep=50)
    assert len(splits.eval) == 50 and splits.train.x.shape[1] == 64
    with pytest.raises(InputError, match="returned list, not edgeopt.data.Splits"):
        load_dataset("my_data:not_splits")
    with pytest.raises(InputError, match="has no dataset factory 'nope'"):
        load_dataset("my_data:nope")
    with pytest.raises(InputError, match="cannot import dataset module 'missing_mod'"):
        load_dataset("missing_mod:f")


# -- one's own board -----------------------------------------------------------------------------
def _board(directory: Path, name: str = "my-board") -> Path:
    from edgeopt.profiles import load_profile

    data = load_profile("rpi5").model_dump(mode="json")
    data.update(name=name, description="a board of my own", memory_mb=2048)
    path = directory / "boards" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_recipe_budgets_accept_a_profile_file(root, tmp_path):
    from edgeopt.pipeline import budgets_for
    from edgeopt.profiles import load_profile
    from edgeopt.recipes import load_recipe

    board = _board(tmp_path)
    recipe = yaml.safe_load((root / "targets" / "digits-mlp.yaml").read_text())
    recipe["budgets"] = {"boards/my-board.yaml": {"max_model_size_mb": 0.5}, "rpi5": {"max_model_size_mb": 2}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(path)  # the key is relative to the recipe
    assert set(loaded.budgets) == {"my-board", "rpi5"}
    assert budgets_for(loaded, load_profile(str(board))).max_model_size_mb == 0.5
    recipe["budgets"] = {"boards/none.yaml": {"max_model_size_mb": 1}}
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(InputError, match="budgets: profile file not found: boards/none.yaml"):
        load_recipe(path)


def test_inventory_accepts_a_profile_file(tmp_path):
    from edgeopt.profiler.cli import _missing_runtimes
    from edgeopt.profiler.inventory import load_inventory

    _board(tmp_path)
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump({"devices": [{"name": "mine", "host": "board.local",
                                                      "profile": "boards/my-board.yaml"}]}))  # fmt: skip
    device = load_inventory(inventory).get("mine")
    assert device.profile == str(tmp_path / "boards" / "my-board.yaml")
    assert _missing_runtimes(device, {"ai-edge-litert": "2.3"}) == ["onnxruntime"]  # the board file was read
