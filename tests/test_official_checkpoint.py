"""The official checkpoint workflow without the real files: a checkpoint written in the authors'
exact layout (their key names and shapes from the reference key list, an AdamW state, a timm
cosine-scheduler state, the yacs config, their ``max_accuray_ema`` spelling) loads with
``defmamba.checkpoint.load_checkpoint`` and through ``timm.create_model(pretrained=True)``,
as docs/pretrained.md tells users to do."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from checkpoint_fixtures import authors_config, official_tensors
from timm.scheduler.cosine_lr import CosineLRScheduler

import defmamba
from defmamba.checkpoint import CheckpointError, load_checkpoint


@pytest.fixture(scope="module")
def official_file(tmp_path_factory) -> tuple[Path, dict, dict]:
    weights, ema = official_tensors(0), official_tensors(1)
    params = [torch.nn.Parameter(v.clone()) for v in weights.values() if v.dim() > 0]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    scheduler = CosineLRScheduler(optimizer, t_initial=300, lr_min=1e-5, warmup_t=20, warmup_lr_init=1e-6)
    scheduler.step(123)
    path = tmp_path_factory.mktemp("official") / "defmamba_tiny.pth"
    torch.save({"model": weights, "model_ema": ema, "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "max_accuracy": 78.61, "epoch": 299,
                "max_accuray_ema": 78.7, "config": authors_config()}, path)
    return path, weights, ema


def _assert_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor], skip: str = "\0") -> None:
    state = model.state_dict()
    checked = [k for k in expected if not k.startswith(skip)]
    assert checked
    for key in checked:
        assert torch.equal(state[key], expected[key]), key


def test_loads_model_and_ema_weights(official_file):
    path, weights, ema = official_file
    model = defmamba.build_model("defmamba_tiny")
    report = load_checkpoint(model, path)
    assert report.source_key == "model" and not report.missing and not report.unexpected
    _assert_weights(model, weights)
    assert set(model.state_dict()) == set(weights)  # the official key set, exactly
    report = load_checkpoint(model, path, key="model_ema")
    assert report.source_key == "model_ema"
    _assert_weights(model, ema)


def test_timm_pretrained_from_local_file(official_file):
    path, weights, _ = official_file
    model = timm.create_model("defmamba_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    _assert_weights(model, weights)
    assert model.pretrained_cfg["file"] == str(path)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_timm_pretrained_with_new_head_and_features(official_file):
    path, weights, _ = official_file
    model = timm.create_model("defmamba_tiny", pretrained=True, num_classes=7, pretrained_cfg_overlay=dict(file=str(path)))
    _assert_weights(model, weights, skip="classifier.head.")
    assert model.classifier.head.weight.shape == (7, 384)
    features = timm.create_model("defmamba_tiny", pretrained=True, features_only=True, out_indices=(1, 3),
                                 pretrained_cfg_overlay=dict(file=str(path)))
    with torch.no_grad():
        maps = features(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(1, 96, 8, 12), (1, 384, 2, 3)]  # strides 8 and 32


def test_wrong_variant_is_explained(official_file):
    path, _, _ = official_file
    with pytest.raises(CheckpointError, match="looks like DefMamba-Tiny"):
        timm.create_model("defmamba_small", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_pretrained_without_file_points_to_the_download():
    with pytest.raises(CheckpointError, match="drive.google.com"):
        timm.create_model("defmamba_tiny", pretrained=True)
