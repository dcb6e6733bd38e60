"""Export a DefMamba classifier to ONNX, validate the graph and compare ONNX Runtime with PyTorch.

Examples:
    python tools/export_onnx.py --model defmamba_small --checkpoint defmamba_small.pth --out defmamba_small.onnx
    python tools/export_onnx.py --model defmamba_tiny --out tiny.onnx --height 256 --width 320 --dynamic batch

The graph takes ``image`` (B, 3, H, W), ImageNet-normalised, and returns ``output`` (B, classes).
``--dynamic batch`` makes B free; H and W are fixed at export time (see defmamba/onnx_export.py
for why), so export one file per input size.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import defmamba
from defmamba.checkpoint import CheckpointError, load_checkpoint
from defmamba.models.defmamba import MIN_INPUT_SIZE
from defmamba.onnx_export import EXPORTERS, check_onnx, export_onnx


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="defmamba_small", help="defmamba_tiny | defmamba_small | defmamba_base")
    parser.add_argument("--checkpoint", help="weights to export (official or our checkpoint); random weights if omitted")
    parser.add_argument("--ema", action="store_true", help="export the checkpoint's 'model_ema' weights")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="allow checkpoints holding arbitrary Python objects (only for files you trust)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (must match the checkpoint)")
    parser.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=1, help="batch of the example input (and of the graph unless dynamic)")
    parser.add_argument("--dynamic", choices=("none", "batch", "all"), nargs="?", const="batch", default="batch",
                        help="dynamic axes: 'batch' (the default, also for a bare --dynamic) or 'none'; "
                             "'all' (batch, height, width) is not possible and says why")
    parser.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                        help="PyTorch exporter: 'torchscript' (fast, default) or 'dynamo' (torch.export based, slower)")
    return parser.parse_args(argv)


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, found before the (slow) export; None if nothing."""
    if args.dynamic == "all":
        return ("dynamic height/width cannot be exported: each deformable layer's reference grid and offset "
                "scale, and the number of passes of the scan (ceil(log2(h*w))), are computed from the feature-map "
                "size and become constants of the graph. Export one model per input size with --height/--width "
                "(the batch stays dynamic with --dynamic batch).")
    if min(args.height, args.width) < MIN_INPUT_SIZE:
        return (f"--height {args.height} --width {args.width}: DefMamba needs inputs of at least "
                f"{MIN_INPUT_SIZE}×{MIN_INPUT_SIZE} (4 stride-2 stages after a stride-4 stem)")
    if args.batch_size < 1:
        return f"--batch-size must be at least 1, got {args.batch_size}"
    if args.num_classes < 1:
        return f"--num-classes must be at least 1, got {args.num_classes}"
    return _output_problem(args.out)


def _output_problem(out: Path) -> str | None:
    """Whether ``out`` can be written: not a folder, its folder creatable and writable."""
    if out.is_dir():
        return f"--out {out} is a folder; name the .onnx file to write, e.g. --out {out / 'model.onnx'}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.{os.getpid()}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return f"--out {out} cannot be written ({err.strerror or err}); choose a writable place"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = _usage_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        model = defmamba.build_model(args.model, num_classes=args.num_classes, scan_backend="torch")
    except ValueError as err:
        print(f"error: --model: {err}", file=sys.stderr)
        return 2
    if args.checkpoint:
        try:
            report = load_checkpoint(model, args.checkpoint, key="model_ema" if args.ema else "auto",
                                     allow_pickle=args.unsafe_load)
        except CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"loaded {args.checkpoint} ['{report.source_key}']")
    else:
        print("no --checkpoint: exporting random weights")
    model.eval()
    start = time.perf_counter()
    export_onnx(model, args.out, args.height, args.width, batch_size=args.batch_size,
                dynamic_batch=args.dynamic == "batch", exporter=args.exporter)
    print(f"exported {args.out} ({args.out.stat().st_size / 2 ** 20:.1f} MiB) in {time.perf_counter() - start:.0f} s ({args.exporter} exporter); "
          f"input image (B, 3, {args.height}, {args.width}), batch {'dynamic' if args.dynamic == 'batch' else 'fixed'}")
    batches = [args.batch_size] + ([args.batch_size + 1] if args.dynamic == "batch" else [])
    for batch in batches:
        inputs = torch.randn(batch, 3, args.height, args.width)
        check = check_onnx(model, args.out, inputs)
        print(f"onnx.checker: ok; onnxruntime vs PyTorch, batch {check.batch_size}: max abs diff {check.max_abs_diff:.3e}, "
              f"max rel diff {check.max_rel_diff:.3e} (relative to max |output|)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
