"""Draw DefMamba's deformable scan over an image: one PNG per stage for the chosen block.

Each PNG shows (a) the sampling offsets as arrows, (b) the raster and the learned scan order as
paths coloured first → last, (c) how far each token moved in the sequence.

Examples:
    python tools/visualize_scan.py photo.jpg --out scans/                       # random weights
    python tools/visualize_scan.py photo.jpg --model defmamba_small --checkpoint defmamba_small.pth --out scans/
    python tools/visualize_scan.py skimage:astronaut --stages 0 1 --out docs/   # an image from scikit-image

IMAGE is a file path or ``skimage:NAME`` for one of scikit-image's sample images (``astronaut``,
``chelsea``, ``coffee``, ...; needs ``pip install scikit-image``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import defmamba
from defmamba.checkpoint import CheckpointError, load_checkpoint
from defmamba.models.defmamba import MIN_INPUT_SIZE
from defmamba.train.data.decode import load_rgb
from defmamba.train.data.errors import DataError
from defmamba.visualize import capture_scans, plot_scan, scan_figure_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(source: str, height: int, width: int) -> tuple[np.ndarray, str]:
    """Read ``source`` (a path or ``skimage:NAME``), resize to height×width; (H, W, 3) floats in [0, 1] and a name."""
    from PIL import Image

    if source.startswith("skimage:"):
        name = source.split(":", 1)[1]
        try:
            from skimage import data
        except ImportError as err:
            raise SystemExit(f"{source}: scikit-image is not installed; `pip install scikit-image` or pass an image file") from err
        loader = getattr(data, name, None)
        if loader is None or not callable(loader):
            raise SystemExit(f"{source}: scikit-image has no sample image {name!r} (try astronaut, chelsea, coffee, rocket)")
        array = np.asarray(loader())
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        picture = Image.fromarray(array[..., :3].astype(np.uint8))
    else:
        path = Path(source)
        if not path.is_file():
            raise SystemExit(f"image not found: {path}" if not path.exists() else f"{path} is not an image file")
        try:
            picture = load_rgb(str(path))
        except DataError as err:
            raise SystemExit(str(err)) from None
        name = path.stem
    picture = picture.convert("RGB").resize((width, height), Image.BICUBIC)
    return np.asarray(picture, dtype=np.float32) / 255.0, name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", help="image file, or skimage:NAME for a scikit-image sample image")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs (created if missing)")
    parser.add_argument("--model", default="defmamba_tiny", help="defmamba_tiny | defmamba_small | defmamba_base")
    parser.add_argument("--checkpoint", help="weights to load (official or our checkpoint); random weights if omitted")
    parser.add_argument("--ema", action="store_true", help="load the checkpoint's 'model_ema' weights instead of 'model'")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="allow checkpoints holding arbitrary Python objects (only for files you trust)")
    parser.add_argument("--block", type=int, default=0, help="block of each stage to draw (default 0)")
    parser.add_argument("--stages", type=int, nargs="+", help="stages to draw (default: all)")
    parser.add_argument("--height", type=int, default=224, help="input height the image is resized to")
    parser.add_argument("--width", type=int, default=224, help="input width the image is resized to")
    parser.add_argument("--name", help="file name prefix (default: scan_<image name>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights when no checkpoint is given")
    parser.add_argument("--dpi", type=int, default=80, help="resolution of the PNGs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Path]:
    """Write the PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args = parse_args(argv)
    if min(args.height, args.width) < MIN_INPUT_SIZE:
        raise SystemExit(f"--height {args.height} --width {args.width}: DefMamba needs inputs of at least "
                         f"{MIN_INPUT_SIZE}×{MIN_INPUT_SIZE}")
    picture, image_name = load_image(args.image, args.height, args.width)
    torch.manual_seed(args.seed)
    try:
        model = defmamba.build_model(args.model, scan_backend="torch").eval()
    except ValueError as err:
        raise SystemExit(f"--model: {err}") from None
    if args.checkpoint:
        try:
            load_checkpoint(model, args.checkpoint, key="model_ema" if args.ema else "auto",
                            allow_pickle=args.unsafe_load)
        except CheckpointError as err:
            raise SystemExit(str(err)) from err
        weights = Path(args.checkpoint).name + (" (EMA)" if args.ema else "")
    else:
        weights = f"random weights, seed {args.seed}"

    tensor = (torch.from_numpy(picture).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN)[:, None, None]) \
        / torch.tensor(IMAGENET_STD)[:, None, None]
    stages = args.stages if args.stages is not None else list(range(len(model.layers)))
    try:
        records = capture_scans(model, tensor[None], [(stage, args.block) for stage in stages])
    except ValueError as err:
        raise SystemExit(f"{err}; choose --block and --stages accordingly") from err

    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.name or f"scan_{image_name}"
    written = []
    for record in records:
        fig = plot_scan(picture, record, title=f"{args.model} ({weights}) on {image_name}")
        path = args.out / scan_figure_name(prefix, record)
        fig.savefig(path, dpi=args.dpi)
        plt.close(fig)
        written.append(path)
        print(path)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
