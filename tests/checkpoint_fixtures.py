"""Checkpoints in the authors' exact layout without the real files: their DefMamba-T key names and
shapes (from the reference key list) with random values, and a yacs config shaped like theirs."""
from __future__ import annotations

from pathlib import Path

import torch
from yacs.config import CfgNode

KEYS_TINY = Path(__file__).resolve().parents[2] / "shared" / "reference" / "keys_tiny.txt"
if not KEYS_TINY.is_file():
    KEYS_TINY = Path("/work/shared/reference/keys_tiny.txt")


def official_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the official DefMamba-T key names and shapes (from the reference key list)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for line in KEYS_TINY.read_text().splitlines():
        name, shape = line.split("\t")
        dims = [int(d) for d in shape.strip("[]").split(",") if d.strip()]
        state[name] = torch.randn(*dims, generator=g) * 0.02
    return state


def authors_config() -> CfgNode:
    """A yacs config shaped like the authors' (nested nodes, lists, floats, strings, bools)."""
    return CfgNode({
        "MODEL": CfgNode({"TYPE": "vssm", "NAME": "defmamba_tiny", "NUM_CLASSES": 1000, "DROP_PATH_RATE": 0.2,
                          "VSSM": CfgNode({"EMBED_DIM": 48, "DEPTHS": [2, 2, 5, 2], "D_STATE": 1,
                                           "SSM_RATIO": 1.0, "PATCH_NORM": True})}),
        "DATA": CfgNode({"IMG_SIZE": 224, "DATASET": "imagenet", "INTERPOLATION": "bicubic"}),
        "TRAIN": CfgNode({"EPOCHS": 300, "BASE_LR": 1e-3, "WEIGHT_DECAY": 0.05,
                          "OPTIMIZER": CfgNode({"NAME": "adamw", "BETAS": (0.9, 0.999)})}),
        "AMP_ENABLE": True, "OUTPUT": "output/defmamba_tiny", "TAG": "default",
    })
