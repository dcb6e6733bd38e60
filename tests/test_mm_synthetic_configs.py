"""The synthetic-data overlays (configs/*/synthetic/): each loads, points at the set named by the
environment, names tools/make_dense_data.py's classes, trains from scratch without touching the
network, and its data loads from a set the generator made."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from defmamba.variants import VARIANTS

pytest.importorskip("mmdet", reason="mmdet not installed (optional extra: bash tools/install_mm.sh)")
pytest.importorskip("mmseg", reason="mmsegmentation not installed (optional extra: bash tools/install_mm.sh)")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from tool_helpers import load_tool  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
generator = load_tool("make_dense_data")
MODELS = {"defmamba-s": "MM_DefMamba", "defmamba-t": "MM_DefMamba", "swin-t": "SwinTransformer",
          "swin-s": "SwinTransformer"}
TASKS = {  # task: (config path pattern, data root variable, class names, registry module)
    "det": ("configs/detection/synthetic/mask-rcnn_{}_synthetic.py", "SYNTHETIC_COCO", generator.CLASSES,
            "mmdet.registry"),
    "seg": ("configs/segmentation/synthetic/upernet_{}_synthetic.py", "SYNTHETIC_ADE",
            ("background", *generator.CLASSES), "mmseg.registry"),
}


def _load(task: str, model: str, data_root: Path, monkeypatch) -> Config:
    pattern, variable, _, _ = TASKS[task]
    monkeypatch.setenv(variable, str(data_root))
    return Config.fromfile(str(REPO / pattern.format(model)))


def _registry(task: str, cfg: Config, name: str):
    init_default_scope(cfg.default_scope)
    return getattr(__import__(TASKS[task][3], fromlist=[name]), name)


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, (list, tuple)):
        return [s for item in node for s in _strings(item)]
    return [node] if isinstance(node, str) else []


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("task", TASKS)
def test_overlay_sets_data_classes_schedule_and_no_pretrained_weights(task, model, tmp_path, monkeypatch):
    cfg = _load(task, model, tmp_path / "set", monkeypatch)
    classes = TASKS[task][2]
    for split in ("train", "val", "test"):
        dataset = cfg[f"{split}_dataloader"].dataset
        assert dataset.data_root.rstrip("/") == str(tmp_path / "set")
        assert tuple(dataset.metainfo.classes) == classes
    assert cfg.model.backbone.type == MODELS[model]
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.train_cfg.type == "IterBasedTrainLoop" and cfg.train_cfg.max_iters == cfg.train_cfg.val_interval
    assert cfg.default_hooks.logger.interval == 10 and cfg.log_processor.window_size == 10
    assert not cfg.log_processor.by_epoch
    if task == "det":
        heads = [cfg.model.roi_head.bbox_head, cfg.model.roi_head.mask_head]
        assert cfg.val_evaluator.ann_file == str(tmp_path / "set" / "annotations" / "instances_val.json")
        assert [step.type for step in cfg.train_dataloader.dataset.pipeline][2] == "Resize"  # single scale for all
    else:
        heads = [cfg.model.decode_head, cfg.model.auxiliary_head]
    assert [head.num_classes for head in heads] == [len(classes)] * 2
    assert cfg.optim_wrapper.type == "OptimWrapper"  # AMP only with train.py --amp, for every model
    assert not [s for s in _strings(cfg.model.to_dict()) if "Pretrained" in s or "://" in s or s.endswith(".pth")]


@pytest.mark.parametrize("task", TASKS)
def test_overlay_models_build_and_initialise_offline(task, tmp_path, monkeypatch):
    """Every model of the task, one block per stage to stay quick (tools/device/dense_tasks.sh
    builds them at full size)."""
    def no_network(*args, **kwargs):
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    classes = TASKS[task][2]
    for model in MODELS:
        cfg = _load(task, model, tmp_path, monkeypatch)
        if cfg.model.backbone.type == "MM_DefMamba":  # the named variant's widths, one block per stage
            cfg.model.backbone.dims = VARIANTS[cfg.model.backbone.arch].dims
            cfg.model.backbone.arch = None
        cfg.model.backbone.depths = (1, 1, 1, 1)
        built = _registry(task, cfg, "MODELS").build(cfg.model)
        built.init_weights()
        assert type(built.backbone).__name__ == MODELS[model]
        if task == "det":
            assert built.roi_head.bbox_head.fc_cls.out_features == len(classes) + 1  # + background
            assert built.roi_head.mask_head.conv_logits.out_channels == len(classes)
        else:
            assert built.decode_head.conv_seg.out_channels == built.auxiliary_head.conv_seg.out_channels == len(classes)


@pytest.mark.parametrize("task", TASKS)
def test_overlay_reads_what_the_generator_wrote(task, tmp_path, monkeypatch):
    root = tmp_path / task
    generator.main(["coco" if task == "det" else "ade", str(root), "--train", "2", "--val", "1", "--size", "96", "64"])
    cfg = _load(task, "defmamba-t", root, monkeypatch)
    dataset_registry = _registry(task, cfg, "DATASETS")
    train = dataset_registry.build(cfg.train_dataloader.dataset)
    val = dataset_registry.build(cfg.val_dataloader.dataset)
    assert len(val) == 1 and len(train) in (1, 2)  # mmdet drops training images without objects
    sample = train[0]["data_samples"]
    if task == "det":
        labels = sample.gt_instances.labels
        assert len(labels) > 0 and labels.max() < len(generator.CLASSES)
        assert sample.gt_instances.masks.masks.shape[0] == len(labels)
    else:
        values = set(sample.gt_sem_seg.data.unique().tolist())
        assert values <= set(range(len(generator.CLASSES) + 1)) | {255} and len(values - {255}) > 1
