"""Reading an image file as the 8-bit RGB picture the transforms expect.

Pillow's ``convert("RGB")`` clips 16-bit grey images (modes ``I;16*``, and ``I`` as older
Pillow opens 16-bit PNGs) at 255, which turns almost every pixel white. Here they are scaled:
``v ↦ round(v · 255 / 65535)``. 16-bit colour PNGs already open as 8-bit RGB (Pillow keeps the
high byte). Floating-point images (mode ``F``) and 32-bit integer images of unknown depth are
refused, since no scale to 8 bits can be known from the file.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .errors import DataError

__all__ = ["load_rgb", "to_rgb8"]

_UNSIGNED_16 = ("I;16", "I;16L", "I;16B", "I;16N")


def _bit_depth(image: Image.Image) -> int | None:
    """Bits per sample of an integer grey image, when the file says (None when it does not)."""
    if image.mode in _UNSIGNED_16:
        return 16
    if image.mode != "I":
        return None
    if image.format == "PNG":            # PNG grey is at most 16 bits
        return 16
    bits = getattr(image, "tag_v2", {}).get(258)    # TIFF BitsPerSample
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return int(bits) if bits else None


def to_rgb8(image: Image.Image, name: str) -> Image.Image:
    """``image`` as 8-bit RGB, high-bit-depth grey scaled to 8 bits; DataError if no scale is known."""
    if image.mode in _UNSIGNED_16 or image.mode == "I":
        bits = _bit_depth(image)
        values = np.asarray(image)
        if bits is None or not 1 <= bits <= 32:
            raise DataError(f"image {name} has 32-bit integer pixels (mode {image.mode}) of unknown bit depth: "
                            "convert it to an 8- or 16-bit PNG or JPEG")
        top = (1 << bits) - 1
        if values.size and (values.min() < 0 or values.max() > top):
            raise DataError(f"image {name} (mode {image.mode}, {bits} bits) holds values outside 0..{top}: "
                            "convert it to an 8- or 16-bit PNG or JPEG")
        scaled = (values.astype(np.int64) * 255 + top // 2) // top
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if image.mode == "F" or image.mode.startswith("I;"):
        kind = "32-bit floating-point" if image.mode == "F" else "signed or unusual integer"
        raise DataError(f"image {name} has {kind} pixels (mode {image.mode}) with no known range for 8-bit "
                        "colour: convert it to an 8- or 16-bit PNG or JPEG")
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` as 8-bit RGB; DataError naming the file if it cannot be read or converted."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return to_rgb8(image, path)
    except DataError:
        raise
    except Exception as err:  # PIL raises many types for corrupt files
        raise DataError(f"cannot read image {path}: {err}; delete or replace the file") from None
