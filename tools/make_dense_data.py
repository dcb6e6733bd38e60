"""Synthetic instance- and semantic-segmentation sets for Mask R-CNN and UperNet runs without downloads.

Each scene is a cluttered background (noise, grey and brown strokes) with a few filled shapes of four
classes, each with its own geometry and hue: circle (red), square (green), triangle (blue), bar (yellow),
at random sizes, positions and angles. Later shapes occlude earlier ones; a shape's annotation is its
visible part, and a placement that would hide more than half of an earlier shape is drawn again.

  python tools/make_dense_data.py coco OUT --train 200 --val 50 --size 1333 800
      annotations/instances_{train,val}.json (COCO: RLE of the visible mask, its tight box and pixel
      area) and images/{train,val}/NNNNNN.jpg
  python tools/make_dense_data.py ade OUT --train 200 --val 50 --size 512 512
      images/{training,validation}/NNNNNN.jpg and annotations/{training,validation}/NNNNNN.png with
      ADE20K's encoding: 1 = background, 2.. = the shapes, 0 = ignore (unused), for reduce_zero_label

Deterministic: image i of a split depends only on (--seed, split, i, --size).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASSES", "CLASS_COLOURS", "render_scene", "write_coco", "write_ade", "main"]

CLASSES = ("circle", "square", "triangle", "bar")
CLASS_COLOURS = np.array([(215, 45, 40), (40, 185, 70), (50, 80, 225), (235, 205, 40)], dtype=np.int16)
MIN_SIZE = 32
MAX_HIDDEN = 0.5   # no shape loses more than this fraction of its area to later ones
JPEG = dict(quality=92, subsampling=0)  # full-resolution chroma: colours stay put at mask edges
SPLITS = {"coco": ("train", "val"), "ade": ("training", "validation")}


# ---------------------------------------------------------------- scenes


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Grey-brown base with pixel noise and desaturated strokes and rings (no class hue)."""
    base = rng.integers(70, 170) + rng.integers(-15, 16, size=3)
    image = Image.fromarray(np.clip(base + rng.integers(-25, 26, (height, width, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(8, 25))):
        grey = int(rng.integers(30, 220))
        colour = tuple(int(c) for c in np.clip(grey + rng.integers(-20, 21, 3), 0, 255))
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        if rng.random() < 0.6:
            draw.line((int(x0), int(y0), int(x1), int(y1)), fill=colour, width=int(rng.integers(1, 4)))
        else:
            draw.ellipse((int(x0), int(y0), int(x1), int(y1)), outline=colour, width=int(rng.integers(1, 3)))
    return np.asarray(image).copy()


def _polygon_mask(vertices: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Pixels whose centre lies inside the convex polygon (vertices in positive, counter-clockwise order)."""
    inside = np.ones(np.broadcast_shapes(xs.shape, ys.shape), dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        inside &= (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0) >= 0
    return inside


def _shape_mask(rng: np.random.Generator, label: int, width: int, height: int) -> np.ndarray:
    """Full mask of one randomly sized, placed and turned shape of class ``label``."""
    ys, xs = np.ogrid[:height, :width]
    xs, ys = xs + 0.5, ys + 0.5
    radius = max(5.0, rng.uniform(0.05, 0.16) * min(width, height))
    cx = rng.uniform(radius, max(radius, width - radius))
    cy = rng.uniform(radius, max(radius, height - radius))
    name = CLASSES[label]
    if name == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2
    angle = rng.uniform(0, 2 * np.pi)
    if name == "square":
        corners = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        half = (radius / np.sqrt(2), radius / np.sqrt(2))
    elif name == "bar":
        corners = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        half = (radius * 1.3, radius * 1.3 / rng.uniform(3, 6))
    else:  # equilateral triangle with circumradius ``radius``
        corners = [(np.cos(a), np.sin(a)) for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)]
        half = (radius, radius)
    local = np.array(corners, dtype=float) * half
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    vertices = local @ rotation.T + (cx, cy)
    return _polygon_mask(vertices, xs, ys)


def render_scene(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """An RGB image (H, W, 3) uint8 and its shapes as (class index, visible mask (H, W) bool),
    in drawing order (later ones on top)."""
    image = _background(rng, width, height)
    shapes: list[tuple[int, np.ndarray]] = []
    full_areas: list[int] = []
    for _ in range(int(rng.integers(3, 9))):
        label = int(rng.integers(len(CLASSES)))
        for _attempt in range(20):
            mask = _shape_mask(rng, label, width, height)
            area = int(mask.sum())
            if area >= 20 and all((visible & ~mask).sum() >= (1 - MAX_HIDDEN) * full
                                  for (_, visible), full in zip(shapes, full_areas)):
                break
        else:
            continue
        shapes = [(other, visible & ~mask) for other, visible in shapes] + [(label, mask)]
        full_areas.append(area)
        colour = CLASS_COLOURS[label] + rng.integers(-20, 21, 3)
        noise = rng.integers(-12, 13, (area, 3))
        image[mask] = np.clip(colour + noise, 0, 255).astype(np.uint8)
    return image, shapes


def _scene_rng(seed: int, split_index: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split_index, index])


# ---------------------------------------------------------------- writers


def write_coco(out: Path, counts: Sequence[int], width: int, height: int, seed: int) -> None:
    """COCO instance segmentation: annotations/instances_{train,val}.json + images/{train,val}/."""
    from pycocotools import mask as mask_utils

    categories = [dict(id=k + 1, name=name, supercategory="shape") for k, name in enumerate(CLASSES)]
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split_index, (split, count) in enumerate(zip(SPLITS["coco"], counts)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image, shapes = render_scene(_scene_rng(seed, split_index, i), width, height)
            name = f"{i:06d}.jpg"
            Image.fromarray(image).save(out / "images" / split / name, **JPEG)
            images.append(dict(id=i + 1, file_name=name, width=width, height=height))
            for label, visible in shapes:
                rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=label + 1, iscrowd=0,
                                        segmentation=rle, area=int(visible.sum()),
                                        bbox=[float(v) for v in mask_utils.toBbox(rle)]))
        text = json.dumps(dict(images=images, annotations=annotations, categories=categories))
        (out / "annotations" / f"instances_{split}.json").write_text(text)


def write_ade(out: Path, counts: Sequence[int], width: int, height: int, seed: int) -> None:
    """ADE20K layout: images/{training,validation}/*.jpg, annotations/{training,validation}/*.png."""
    for split_index, (split, count) in enumerate(zip(SPLITS["ade"], counts)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, shapes = render_scene(_scene_rng(seed, split_index, i), width, height)
            labels = np.ones((height, width), dtype=np.uint8)  # 1 = background
            for label, visible in shapes:
                labels[visible] = label + 2
            Image.fromarray(image).save(out / "images" / split / f"{i:06d}.jpg", **JPEG)
            Image.fromarray(labels).save(out / "annotations" / split / f"{i:06d}.png")


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("format", choices=sorted(SPLITS), help="coco (Mask R-CNN) or ade (UperNet)")
    parser.add_argument("out", type=Path, help="output folder (created; must be empty unless --force)")
    parser.add_argument("--train", type=int, default=200, help="training images (default 200)")
    parser.add_argument("--val", type=int, default=50, help="held-out images (default 50)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"),
                        help="image size (default 1333 800 for coco, 512 512 for ade)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace images/ and annotations/ in a non-empty OUT")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    width, height = args.size or ((1333, 800) if args.format == "coco" else (512, 512))
    if min(width, height) < MIN_SIZE:
        parser.error(f"--size {width} {height}: width and height must be at least {MIN_SIZE}")
    for flag in ("train", "val"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: need at least 1 image")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"{args.out} exists and is not a folder")
    if args.out.is_dir() and any(args.out.iterdir()):
        if not args.force:
            parser.error(f"{args.out} is not empty; pass --force to replace its images/ and annotations/")
        for sub in ("images", "annotations"):
            shutil.rmtree(args.out / sub, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    writer = write_coco if args.format == "coco" else write_ade
    writer(args.out, (args.train, args.val), width, height, args.seed)
    names = CLASSES if args.format == "coco" else ("background", *CLASSES)
    print(f"{args.format}: {args.train} + {args.val} images of {width}x{height} in {args.out}")
    print("classes: " + ", ".join(names))


if __name__ == "__main__":
    main(sys.argv[1:])
