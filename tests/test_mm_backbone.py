"""The mmdet/mmseg backbone wrapper: registration, official-checkpoint loading, frozen stages,
and every documented way of choosing its weights on the command line."""
import re
from pathlib import Path
from typing import Sequence

import pytest
import torch

pytest.importorskip("mmdet", reason="mmdet not installed (optional extra: bash tools/install_mm.sh)")
pytest.importorskip("mmseg", reason="mmsegmentation not installed (optional extra: bash tools/install_mm.sh)")

import defmamba  # noqa: E402
from defmamba.checkpoint import CheckpointError  # noqa: E402
from defmamba.mm import MM_DefMamba, load_backbone_weights  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
TINY = dict(arch="tiny")
TINY_DIMS = dict(dims=48, depths=(2, 2, 5, 2))  # the same variant, for the classification model


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
    path, state = _authors_checkpoint(tmp_path, **TINY_DIMS)
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
    path, state = _authors_checkpoint(tmp_path, **TINY_DIMS)
    backbone = MM_DefMamba(**TINY, init_cfg=dict(type="Pretrained", checkpoint=str(path), key="model_ema"))
    backbone.init_weights()
    weight = backbone.state_dict()["layers.2.blocks.4.op.A_logs"]
    torch.testing.assert_close(weight, state["layers.2.blocks.4.op.A_logs"] + 1.0, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["tiny", "small", "base", "defmamba_small", "Base"])
def test_arch_names_a_published_variant(arch):
    from defmamba.mm.backbone import architecture
    from defmamba.variants import VARIANTS

    spec = VARIANTS[arch.lower().removeprefix("defmamba_")]
    assert architecture(arch, None, None) == (spec.dims, spec.depths)


def test_default_backbone_is_small_and_custom_needs_arch_none():
    from defmamba.variants import VARIANTS

    backbone = MM_DefMamba()
    small = VARIANTS["small"]
    assert backbone.dims[0] == small.dims and tuple(backbone.depths) == small.depths
    custom = MM_DefMamba(arch=None, dims=16, depths=(1, 2, 1, 1))
    assert custom.dims == [16, 32, 64, 128] and tuple(custom.depths) == (1, 2, 1, 1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(arch="small", dims=48), r"arch='small' and dims=48.*set arch=None"),
    (dict(arch="tiny", depths=(1, 1, 1, 1)), r"the variant fixes both"),
    (dict(arch="huge"), r"arch must be one of \['base', 'small', 'tiny'\]"),
    (dict(arch=None, dims=48), r"arch=None needs both dims and depths"),
])
def test_arch_conflicts_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MM_DefMamba(**kwargs)


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


def test_graphed_training_option_turns_on_the_backbones_graphs():
    backbone = MM_DefMamba(**TINY, graphed_training=True)
    graphs = backbone.__dict__["_graphed_training"]
    assert graphs is not None and graphs.module is backbone
    assert list(backbone.state_dict()) == list(MM_DefMamba(**TINY).state_dict())
    assert MM_DefMamba(**TINY).__dict__.get("_graphed_training") is None
    loss = sum(o.sum() for o in backbone.train()(torch.randn(1, 3, 64, 96)))  # CPU: runs eagerly
    loss.backward()
    assert graphs.signatures == 0 and backbone.layers[2].blocks[0].mlp.fc1.weight.grad is not None


def test_graphed_training_as_the_segmentation_readme_turns_it_on():
    backbone = _backbone_from_command_line(["model.backbone.init_cfg=None", "model.backbone.graphed_training=True"])
    assert backbone.__dict__["_graphed_training"].module is backbone


def test_outputs_follow_out_indices():
    backbone = MM_DefMamba(arch=None, dims=32, depths=(1, 1, 1, 1), out_indices=(1, 3)).eval()
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
    torch.save({"state_dict": MM_DefMamba(arch=None, dims=16, depths=(1, 1, 1, 1)).state_dict(),
                "message_hub": hub.state_dict()}, path)
    loaded = _safe_local_loader(allow_pickle=False)(str(path))
    buffer = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buffer, HistoryBuffer) and buffer.mean() == 1.0

    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "x": _LooksUpAnotherMethod()}, evil)
    with pytest.raises(CheckpointError):
        _safe_local_loader(allow_pickle=False)(str(evil))
    with pytest.raises(CheckpointError):
        load_backbone_weights(MM_DefMamba(arch=None, dims=16, depths=(1, 1, 1, 1)), str(evil))


# ---------------------------------------------------------------- the documented --cfg-options

REPO = Path(__file__).resolve().parents[1]
TINY_DET_CONFIG = REPO / "configs" / "detection" / "mask-rcnn_defmamba-t_fpn_1x_coco.py"
WEIGHT_DOCS = (REPO / "docs" / "pretrained.md", REPO / "detection" / "README.md", REPO / "segmentation" / "README.md")
DOCUMENTED_PATH = "/path/to/defmamba_small.pth"
# What each documented option set loads: (file, entry); "config" is the file the config names,
# "named" the one on the command line; None: no checkpoint is read.
DOCUMENTED_WEIGHT_OPTIONS = {
    ("model.backbone.pretrained=" + DOCUMENTED_PATH,): ("named", "model"),
    ("model.backbone.init_cfg.key=model_ema",): ("config", "model_ema"),
    ("model.backbone.pretrained=" + DOCUMENTED_PATH, "model.backbone.init_cfg.key=model_ema"): ("named", "model_ema"),
    ("model.backbone.init_cfg=None",): None,
}
# Value added to every tensor of each (file, entry), so the loaded weights tell which one was read.
SHIFTS = {("config", "model"): 0.0, ("config", "model_ema"): 1.0, ("named", "model"): 10.0, ("named", "model_ema"): 11.0}


def _documented_weight_options() -> set[tuple[str, ...]]:
    """Every `--cfg-options model.backbone.pretrained…/init_cfg…` set that the docs show."""
    pattern = re.compile(r"--cfg-options((?:\s+model\.backbone\.(?:pretrained|init_cfg)[\w.]*=[^\s`]+)+)")
    return {tuple(m.group(1).split()) for doc in WEIGHT_DOCS for m in pattern.finditer(doc.read_text())}


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The Tiny config's default file (pretrained/defmamba_tiny.pth under a working directory) and a
    file stored elsewhere, both in the authors' layout, and the untouched weights."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in defmamba.DefMamba(**TINY_DIMS).state_dict().items()}
    files = {"config": root / "work" / "pretrained" / "defmamba_tiny.pth", "named": root / "elsewhere" / "tiny.pth"}
    for which, path in files.items():
        path.parent.mkdir(parents=True)
        torch.save({entry: {k: v + SHIFTS[which, entry] for k, v in state.items()} for entry in ("model", "model_ema")},
                   path)
    return root / "work", files["named"], state


def _backbone_from_command_line(cfg_options: Sequence[str]) -> MM_DefMamba:
    """The backbone as detection/train.py builds it from the Tiny config and these --cfg-options,
    after the runner's init_weights."""
    from mmdet.registry import MODELS

    from defmamba.mm.runner import _train_parser, load_task_config

    args = _train_parser("det").parse_args([str(TINY_DET_CONFIG), *(["--cfg-options", *cfg_options] if cfg_options else [])])
    cfg = load_task_config("det", args.config, args.cfg_options)
    backbone = MODELS.build(cfg.model.backbone)
    backbone.init_weights()
    return backbone


def test_every_documented_weight_option_is_tested():
    assert _documented_weight_options() == set(DOCUMENTED_WEIGHT_OPTIONS)


@pytest.mark.parametrize("options", sorted(DOCUMENTED_WEIGHT_OPTIONS), ids=" ".join)
def test_documented_weight_options_load_what_the_docs_say(options, weight_files, monkeypatch):
    workdir, named, state = weight_files
    monkeypatch.chdir(workdir)  # the config names its file relative to the working directory
    backbone = _backbone_from_command_line([o.replace(DOCUMENTED_PATH, str(named)) for o in options])
    expected = DOCUMENTED_WEIGHT_OPTIONS[options]
    name = "layers.2.blocks.4.op.A_logs"
    if expected is None:
        assert backbone.load_report is None and backbone.init_cfg is None
        torch.testing.assert_close(backbone.state_dict()[name], state[name], rtol=0, atol=0)  # the same seed's init
        return
    which, entry = expected
    assert backbone.load_report.source == ("pretrained/defmamba_tiny.pth" if which == "config" else str(named))
    torch.testing.assert_close(backbone.state_dict()[name], state[name] + SHIFTS[expected], rtol=0, atol=0)


def test_missing_checkpoint_hint_works(tmp_path, monkeypatch):
    """The error for a missing file names the option that trains without one; that option works."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="pretrained/defmamba_tiny.pth") as error:
        _backbone_from_command_line([])
    hint = re.search(r"random weights with --cfg-options (\S+)", str(error.value))
    assert hint, str(error.value)
    assert _backbone_from_command_line([hint.group(1)]).load_report is None


def test_pretrained_and_init_cfg_that_disagree_are_refused():
    with pytest.raises(ValueError, match="disagree"):
        MM_DefMamba(**TINY, pretrained="a.pth", init_cfg=dict(type="Kaiming"))
    with pytest.raises(ValueError, match="path or URL"):
        MM_DefMamba(**TINY, pretrained=True)
    # A dict in braces reaches the backbone as a list of strings; the error says how to write it.
    with pytest.raises(ValueError, match="one by one.*init_cfg.key=model_ema"):
        _backbone_from_command_line(["model.backbone.init_cfg={type:'Pretrained',checkpoint:'x.pth',key:'model_ema'}"])


def test_pretrained_keeps_the_other_init_cfg_entries():
    backbone = MM_DefMamba(**TINY, pretrained="b.pth", init_cfg=dict(type="Pretrained", checkpoint="a.pth", key="model"))
    assert backbone.init_cfg == dict(type="Pretrained", checkpoint="b.pth", key="model")
    assert MM_DefMamba(**TINY, pretrained="b.pth").init_cfg == dict(type="Pretrained", checkpoint="b.pth")
