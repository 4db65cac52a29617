"""RGB–IR detection data: the three layouts agree, bad input fails in one line, the synthetic set is seeded."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from rgbt_fixtures import CLASSES, H, W, make_pairs, write_coco, write_llvip, write_yolo

from edgeopt.cli import cli
from edgeopt.data import DATASETS, load_dataset
from edgeopt.data.detection import DetectionSplits
from edgeopt.data.rgbt import rgbt_synthetic
from edgeopt.data.synthetic_rgbt import CLASS_NAMES, generate_split
from edgeopt.errors import InputError

SIZE = 40  # fixtures are 80x64: scale 0.5, padded at the bottom


@pytest.fixture
def pairs():
    return make_pairs()


def _load(path, **kwargs) -> DetectionSplits:
    return load_dataset("rgbt", path=str(path), size=SIZE, calib_fraction=0.0, **kwargs)


def test_layouts_load_to_the_same_boxes(tmp_path, pairs):
    sets = {
        "llvip": _load(write_llvip(tmp_path / "llvip", pairs), class_names=CLASSES),  # VOC names sort otherwise
        "yolo": _load(write_yolo(tmp_path / "yolo", pairs)),
        "yolo-visible": _load(write_yolo(tmp_path / "yolo2", pairs, "visible", "infrared")),
        "coco": _load(write_coco(tmp_path / "coco", pairs)),
    }
    for name, data in sets.items():
        assert data.class_names == CLASSES, name
        for split_name, split in (("train", data.train), ("test", data.eval)):
            expected = [p for p in pairs if p.split == split_name]
            assert split.names == [p.stem for p in expected], name
            assert split.images.shape == (len(expected), 4, SIZE, SIZE) and split.images.dtype == torch.uint8
            assert split.scales == [0.5] * len(expected)
            for p, boxes, labels in zip(expected, split.boxes, split.labels, strict=True):
                np.testing.assert_allclose(boxes, p.boxes * 0.5, atol=1e-3, err_msg=name)
                np.testing.assert_array_equal(labels, p.labels)
    # Lossless layouts (PNG) give identical pixels; the letterbox pads below the 40x32 image.
    assert torch.equal(sets["yolo"].eval.images, sets["coco"].eval.images)
    ir = np.asarray(Image.fromarray(make_pairs()[2].ir).resize((SIZE, SIZE * H // W), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(sets["coco"].eval.images[0, 3, : SIZE * H // W].numpy(), ir)
    assert (sets["coco"].eval.images[:, :, SIZE * H // W :] == 114).all()
    # JPEG is lossy but close.
    diff = (sets["llvip"].eval.images.float() - sets["coco"].eval.images.float()).abs().mean()
    assert diff < 20


def test_calib_is_carved_from_train_with_a_seed(tmp_path, pairs):
    root = write_yolo(tmp_path / "yolo", pairs)
    a = load_dataset("rgbt", path=str(root), size=SIZE, calib_fraction=0.5, seed=1)
    b = load_dataset("rgbt", path=str(root), size=SIZE, calib_fraction=0.5, seed=1)
    assert len(a.train) == len(a.calib) == 1 and a.calib.names == b.calib.names
    assert sorted(a.train.names + a.calib.names) == ["a001", "a002"]


def test_bands_zero_the_other_band(tmp_path, pairs):
    root = write_coco(tmp_path / "coco", pairs)
    fused, rgb, ir = (_load(root, bands=b).eval.images for b in ("rgbt", "rgb", "ir"))
    assert (rgb[:, 3] == 0).all() and torch.equal(rgb[:, :3], fused[:, :3])
    assert (ir[:, :3] == 0).all() and torch.equal(ir[:, 3], fused[:, 3])


def test_sixteen_bit_ir_is_stretched_to_eight(tmp_path, pairs):
    root = write_yolo(tmp_path / "yolo", pairs)
    raw = np.tile(np.linspace(1000, 9000, W, dtype=np.uint16), (H, 1))  # a 16-bit thermal frame, a ramp
    Image.fromarray(raw).save(root / "imagesIR" / "test" / "b001.png")
    ir = load_dataset("rgbt", path=str(root), size=W).eval.images[0, 3, :H].numpy()
    assert ir[:, 0].max() == 0 and ir[:, -1].min() == 255 and (np.diff(ir[0].astype(int)) >= 0).all()


def test_empty_label_file_is_an_image_without_objects(tmp_path, pairs):
    data = _load(write_yolo(tmp_path / "yolo", pairs))
    assert data.eval.names[1] == "b002" and data.eval.boxes[1].shape == (0, 4) and data.eval.labels[1].shape == (0,)


def test_label_source_picks_the_band_annotations(tmp_path, pairs):
    root = write_coco(tmp_path / "coco", pairs)
    shutil.move(root / "annotations" / "test.json", root / "annotations" / "test_ir.json")
    rgb_only = [p for p in pairs if p.split == "test"]
    rgb_only[0].boxes = rgb_only[0].boxes[:1]
    rgb_only[0].labels = rgb_only[0].labels[:1]
    write_coco(tmp_path / "rgbcoco", rgb_only)
    shutil.copy(tmp_path / "rgbcoco" / "annotations" / "test.json", root / "annotations" / "test_rgb.json")
    assert len(_load(root).eval.boxes[0]) == 2
    assert len(_load(root, label_source="rgb").eval.boxes[0]) == 1


# -- bad input: one line naming the file, exit 2 through the CLI ------------------------
def _break_missing_ir(root):
    (root / "imagesIR" / "train" / "a002.png").unlink()
    return "a002.png"


def _break_pair_size(root):
    Image.new("RGB", (W + 2, H)).save(root / "imagesIR" / "test" / "b001.png")
    return "b001.png"


def _break_label_line(root):
    (root / "labels" / "train" / "a001.txt").write_text("0 0.5 0.5 0.1 0.1\n1 0.5 oops 0.1\n")
    return "a001.txt:2"


def _break_class_id(root):
    (root / "labels" / "train" / "a002.txt").write_text("7 0.5 0.5 0.1 0.1\n")
    return "a002.txt:1"


def _break_box_outside(root):
    (root / "labels" / "test" / "b001.txt").write_text("0 0.5 0.5 0.1 0.1\n1 0.95 0.5 0.3 0.2\n")
    return "b001.txt:2"


@pytest.mark.parametrize("breaker", [_break_missing_ir, _break_pair_size, _break_label_line, _break_class_id, _break_box_outside])
def test_bad_yolo_input_is_one_line_naming_the_file(tmp_path, pairs, cli_runner, breaker):
    root = write_yolo(tmp_path / "yolo", pairs)
    where = breaker(root)
    with pytest.raises(InputError) as exc:
        _load(root)
    assert where in str(exc.value) and "\n" not in str(exc.value)
    before = sorted(p for p in tmp_path.rglob("*"))
    result = cli_runner.invoke(cli, ["datasets", "check", str(root)])
    assert result.exit_code == 2, result.output
    assert where in result.output.strip().splitlines()[-1]
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written


def test_bad_llvip_xml(tmp_path, pairs, cli_runner):
    root = write_llvip(tmp_path / "llvip", pairs)
    (root / "Annotations" / "a001.xml").write_text("<annotation><object><name>person</name>")
    with pytest.raises(InputError, match=r"a001\.xml: malformed XML"):
        _load(root)
    (root / "Annotations" / "a001.xml").write_text(
        "<annotation><object><name>person</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
        f"<xmax>{W + 5}</xmax><ymax>9</ymax></bndbox></object></annotation>"
    )
    with pytest.raises(InputError, match=r"a001\.xml: box .* outside the 80x64 image"):
        _load(root)
    (root / "infrared" / "test" / "b002.jpg").unlink()
    result = cli_runner.invoke(cli, ["datasets", "check", str(root), "--layout", "llvip"])
    assert result.exit_code == 2 and "a001.xml" in result.output and "b002.jpg: RGB image has no IR pair" in result.output


def test_bad_coco_pair(tmp_path, pairs):
    root = write_coco(tmp_path / "coco", pairs)
    (root / "infrared" / "train" / "a001.png").unlink()
    with pytest.raises(InputError, match=r"a001\.png: RGB image has no IR pair"):
        _load(root)
    (root / "annotations" / "train.json").write_text("{not json")
    with pytest.raises(InputError, match=r"train\.json: malformed COCO json"):
        _load(root)


def test_datasets_check_counts_and_list(tmp_path, pairs, cli_runner):
    root = write_yolo(tmp_path / "yolo", pairs)
    result = cli_runner.invoke(cli, ["datasets", "check", str(root)])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in result.output.splitlines()
            if line.count("│") > 5 and line.split("│")[1].strip() in ("train", "test")}
    # pairs, objects, empty images, person, car, sizes
    assert rows["train"][:5] == ["2", "3", "0", "1", "2"] and rows["test"][:5] == ["2", "2", "1", "2", "0"]
    assert "80x64 (2)" in rows["test"][5]
    listed = cli_runner.invoke(cli, ["datasets", "list"])
    assert listed.exit_code == 0 and all(n in listed.output for n in ("rgbt-synthetic", "rgbt", "digits", "llvip", "coco"))
    missing = cli_runner.invoke(cli, ["datasets", "check", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not found" in missing.output


# -- synthetic set ---------------------------------------------------------------------
def test_synthetic_is_seeded_and_split_independent():
    a, b = generate_split("eval", 6, size=128, seed=3), generate_split("eval", 6, size=128, seed=3)
    assert torch.equal(a.images, b.images) and a.names == b.names
    assert all(np.array_equal(x, y) for x, y in zip(a.boxes, b.boxes, strict=True))
    other = generate_split("eval", 6, size=128, seed=4)
    assert not torch.equal(a.images, other.images)
    longer = generate_split("eval", 8, size=128, seed=3)  # scene i depends on (seed, split, i) only
    assert torch.equal(longer.images[:6], a.images)


def test_synthetic_scenes_are_valid_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEOPT_CACHE", str(tmp_path))
    data = load_dataset("rgbt-synthetic", n_train=24, n_calib=4, n_eval=8, seed=1)
    assert data.class_names == CLASS_NAMES and data.num_classes == 3
    assert data.train.images.shape == (24, 4, 256, 256) and data.train.images.dtype == torch.uint8
    assert len(list(tmp_path.glob("rgbt-synthetic-*.npz"))) == 1
    again = load_dataset("rgbt-synthetic", n_train=24, n_calib=4, n_eval=8, seed=1)  # from the cache
    assert torch.equal(again.train.images, data.train.images) and again.train.names == data.train.names
    assert all(np.array_equal(x, y) for x, y in zip(again.eval.boxes, data.eval.boxes, strict=True))
    conditions = {n.rsplit("_", 1)[1] for n in data.train.names}
    assert conditions <= {"normal", "night", "haze", "crossover"} and len(conditions) >= 3
    for split in (data.train, data.calib, data.eval):
        for boxes, labels in zip(split.boxes, split.labels, strict=True):
            assert boxes.dtype == np.float32 and labels.dtype == np.int64 and len(boxes) == len(labels) >= 1
            assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 256).all() and (boxes[:, 2:] > boxes[:, :2]).all()
            side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
            assert side.min() >= 8 and side.max() <= 64
    ir_only = load_dataset("rgbt-synthetic", n_train=24, n_calib=4, n_eval=8, seed=1, bands="ir")
    assert (ir_only.eval.images[:, :3] == 0).all() and torch.equal(ir_only.eval.images[:, 3], data.eval.images[:, 3])


def test_synthetic_conditions_hide_one_band():
    """Night/haze flatten RGB object contrast, crossover flattens IR: measured in the boxes vs around them."""
    split = generate_split("train", 80, size=256, seed=0)
    contrast: dict[str, list[tuple[float, float]]] = {}
    for image, boxes, name in zip(split.images.float().numpy(), split.boxes, split.names, strict=True):
        for x1, y1, x2, y2 in boxes.astype(int):
            inside = image[:, y1:y2, x1:x2].reshape(4, -1).mean(1)
            ring = image[:, max(0, y1 - 4) : y2 + 4, max(0, x1 - 4) : x2 + 4].reshape(4, -1).mean(1)
            rgb_c, ir_c = np.abs(inside[:3] - ring[:3]).max(), abs(inside[3] - ring[3])
            contrast.setdefault(name.rsplit("_", 1)[1], []).append((rgb_c, ir_c))
    med = {k: np.median(np.asarray(v), axis=0) for k, v in contrast.items()}
    assert med["night"][0] < 0.25 * med["normal"][0] and med["haze"][0] < 0.25 * med["normal"][0]
    assert med["crossover"][1] < 0.25 * med["night"][1] and med["crossover"][0] > 0.5 * med["normal"][0]


def test_synthetic_written_as_yolo_pairs_loads_back(tmp_path):
    from edgeopt.data.synthetic_rgbt import main

    main(["--out", str(tmp_path / "set"), "--size", "96", "--n-train", "3", "--n-calib", "2", "--n-eval", "3", "--seed", "5"])
    original = load_dataset("rgbt-synthetic", size=96, n_train=3, n_calib=2, n_eval=3, seed=5, cache=False)
    loaded = load_dataset("rgbt", path=str(tmp_path / "set"), size=96)
    assert loaded.class_names == CLASS_NAMES
    for a, b in ((original.train, loaded.train), (original.calib, loaded.calib), (original.eval, loaded.eval)):
        assert a.names == b.names and torch.equal(a.images, b.images)
        for x, y in zip(a.boxes, b.boxes, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-3)


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(InputError, match="bands"):
        load_dataset("rgbt-synthetic", n_train=1, n_calib=1, n_eval=1, bands="uv", cache=False)
    with pytest.raises(InputError, match="rejected its arguments"):
        load_dataset("rgbt-synthetic", colour="red")
    assert DATASETS.get("rgbt-synthetic") is rgbt_synthetic
