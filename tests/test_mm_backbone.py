"""The mmdet/mmseg backbone wrapper: registration, official-checkpoint loading, frozen stages."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet", reason="mmdet not installed (optional extra: bash tools/install_mm.sh)")
pytest.importorskip("mmseg", reason="mmsegmentation not installed (optional extra: bash tools/install_mm.sh)")

import defmamba  # noqa: E402
from defmamba.checkpoint import CheckpointError  # noqa: E402
from defmamba.mm import MM_DefMamba, load_backbone_weights  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
TINY = dict(dims=48, depths=(2, 2, 5, 2))


def _reference_keys(name: str) -> list[str]:
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(f"reference key list {path} not available")
    return [line.split("\t")[0] for line in path.read_text().splitlines() if line.strip()]


def _authors_checkpoint(tmp_path: Path, **model_kwargs) -> tuple[Path, dict]:
    """A classification checkpoint in the authors' layout: model, model_ema and a yacs config."""
    from yacs.config import CfgNode

    torch.manual_seed(0)
    model = defmamba.DefMamba(**model_kwargs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path / "authors.pth"
    torch.save({"model": state, "model_ema": ema, "epoch": 299, "config": CfgNode({"MODEL": {"TYPE": "defm"}})}, path)
    return path, state


def test_registered_in_both_registries():
    from mmdet.registry import MODELS as DET_MODELS
    from mmseg.registry import MODELS as SEG_MODELS

    assert DET_MODELS.get("MM_DefMamba") is MM_DefMamba
    assert SEG_MODELS.get("MM_DefMamba") is MM_DefMamba


def test_state_dict_keys_are_the_authors_backbone_keys():
    expected = _reference_keys("keys_tiny_backbone.txt")
    backbone = MM_DefMamba(**TINY)
    assert list(backbone.state_dict()) == expected


def test_official_classification_checkpoint_loads_without_missing_backbone_keys(tmp_path):
    path, state = _authors_checkpoint(tmp_path, **TINY)
    backbone = MM_DefMamba(**TINY, init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    backbone.init_weights()
    report = backbone.load_report
    own = backbone.state_dict()
    outnorms = sorted(k for k in own if k.startswith("outnorm"))
    assert len(outnorms) == 8
    assert report.kept_initialised == outnorms
    assert report.ignored == sorted(k for k in state if k.startswith("classifier."))
    assert set(report.loaded) == set(own) - set(outnorms)
    for key in report.loaded:
        torch.testing.assert_close(own[key], state[key], rtol=0, atol=0)


def test_ema_weights_are_chosen_by_key(tmp_path):
    path, state = _authors_checkpoint(tmp_path, **TINY)
    backbone = MM_DefMamba(**TINY, init_cfg=dict(type="Pretrained", checkpoint=str(path), key="model_ema"))
    backbone.init_weights()
    weight = backbone.state_dict()["layers.2.blocks.4.op.A_logs"]
    torch.testing.assert_close(weight, state["layers.2.blocks.4.op.A_logs"] + 1.0, rtol=0, atol=0)


def test_checkpoint_of_another_variant_is_refused(tmp_path):
    path, _ = _authors_checkpoint(tmp_path, dims=48, depths=(2, 2, 6, 2))
    backbone = MM_DefMamba(**TINY, pretrained=str(path))
    with pytest.raises(CheckpointError, match=r"unexpected.*layers\.2\.blocks\.5.*another variant"):
        backbone.init_weights()


def test_detector_checkpoint_takes_the_backbone_part():
    source = MM_DefMamba(**TINY, out_indices=(1, 2, 3))
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(4, 4, 1, 1)
    target = MM_DefMamba(**TINY)
    report = load_backbone_weights(target, {"state_dict": state, "meta": {}})
    assert report.ignored == ["neck.lateral_convs.0.conv.weight"]
    assert report.kept_initialised == ["outnorm0.bias", "outnorm0.weight"]
    torch.testing.assert_close(target.outnorm3.weight, source.outnorm3.weight, rtol=0, atol=0)


def test_missing_file_is_a_clear_error():
    backbone = MM_DefMamba(**TINY, pretrained="/nonexistent/defmamba_tiny.pth")
    with pytest.raises(FileNotFoundError, match="defmamba_tiny.pth"):
        backbone.init_weights()


def test_bad_init_cfg_is_refused():
    with pytest.raises(ValueError, match="Pretrained"):
        MM_DefMamba(**TINY, init_cfg=dict(type="Kaiming"))
    with pytest.raises(ValueError, match="frozen_stages"):
        MM_DefMamba(**TINY, frozen_stages=5)


def test_frozen_stages_stay_frozen_in_train_mode():
    backbone = MM_DefMamba(**TINY, frozen_stages=2).train()
    for name, param in backbone.named_parameters():
        frozen = name.startswith(("patch_embed.", "layers.0.", "layers.1.", "outnorm0.", "outnorm1."))
        assert param.requires_grad is not frozen, name
    assert not backbone.layers[1].training and backbone.layers[2].training
    x = torch.randn(1, 3, 64, 96)
    loss = sum(o.sum() for o in backbone(x))
    loss.backward()
    assert backbone.patch_embed[0].weight.grad is None
    assert backbone.layers[2].blocks[0].mlp.fc1.weight.grad is not None


def test_outputs_follow_out_indices():
    backbone = MM_DefMamba(dims=32, depths=(1, 1, 1, 1), out_indices=(1, 3)).eval()
    outs = backbone(torch.randn(2, 3, 70, 100))
    assert [tuple(o.shape) for o in outs] == [(2, 64, 9, 13), (2, 256, 3, 4)]


class _LooksUpAnotherMethod:
    """Pickles as getattr(HistoryBuffer, 'update'): a lookup mmengine checkpoints never need."""

    def __reduce__(self):
        from mmengine.logging import HistoryBuffer

        return getattr, (HistoryBuffer, "update")


def test_mmengine_checkpoints_load_but_other_getattr_lookups_are_refused(tmp_path):
    from mmengine.logging import HistoryBuffer, MessageHub

    from defmamba.mm.checkpoint import _safe_local_loader

    hub = MessageHub("test_hub")
    hub.update_scalar("train/loss", 0.5)
    hub.update_scalar("train/loss", 1.5)
    path = tmp_path / "mm.pth"
    torch.save({"state_dict": MM_DefMamba(dims=16, depths=(1, 1, 1, 1)).state_dict(),
                "message_hub": hub.state_dict()}, path)
    loaded = _safe_local_loader(allow_pickle=False)(str(path))
    buffer = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buffer, HistoryBuffer) and buffer.mean() == 1.0

    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "x": _LooksUpAnotherMethod()}, evil)
    with pytest.raises(CheckpointError):
        _safe_local_loader(allow_pickle=False)(str(evil))
    with pytest.raises(CheckpointError):
        load_backbone_weights(MM_DefMamba(dims=16, depths=(1, 1, 1, 1)), str(evil))
