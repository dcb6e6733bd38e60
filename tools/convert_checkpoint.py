"""Convert a DefMamba checkpoint (the authors' .pth or one of ours) to .safetensors.

    python tools/convert_checkpoint.py defmamba_small.pth                  # -> defmamba_small.safetensors
    python tools/convert_checkpoint.py defmamba_small.pth --ema --out defmamba_small_ema.safetensors

The output holds one set of weights: the model's ('model' entry) by default, its EMA with --ema,
as everywhere else in the project. Its metadata names the architecture when the weights are a
published variant (``arch``: defmamba_tiny / _small / _base), the entry they came from
(``weights``), the input file name (``source``) and the converting library's version. The file
loads wherever a checkpoint path is accepted (``load_checkpoint``, ``main.py --resume/--pretrained``,
``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))``, ``export_onnx.py``, mm ``init_cfg``)
and needs no pickle to read.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

import defmamba
from defmamba.checkpoint import SAFETENSORS_SUFFIX, CheckpointError, extract_state_dict, safe_load
from defmamba.variants import variant_of


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="the .pth file: official, ours, mmengine's or a plain state dict")
    parser.add_argument("--out", type=Path, help="the .safetensors file to write (default: the input with that suffix)")
    parser.add_argument("--ema", action="store_true", help="convert the 'model_ema' weights instead of 'model'")
    parser.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="unpickle classes outside the allowlist (only for a file you trust)")
    return parser.parse_args(argv)


def convert_checkpoint(source: Path, target: Path, key: str = "auto", force: bool = False,
                       allow_pickle: bool = False) -> dict[str, str]:
    """Write the weights under ``key`` of ``source`` to ``target`` as safetensors; returns the metadata.

    Raises:
        CheckpointError: unreadable input, no weights under ``key``, or an existing ``target`` without ``force``.
    """
    if target.exists() and not force:
        raise CheckpointError(f"{target} exists; pass --force to overwrite it")
    state, source_key = extract_state_dict(safe_load(source, allow_pickle=allow_pickle), key)
    variant = variant_of(state)
    metadata = {"format": "pt", "weights": source_key or "(plain state dict)", "source": source.name,
                "defmamba_version": defmamba.__version__}
    if variant is not None:
        metadata["arch"] = f"defmamba_{variant}"
    # One contiguous, unshared copy per tensor: safetensors stores neither views nor shared storage.
    tensors = {name: tensor.detach().clone(memory_format=torch.contiguous_format) for name, tensor in state.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, target)  # a reader never sees a half-written file
    return metadata


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    target = args.out or args.checkpoint.with_suffix(SAFETENSORS_SUFFIX)
    if target.suffix != SAFETENSORS_SUFFIX:
        print(f"error: the output must end in {SAFETENSORS_SUFFIX} (got {target})", file=sys.stderr)
        return 2
    try:
        metadata = convert_checkpoint(args.checkpoint, target, key="model_ema" if args.ema else "auto",
                                      force=args.force, allow_pickle=args.unsafe_load)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {target} ({target.stat().st_size / 2 ** 20:.1f} MiB): '{metadata['weights']}' weights of "
          f"{args.checkpoint}" + (f", {metadata['arch']}" if "arch" in metadata else ", not a published variant"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
