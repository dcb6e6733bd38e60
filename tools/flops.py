"""Parameters and FLOPs of DefMamba, counted as the paper counts them, next to the paper's numbers.

Classification (default, 224×224):
    python tools/flops.py --model defmamba_small
    python tools/flops.py --model defmamba_tiny --size 256 320
Detection (Mask R-CNN, 800×1280) and segmentation (UperNet, 512×2048), needs the mm extra:
    python tools/flops.py --model defmamba_small --task det
    python tools/flops.py --task seg --config configs/segmentation/upernet_defmamba-s_8xb2-160k_ade20k-512x512.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]  # the configs live in the checkout

MODELS = ("defmamba_tiny", "defmamba_small", "defmamba_base")
LETTER = {"defmamba_tiny": "t", "defmamba_small": "s", "defmamba_base": "b"}

# The paper's numbers: ImageNet classifiers at 224², and only DefMamba-S in Mask R-CNN 1× (at
# 1280×800) and in UperNet (at 512×2048).
PAPER_CLS = {"defmamba_tiny": ("8M", "1.3G"), "defmamba_small": ("30M", "5.0G"), "defmamba_base": ("49M", "8.9G")}
PAPER_TASK = {("det", "defmamba_small"): "273G", ("seg", "defmamba_small"): "950G"}
PAPER_NAME = {"defmamba_tiny": "DefMamba-T", "defmamba_small": "DefMamba-S", "defmamba_base": "DefMamba-B"}

DEFAULT_SIZE = {"cls": (224, 224), "det": (800, 1280), "seg": (512, 2048)}
TASK_NAMES = {"det": "Mask R-CNN", "seg": "UperNet"}


def default_config(task: str, model: str) -> Path:
    """Our 1× Mask R-CNN / 160k UperNet config of the variant."""
    letter = LETTER[model]
    if task == "det":
        return REPO / "configs" / "detection" / f"mask-rcnn_defmamba-{letter}_fpn_1x_coco.py"
    return REPO / "configs" / "segmentation" / f"upernet_defmamba-{letter}_8xb2-160k_ade20k-512x512.py"


def config_variant(task: str, config_path: Path) -> Optional[str]:
    """The published variant (defmamba_tiny/small/base) whose backbone a det/seg config builds, or
    None for other widths and depths."""
    from defmamba.mm.runner import load_task_config
    from defmamba.models import VARIANTS

    def stage_widths(dims) -> list[int]:
        return [dims * 2 ** i for i in range(4)] if isinstance(dims, int) else list(dims)

    backbone = load_task_config(task, str(config_path)).model.backbone
    if backbone.get("arch") is not None:  # MM_DefMamba naming its variant: arch='small'
        name = str(backbone.arch).lower().removeprefix("defmamba_")
        return f"defmamba_{name}" if name in VARIANTS else None
    if "dims" not in backbone or "depths" not in backbone:
        return None
    for name, spec in VARIANTS.items():
        if stage_widths(backbone.dims) == stage_widths(spec.dims) and tuple(backbone.depths) == spec.depths:
            return f"defmamba_{name}"
    return None


def paper_task_note(task: str, variant: Optional[str], size: tuple[int, int]) -> str:
    """The paper's FLOPs of the counted variant, where the paper gives them (at its input size)."""
    if variant is None or tuple(size) != DEFAULT_SIZE[task]:
        return ""
    paper = PAPER_TASK.get((task, variant))
    if paper is None:
        return f"   (the paper gives {TASK_NAMES[task]} FLOPs for DefMamba-S only)"
    return f"   (paper, {PAPER_NAME[variant]}: {paper})"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="defmamba_tiny", help="variant (default: %(default)s)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="input height and width (default: 224 224 for cls, 800 1280 for det, 512 2048 for seg)")
    parser.add_argument("--task", choices=("cls", "det", "seg"), default="cls",
                        help="classifier, Mask R-CNN detector or UperNet segmentor (default: %(default)s)")
    parser.add_argument("--config", help="mmdet/mmseg config for --task det|seg (default: our 1x/160k config of --model)")
    args = parser.parse_args(argv)
    if args.size is not None and min(args.size) < 1:
        parser.error(f"--size needs two positive integers, got {args.size}")
    if args.config is not None and args.task == "cls":
        parser.error("--config is for --task det|seg; the classifier is chosen with --model")
    return args


def count_classifier(model_name: str, size: tuple[int, int]) -> None:
    """Print parameters, FLOPs and the per-operator table of a classifier."""
    import defmamba
    from defmamba.flops import count_flops, count_params

    model = defmamba.build_model(model_name)
    params = count_params(model)
    total, by_op = count_flops(model, input_size=(3, *size))
    paper_params, paper_flops = PAPER_CLS[model_name]
    at = "" if tuple(size) == (224, 224) else " at 224×224"

    print(f"{model_name}, input 3×{size[0]}×{size[1]}")
    print(f"  parameters  {params:>14,}   (paper{at}: {paper_params})")
    print(f"  FLOPs       {total / 1e9:>12.4f} G   (paper{at}: {paper_flops})")
    print()
    print(f"  {'operator':<22}{'GFLOPs':>10}{'share':>9}")
    for op, flops in by_op.items():
        print(f"  {op:<22}{flops / 1e9:>10.4f}{100 * flops / total:>8.1f}%")
    print(f"  {'total':<22}{total / 1e9:>10.4f}")


def count_task(task: str, model_name: str, config: Optional[str], size: tuple[int, int]) -> int:
    """Print the FLOPs of a detector / segmentor; returns the exit status."""
    config_path = Path(config) if config is not None else default_config(task, model_name)
    if not config_path.is_file():
        print(f"error: config {config_path} not found; pass --config PATH", file=sys.stderr)
        return 2
    try:
        from defmamba.mm.runner import count_task_flops

        total = count_task_flops(task, str(config_path), (3, *size))
        variant = config_variant(task, config_path)
    except ImportError as err:
        package = "mmdet" if task == "det" else "mmseg"
        hint = "" if "install_mm" in str(err) else "; install it with `bash tools/install_mm.sh` (or `make mm`)"
        print(f"error: --task {task} needs the OpenMMLab stack (mmengine, mmcv, {package}): {err}{hint}", file=sys.stderr)
        return 2
    print(f"{TASK_NAMES[task]} with {config_path.name}, input 3×{size[0]}×{size[1]}")
    print(f"  FLOPs  {total / 1e9:>10.1f} G{paper_task_note(task, variant, size)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    size = tuple(args.size) if args.size is not None else DEFAULT_SIZE[args.task]
    if args.task == "cls":
        try:
            count_classifier(args.model, size)
        except ValueError as err:  # e.g. an input smaller than the model accepts
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    return count_task(args.task, args.model, args.config, size)


if __name__ == "__main__":
    sys.exit(main())
