"""Reading image files into float arrays: the one place edgeopt decodes images (with Pillow).

Shared by the image-folder classification loader and any other loader that reads image files,
so every one of them decodes, converts and resizes the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeopt.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
MODES = {1: "L", 3: "RGB"}


def image_files(directory: Path) -> list[Path]:
    """The image files directly in `directory`, sorted by name (a stable order for seeded splits)."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: Path, size: int | tuple[int, int] | None = None, channels: int = 3) -> np.ndarray:
    """(channels, H, W) float32 in [0, 1]; resized bilinearly to `size` (square int, or (H, W))."""
    from PIL import Image, UnidentifiedImageError

    if channels not in MODES:
        raise InputError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    try:
        with Image.open(path) as image:
            image = image.convert(MODES[channels])
            if size is not None:
                height, width = (size, size) if isinstance(size, int) else size
                if image.size != (width, height):
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise InputError(f"cannot read image {path}: not an image Pillow can decode") from None
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc.strerror or exc}") from None
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
