"""Slim the reference golden files (computed by the authors' code) into test fixtures.

Keeps the weights, inputs, outputs, the token orders of each deformable layer and a subset of
the parameter gradients that still covers every kind of parameter, so each fixture stays under
5 MiB. Usage: python tools/make_golden_fixtures.py REFERENCE_DIR tests/fixtures
"""
import argparse
import re
from pathlib import Path

import torch

GRAD_NUMEL_LIMIT = 20_000  # drop the largest weight gradients; their kinds appear in other stages
KIND_NUMEL_LIMIT = 70_000  # a kind seen only in larger tensors is still added up to this size


def parameter_kind(name: str) -> str:
    return re.sub(r"\.\d+\.", ".#.", name)


def slim(source: Path, target: Path) -> None:
    data = torch.load(source, weights_only=False)
    keep = {k: data[k] for k in ("config", "state_dict", "input", "output", "loss_weight", "logits", "loss", "grad_input")
            if k in data}
    keep["orders"] = {layer: info["indices"] for layer, info in data["deformable"].items()}
    if "grad_params" in data:
        grads = data["grad_params"]
        chosen = {k: v for k, v in grads.items() if v.numel() <= GRAD_NUMEL_LIMIT}
        missing_kinds = {parameter_kind(k) for k in grads} - {parameter_kind(k) for k in chosen}
        for kind in sorted(missing_kinds):  # smallest gradient of each kind not yet covered
            name = min((k for k in grads if parameter_kind(k) == kind), key=lambda k: grads[k].numel())
            if grads[name].numel() <= KIND_NUMEL_LIMIT:
                chosen[name] = grads[name]
            else:
                print(f"  not kept: {name} {tuple(grads[name].shape)} (other Linear weights cover its kind)")
        keep["grad_params"] = chosen
    torch.save(keep, target)
    print(f"{target}: {target.stat().st_size / 2**20:.2f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("reference", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    for name in ("fwd", "backbone", "grad"):
        slim(args.reference / f"golden_mini_{name}.pt", args.out / f"golden_mini_{name}.pt")


if __name__ == "__main__":
    main()
