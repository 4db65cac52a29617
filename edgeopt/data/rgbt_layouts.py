"""Find RGB–IR pairs and their boxes in the directory layouts the public sets use.

A layout reader turns a directory into `Sample`s (paths + boxes in original pixels),
never decoding pixels, so `edgeopt datasets check` can validate a large set quickly;
`edgeopt.data.rgbt` decodes and resizes them. Layouts:

- llvip: `visible/<split>/*.jpg`, `infrared/<split>/*.jpg` (same names), `Annotations/<stem>.xml`
  (Pascal VOC; one file for both bands, so `label_source` has nothing to choose).
- yolo: a data YAML (`data.yaml`, or the one `*.yaml` in the folder, or the YAML given as
  PATH) with `names` and per split the RGB folder (`train: images/train`); the IR folder is
  `<split>_ir` if given, else the RGB path with `images`→`imagesIR`, `visible`→`infrared`,
  `rgb`→`ir` or `vi`→`ir`; labels (`class cx cy w h`, normalized) in `labels/` beside the
  image folder (`images/train` → `labels/train`), or `<split>_labels_ir` / `<split>_labels_rgb`
  when the bands have their own (picked by `label_source`). CFT-style `train_rgb`/`train_ir` keys work too.
- coco: `annotations/<split>.json` (or `instances_<split>.json`; `<split>_ir.json` and
  `<split>_rgb.json` when the bands have their own, picked by `label_source`) whose
  `file_name`s name images in `<rgb>/<split>/` and `<ir>/<split>/`, where the folder pair
  is `visible/infrared` or `images/imagesIR` (the split sub-folder is optional).

Any problem raises `InputError` with one line naming the file (and line for txt);
`collect` mode (for `datasets check`) records problems instead of stopping at the first.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeopt.errors import InputError

LAYOUTS = {
    "llvip": "visible/<split>/*.jpg + infrared/<split>/*.jpg + Annotations/*.xml (Pascal VOC)",
    "yolo": "data YAML + images|visible/<split> + imagesIR|infrared/<split> + labels/<split>/*.txt",
    "coco": "annotations/<split>.json + visible|images/<split> + infrared|imagesIR/<split>",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# RGB folder name → IR folder name, as the fusion repos name them.
BAND_DIRS = (("images", "imagesIR"), ("visible", "infrared"), ("rgb", "ir"), ("vi", "ir"))
LABEL_SOURCES = ("ir", "rgb")


@dataclass
class Sample:
    split: str
    stem: str
    rgb: Path
    ir: Path
    boxes: np.ndarray  # (M, 4) float32 xyxy in original pixels
    labels: np.ndarray  # (M,) int64
    size: tuple[int, int]  # (width, height) of both images


@dataclass
class Scan:
    """What a layout reader found: samples per split, class names, problems (collect mode)."""

    layout: str
    class_names: list[str]
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class _Reader:
    """Shared checks; raises at the first problem unless collecting."""

    def __init__(self, collect: bool) -> None:
        self.collect = collect
        self.problems: list[str] = []

    def fail(self, message: str) -> None:
        if not self.collect:
            raise InputError(message)
        self.problems.append(message)

    def pair_size(self, rgb: Path, ir: Path) -> tuple[int, int] | None:
        """(width, height) shared by the pair, from the headers only."""
        from PIL import Image, UnidentifiedImageError

        sizes = []
        for path in (rgb, ir):
            try:
                with Image.open(path) as im:
                    sizes.append(im.size)
            except (OSError, UnidentifiedImageError) as exc:
                self.fail(f"{path}: not a readable image ({exc.__class__.__name__})")
                return None
        if sizes[0] != sizes[1]:
            self.fail(f"{ir}: IR image is {sizes[1][0]}x{sizes[1][1]} but its RGB pair {rgb.name} is {sizes[0][0]}x{sizes[0][1]}")
            return None
        return sizes[0]

    def check_boxes(self, where: str, boxes: np.ndarray, size: tuple[int, int]) -> bool:
        w, h = size
        tol = 1e-3 * max(w, h)  # rounding of normalized coordinates
        for x1, y1, x2, y2 in boxes:
            if not (x2 > x1 and y2 > y1):
                self.fail(f"{where}: empty box ({x1:g}, {y1:g}, {x2:g}, {y2:g})")
                return False
            if x1 < -tol or y1 < -tol or x2 > w + tol or y2 > h + tol:
                self.fail(f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {w}x{h} image")
                return False
        return True

    def pairs(self, rgb_dir: Path, ir_dir: Path) -> list[tuple[str, Path, Path]]:
        """(stem, rgb, ir) for every RGB image; an RGB image without its IR pair is a problem."""
        if not rgb_dir.is_dir():
            self.fail(f"{rgb_dir}: RGB image folder not found")
            return []
        if not ir_dir.is_dir():
            self.fail(f"{ir_dir}: IR image folder not found")
            return []
        ir_by_stem = {p.stem: p for p in ir_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        out = []
        for rgb in sorted(p for p in rgb_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            ir = ir_by_stem.pop(rgb.stem, None)
            if ir is None:
                self.fail(f"{rgb}: RGB image has no IR pair in {ir_dir}")
                continue
            out.append((rgb.stem, rgb, ir))
        for stem in sorted(ir_by_stem):
            self.fail(f"{ir_by_stem[stem]}: IR image has no RGB pair in {rgb_dir}")
        return out


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)


# -- LLVIP / Pascal VOC ---------------------------------------------------------
def _voc_objects(path: Path) -> list[tuple[str, list[float]]]:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise InputError(f"{path}: malformed XML ({exc})") from exc
    objects = []
    for obj in root.iter("object"):
        name, box = obj.findtext("name"), obj.find("bndbox")
        if not name or box is None:
            raise InputError(f"{path}: <object> without <name> or <bndbox>")
        try:
            coords = [float(box.findtext(k) or "") for k in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError as exc:
            raise InputError(f"{path}: <bndbox> of '{name}' needs numeric xmin, ymin, xmax, ymax") from exc
        objects.append((name.strip(), coords))
    return objects


def read_llvip(root: Path, class_names: list[str] | None, collect: bool = False) -> Scan:
    reader = _Reader(collect)
    ann_dir = root / "Annotations"
    splits = sorted(p.name for p in (root / "visible").iterdir() if p.is_dir()) if (root / "visible").is_dir() else []
    if not splits:
        raise InputError(f"{root / 'visible'}: no split folders (expected visible/train, visible/test)")
    parsed: dict[str, list[tuple[str, Path, Path, list[tuple[str, list[float]]], Path]]] = {}
    seen: set[str] = set()
    for split in splits:
        parsed[split] = []
        for stem, rgb, ir in reader.pairs(root / "visible" / split, root / "infrared" / split):
            xml = ann_dir / f"{stem}.xml"
            if not xml.is_file():
                reader.fail(f"{xml}: annotation missing for {rgb.name}")
                continue
            try:
                objects = _voc_objects(xml)
            except InputError as exc:
                reader.fail(str(exc))
                continue
            seen.update(name for name, _ in objects)
            parsed[split].append((stem, rgb, ir, objects, xml))
    names = list(class_names) if class_names else sorted(seen) or ["person"]
    scan = Scan("llvip", names)
    for split, rows in parsed.items():
        scan.samples[split] = []
        for stem, rgb, ir, objects, xml in rows:
            size = reader.pair_size(rgb, ir)
            if size is None:
                continue
            unknown = [n for n, _ in objects if n not in names]
            if unknown:
                reader.fail(f"{xml}: class '{unknown[0]}' is not one of {', '.join(names)}")
                continue
            boxes = np.asarray([c for _, c in objects], np.float32).reshape(-1, 4)
            labels = np.asarray([names.index(n) for n, _ in objects], np.int64)
            if reader.check_boxes(str(xml), boxes, size):
                scan.samples[split].append(Sample(split, stem, rgb, ir, boxes, labels, size))
    scan.problems = reader.problems
    return scan


# -- YOLO txt pairs ---------------------------------------------------------------
def _find_yaml(path: Path) -> Path:
    if path.is_file():
        return path
    if (path / "data.yaml").is_file():
        return path / "data.yaml"
    found = sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml"))
    if len(found) != 1:
        raise InputError(f"{path}: expected one data YAML (data.yaml) naming the image folders and classes, found {len(found)}")
    return found[0]


def _swap_part(path: Path, pairs: tuple[tuple[str, str], ...]) -> Path | None:
    """Replace the last path component that is a key of `pairs` (RGB name → other name)."""
    parts = list(path.parts)
    for i in range(len(parts) - 1, -1, -1):
        for a, b in pairs:
            if parts[i] == a:
                parts[i] = b
                return Path(*parts)
    return None


def _yolo_names(data: dict, yaml_path: Path) -> list[str]:
    names = data.get("names")
    if isinstance(names, dict):
        try:
            return [str(names[k]) for k in sorted(names, key=int)]
        except (TypeError, ValueError) as exc:
            raise InputError(f"{yaml_path}: 'names' keys must be class ids 0..K-1") from exc
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise InputError(f"{yaml_path}: 'names' (the class names) is missing")


def _yolo_labels(path: Path, num_classes: int, size: tuple[int, int], reader: _Reader) -> tuple[np.ndarray, np.ndarray] | None:
    w, h = size
    boxes, labels = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) != 5:
            reader.fail(f"{where}: expected 'class cx cy w h', got {len(fields)} values")
            return None
        try:
            cls, (cx, cy, bw, bh) = int(fields[0]), (float(v) for v in fields[1:])
        except ValueError:
            reader.fail(f"{where}: expected an integer class and four numbers, got '{line.strip()}'")
            return None
        if not 0 <= cls < num_classes:
            reader.fail(f"{where}: class id {cls} out of range 0..{num_classes - 1}")
            return None
        box = np.asarray([[(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]], np.float32)
        if not reader.check_boxes(where, box, size):
            return None
        boxes.append(np.clip(box[0], 0, [w, h, w, h]))
        labels.append(cls)
    if not boxes:
        return _empty()
    return np.asarray(boxes, np.float32), np.asarray(labels, np.int64)


def read_yolo(path: Path, label_source: str, collect: bool = False) -> Scan:
    import yaml

    reader = _Reader(collect)
    yaml_path = _find_yaml(path)
    try:
        data = yaml.safe_load(yaml_path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"{yaml_path}: malformed YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{yaml_path}: expected a mapping with 'names' and split folders")
    names = _yolo_names(data, yaml_path)
    root = (yaml_path.parent / str(data.get("path") or ".")).resolve()
    scan = Scan("yolo", names)
    split_keys = [k for k in ("train", "val", "test", "calib") if k in data or f"{k}_rgb" in data]
    if not split_keys:
        raise InputError(f"{yaml_path}: names no split folders (train:, val:, test:)")
    for split in split_keys:
        rgb_dir = root / str(data.get(f"{split}_rgb") or data[split])
        if data.get(f"{split}_ir"):
            ir_dir = root / str(data[f"{split}_ir"])
        else:
            swapped = _swap_part(rgb_dir, BAND_DIRS)
            if swapped is None:
                raise InputError(f"{yaml_path}: cannot tell the IR folder of '{data[split]}'; add '{split}_ir:'")
            ir_dir = swapped
        own = data.get(f"{split}_labels_{label_source}")
        if own:
            label_dir = root / str(own)
        else:
            label_dir = _swap_part(rgb_dir, tuple((a, "labels") for a, _ in BAND_DIRS)) or rgb_dir.parent / "labels"
        scan.samples[split] = []
        for stem, rgb, ir in reader.pairs(rgb_dir, ir_dir):
            txt = label_dir / f"{stem}.txt"
            size = reader.pair_size(rgb, ir)
            if size is None:
                continue
            if not txt.is_file():
                reader.fail(f"{txt}: label file missing for {rgb.name} (an image without objects has an empty file)")
                continue
            parsed = _yolo_labels(txt, len(names), size, reader)
            if parsed is not None:
                scan.samples[split].append(Sample(split, stem, rgb, ir, *parsed, size))
    scan.problems = reader.problems
    return scan


# -- COCO json ------------------------------------------------------------------------
def _coco_file(ann_dir: Path, split: str, label_source: str) -> Path | None:
    for name in (f"{split}_{label_source}.json", f"{split}.json", f"instances_{split}.json"):
        if (ann_dir / name).is_file():
            return ann_dir / name
    return None


def read_coco(root: Path, label_source: str, collect: bool = False) -> Scan:
    reader = _Reader(collect)
    ann_dir = root / "annotations"
    if not ann_dir.is_dir():
        raise InputError(f"{ann_dir}: COCO annotation folder not found")
    band = next(((a, b) for a, b in BAND_DIRS if (root / a).is_dir() and (root / b).is_dir()), None)
    if band is None:
        raise InputError(f"{root}: no RGB/IR image folder pair (visible/ + infrared/ or images/ + imagesIR/)")
    splits = sorted({p.stem.removeprefix("instances_").removesuffix("_ir").removesuffix("_rgb") for p in ann_dir.glob("*.json")})
    if not splits:
        raise InputError(f"{ann_dir}: no annotation files (<split>.json)")
    scan: Scan | None = None
    for split in splits:
        path = _coco_file(ann_dir, split, label_source) or _coco_file(ann_dir, split, "rgb" if label_source == "ir" else "ir")
        if path is None:
            raise InputError(f"{ann_dir}: no annotation file for split '{split}' (<split>.json)")
        try:
            data = json.loads(path.read_text())
            cats = sorted(data["categories"], key=lambda c: c["id"])
            images, anns = data["images"], data.get("annotations", [])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{path}: malformed COCO json ({exc.__class__.__name__}: {exc})") from exc
        names = [str(c["name"]) for c in cats]
        if scan is None:
            scan = Scan("coco", names)
        elif names != scan.class_names:
            raise InputError(f"{path}: categories {names} differ from the other split's {scan.class_names}")
        cat_index = {c["id"]: i for i, c in enumerate(cats)}
        by_image: dict[int, list[dict]] = {}
        for ann in anns:
            by_image.setdefault(ann.get("image_id"), []).append(ann)
        rgb_dir, ir_dir = root / band[0], root / band[1]
        if (rgb_dir / split).is_dir():
            rgb_dir, ir_dir = rgb_dir / split, ir_dir / split
        scan.samples[split] = []
        for image in images:
            file_name = str(image.get("file_name", ""))
            rgb, ir = rgb_dir / file_name, ir_dir / file_name
            if not rgb.is_file():
                reader.fail(f"{path}: image '{file_name}' not found in {rgb_dir}")
                continue
            if not ir.is_file():
                reader.fail(f"{rgb}: RGB image has no IR pair in {ir_dir}")
                continue
            size = reader.pair_size(rgb, ir)
            if size is None:
                continue
            boxes, labels, ok = [], [], True
            for ann in by_image.get(image.get("id"), []):
                if ann.get("category_id") not in cat_index:
                    reader.fail(f"{path}: annotation {ann.get('id')} has unknown category_id {ann.get('category_id')}")
                    ok = False
                    break
                try:
                    x, y, bw, bh = (float(v) for v in ann["bbox"])
                except (KeyError, TypeError, ValueError):
                    reader.fail(f"{path}: annotation {ann.get('id')} needs bbox [x, y, w, h]")
                    ok = False
                    break
                boxes.append([x, y, x + bw, y + bh])
                labels.append(cat_index[ann["category_id"]])
            if not ok:
                continue
            b = np.asarray(boxes, np.float32).reshape(-1, 4)
            if reader.check_boxes(f"{path} ({file_name})", b, size):
                scan.samples[split].append(Sample(split, Path(file_name).stem, rgb, ir, b, np.asarray(labels, np.int64), size))
    assert scan is not None
    scan.problems = reader.problems
    return scan


def detect_layout(path: Path) -> str:
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return "yolo"
    if not path.is_dir():
        raise InputError(f"dataset folder not found: {path}")
    if (path / "Annotations").is_dir() and (path / "visible").is_dir() and (path / "infrared").is_dir():
        return "llvip"
    if (path / "annotations").is_dir() and any((path / "annotations").glob("*.json")):
        return "coco"
    if (path / "data.yaml").is_file() or any(path.glob("*.yaml")) or any(path.glob("*.yml")):
        return "yolo"
    raise InputError(f"{path}: cannot tell the layout ({'; '.join(f'{k}: {v}' for k, v in LAYOUTS.items())}); pass --layout")


def scan(path: Path, layout: str = "auto", label_source: str = "ir", class_names: list[str] | None = None,
         collect: bool = False) -> Scan:
    """Read a layout's pairs and boxes (no pixels decoded)."""
    path = Path(path)
    if label_source not in LABEL_SOURCES:
        raise InputError(f"label_source must be 'ir' or 'rgb', got '{label_source}'")
    if layout == "auto":
        layout = detect_layout(path)
    if not path.exists():
        raise InputError(f"dataset folder not found: {path}")
    if layout == "llvip":
        return read_llvip(path, class_names, collect)
    if layout == "yolo":
        return read_yolo(path, label_source, collect)
    if layout == "coco":
        return read_coco(path, label_source, collect)
    raise InputError(f"unknown layout '{layout}' (known: auto, {', '.join(LAYOUTS)})")
