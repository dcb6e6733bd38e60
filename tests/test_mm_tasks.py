"""Mask R-CNN and UperNet built from our configs: build, train, infer, and the whole
dist_train.sh / dist_test.sh path on CPU (gloo) with the real COCO metric and mIoU.

Datasets are generated on the fly (a few small images with boxes, masks and label maps);
models use tiny widths through the same config overrides a user would write.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet", reason="mmdet not installed (optional extra: bash tools/install_mm.sh)")
pytest.importorskip("mmseg", reason="mmsegmentation not installed (optional extra: bash tools/install_mm.sh)")

from PIL import Image  # noqa: E402

from defmamba.mm import MM_DefMamba  # noqa: E402
from defmamba.mm.runner import (_adapt_to_cpu_distributed, _set_ddp_wrapper, build_task_model,  # noqa: E402
                                configure_threads, load_task_config)

REPO = Path(__file__).resolve().parents[1]
DET = REPO / "configs" / "detection"
SEG = REPO / "configs" / "segmentation"
VARIANTS = {"t": ([48, 96, 192, 384], (2, 2, 5, 2)), "s": ([96, 192, 384, 768], (2, 2, 6, 2)),
            "b": ([96, 192, 384, 768], (2, 3, 16, 2))}
DET_CLASSES = ("square", "bar")


# ---------------------------------------------------------------- tiny datasets


def make_coco(root: Path, num_images: int = 4, height: int = 96, width: int = 128) -> Path:
    """COCO-format instance set: each image holds a filled square and a filled bar, with polygons."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(num_images):
        img = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
        objects = []
        x, y, s = int(rng.integers(4, width // 2)), int(rng.integers(4, height // 2)), int(rng.integers(20, 36))
        objects.append((1, x, y, s, s, (220, 40, 40)))
        x, y = int(rng.integers(4, width - 60)), int(rng.integers(4, height - 20))
        objects.append((2, x, y, 50, 12, (40, 200, 60)))
        for cat, x, y, w, h, colour in objects:
            img[y:y + h, x:x + w] = colour
            annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=cat, iscrowd=0,
                                    bbox=[x, y, w, h], area=float(w * h),
                                    segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]]))
        name = f"{i:03d}.jpg"
        Image.fromarray(img).save(root / "images" / name, quality=95)
        images.append(dict(id=i + 1, file_name=name, height=height, width=width))
    categories = [dict(id=k + 1, name=n) for k, n in enumerate(DET_CLASSES)]
    path = root / "annotations.json"
    path.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return path


def make_ade(root: Path, num_images: int = 3, height: int = 64, width: int = 96) -> None:
    """ADE20K layout: images/{training,validation}/*.jpg and 1-based label maps (0 = ignore)."""
    rng = np.random.default_rng(1)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(num_images):
            label = np.zeros((height, width), dtype=np.uint8)
            label[: height // 2] = 1
            label[height // 2:, : width // 2] = 2
            label[height // 2:, width // 2:] = 3
            label[:4] = 0
            img = (label[..., None] * np.array([60, 30, 90], dtype=np.uint8) + rng.integers(0, 40, (height, width, 3))
                   ).astype(np.uint8)
            Image.fromarray(img).save(root / "images" / split / f"{i:03d}.jpg", quality=95)
            Image.fromarray(label).save(root / "annotations" / split / f"{i:03d}.png")


def write_det_config(root: Path) -> Path:
    """Our Tiny Mask R-CNN config, shrunk (tiny widths, small images) and pointed at the tiny set."""
    text = f"""
_base_ = [{str(DET / 'mask-rcnn_defmamba-t_fpn_1x_coco.py')!r}]
data_root = {str(root) + '/'!r}
classes = {DET_CLASSES!r}
model = dict(
    backbone=dict(arch=None, dims=16, depths=(1, 1, 1, 1), drop_path_rate=0.1, init_cfg=None),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes=2),
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(in_channels=32, conv_out_channels=32, num_classes=2)),
    train_cfg=dict(rpn=dict(sampler=dict(num=64)), rpn_proposal=dict(nms_pre=200, max_per_img=100),
                   rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=100), rcnn=dict(max_per_img=20)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(128, 96), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 96), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
dataset = dict(data_root=data_root, ann_file='annotations.json', data_prefix=dict(img='images/'),
               metainfo=dict(classes=classes))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(**dataset, pipeline=train_pipeline, filter_cfg=dict(filter_empty_gt=True, min_size=4)))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(**dataset, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations.json')
test_evaluator = val_evaluator
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=2, val_interval=2)
param_scheduler = [dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=2)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(by_epoch=False, interval=2, max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
"""
    path = root / "tiny_mask_rcnn.py"
    path.write_text(text)
    return path


def write_seg_config(root: Path) -> Path:
    """Our Tiny UperNet config, shrunk and pointed at the tiny ADE-format set."""
    text = f"""
_base_ = [{str(SEG / 'upernet_defmamba-t_8xb2-160k_ade20k-512x512.py')!r}]
data_root = {str(root)!r}
crop_size = (64, 64)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch=None, dims=16, depths=(1, 1, 1, 1), drop_path_rate=0.1, init_cfg=None),
    decode_head=dict(in_channels=[16, 32, 64, 128], channels=32),
    auxiliary_head=dict(in_channels=64, channels=16))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(96, 64), ratio_range=(0.75, 1.25), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(96, 64), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')]
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug', transforms=[
        [dict(type='Resize', scale_factor=r, keep_ratio=True) for r in (0.75, 1.0, 1.25)],
        [dict(type='RandomFlip', prob=0., direction='horizontal'),
         dict(type='RandomFlip', prob=1., direction='horizontal')],
        [dict(type='LoadAnnotations')], [dict(type='PackSegInputs')]])]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=2, val_interval=2)
param_scheduler = [dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=2)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(by_epoch=False, interval=2, max_keep_ckpts=1))
"""
    path = root / "tiny_upernet.py"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- building from the shipped configs


@pytest.mark.parametrize("schedule", ["1x", "ms-crop-3x"])
def test_mask_rcnn_configs_match_variant_widths(schedule):
    from mmdet.registry import MODELS

    for variant, (dims, depths) in VARIANTS.items():
        cfg = load_task_config("det", str(DET / f"mask-rcnn_defmamba-{variant}_fpn_{schedule}_coco.py"))
        assert cfg.model.backbone.type == "MM_DefMamba"
        names = {"t": "tiny", "s": "small", "b": "base"}
        assert cfg.model.backbone.init_cfg == dict(type="Pretrained", checkpoint=f"pretrained/defmamba_{names[variant]}.pth")
        # the variant is named, not restated: its widths and depths come from defmamba.variants
        assert cfg.model.backbone.arch == names[variant] and "dims" not in cfg.model.backbone
        assert "depths" not in cfg.model.backbone
        assert list(cfg.model.neck.in_channels) == dims
        assert cfg.optim_wrapper.optimizer.type == "AdamW"
        assert cfg.train_cfg.max_epochs == (12 if schedule == "1x" else 36)
        if variant == "s":
            assert cfg.model.backbone.drop_path_rate == 0.2
        if variant != "t":  # Tiny is built whole below
            backbone = MODELS.build({**cfg.model.backbone, "init_cfg": None})
            assert backbone.dims == dims and tuple(backbone.depths) == depths


def test_upernet_configs_match_variant_widths():
    from mmseg.registry import MODELS

    for variant, (dims, depths) in VARIANTS.items():
        cfg = load_task_config("seg", str(SEG / f"upernet_defmamba-{variant}_8xb2-160k_ade20k-512x512.py"))
        assert list(cfg.model.decode_head.in_channels) == dims
        assert cfg.model.auxiliary_head.in_channels == dims[2]
        assert cfg.model.decode_head.num_classes == 150
        assert cfg.model.backbone.arch == {"t": "tiny", "s": "small", "b": "base"}[variant]
        assert "dims" not in cfg.model.backbone and "depths" not in cfg.model.backbone
        assert cfg.train_cfg.max_iters == 160000
        assert cfg.optim_wrapper.optimizer.lr == pytest.approx(6e-5)
        if variant == "s":
            assert cfg.model.backbone.drop_path_rate == 0.3
        if variant != "t":
            backbone = MODELS.build({**cfg.model.backbone, "init_cfg": None})
            assert backbone.dims == dims and tuple(backbone.depths) == depths


def test_tiny_detector_and_segmentor_build_from_shipped_configs():
    det_cfg = load_task_config("det", str(DET / "mask-rcnn_defmamba-t_fpn_1x_coco.py"),
                               {"model.backbone.init_cfg": None})
    detector = build_task_model("det", det_cfg)
    assert type(detector).__name__ == "MaskRCNN" and isinstance(detector.backbone, MM_DefMamba)
    assert detector.backbone.dims == [48, 96, 192, 384] and tuple(detector.backbone.depths) == (2, 2, 5, 2)
    assert detector.roi_head.bbox_head.num_classes == 80

    seg_cfg = load_task_config("seg", str(SEG / "upernet_defmamba-t_8xb2-160k_ade20k-512x512.py"),
                               {"model.backbone.init_cfg": None})
    segmentor = build_task_model("seg", seg_cfg)
    assert type(segmentor).__name__ == "EncoderDecoder" and isinstance(segmentor.backbone, MM_DefMamba)
    assert type(segmentor.decode_head).__name__ == "UPerHead"
    with torch.no_grad():
        logits = segmentor.eval()(torch.randn(1, 3, 64, 96), mode="tensor")
    assert logits.shape == (1, 150, 16, 24)


def _authors_no_decay_keys() -> list[str]:
    """The custom keys with decay_mult 0 of the authors' mm rule, as tests/fixtures records it."""
    import re

    rule = json.loads((REPO / "tests" / "fixtures" / "recipe_param_groups.json").read_text())["mm_rule"]
    keys = re.findall(r"'(\w+)': decay_mult 0", rule)
    assert keys and "biases included, decayed" in rule, rule
    return keys


# (task, the variant's shipped configs, the base AdamW weight decay); a variant's configs share one model
SHIPPED_CONFIGS = [("det", [f"mask-rcnn_defmamba-{v}_fpn_{s}_coco.py" for s in ("1x", "ms-crop-3x")], 0.05)
                   for v in "tsb"] + [("seg", [f"upernet_defmamba-{v}_8xb2-160k_ade20k-512x512.py"], 0.01) for v in "tsb"]


@pytest.mark.parametrize("task,names,weight_decay", SHIPPED_CONFIGS, ids=lambda x: x[0] if isinstance(x, list) else None)
def test_weight_decay_is_the_authors_rule(task, names, weight_decay):
    """mmengine's optimizer constructor on each shipped config gives every parameter of the whole
    model the authors' decay: 0 where the name contains one of their keys (mmengine's substring
    match), the base AdamW weight decay everywhere else, biases and SSM parameters included."""
    from mmengine.optim import build_optim_wrapper

    keys = _authors_no_decay_keys()
    configs = [load_task_config(task, str((DET if task == "det" else SEG) / name), {"model.backbone.init_cfg": None})
               for name in names]
    assert all(cfg.model == configs[0].model for cfg in configs)
    model = build_task_model(task, configs[0])
    named = dict(model.named_parameters())
    expected = {n: 0.0 if any(k in n for k in keys) else weight_decay for n in named}
    for name, cfg in zip(names, configs):
        assert cfg.optim_wrapper.optimizer.weight_decay == weight_decay, name
        optim = build_optim_wrapper(model, cfg.optim_wrapper)
        decay = {id(p): group["weight_decay"] for group in optim.optimizer.param_groups for p in group["params"]}
        assert len(decay) == len(named), name
        assert {n: decay[id(p)] for n, p in named.items()} == expected, name
    exempt = {n for n, wd in expected.items() if wd == 0.0}
    # what the rule means for DefMamba: the block and output norms are exempt, and nothing else
    assert "backbone.layers.0.blocks.0.norm.weight" in exempt and "backbone.outnorm3.bias" in exempt
    for kept in ("op.A_logs", "op.Ds", "op.dt_projs_bias", "op.DS.rpe_table", "mlp.fc1.bias", "op.DS.conv_offset.ln.weight"):
        assert "backbone.layers.0.blocks.0." + kept not in exempt, kept


# ---------------------------------------------------------------- one iteration in-process


def _train_and_infer(task: str, cfg, first_param: str, device: str = "cpu"):
    """One training step and inference on one held-out image; returns the losses, the prediction
    and the model (in eval mode, on ``device``)."""
    from mmengine.dataset import pseudo_collate
    from mmengine.optim import build_optim_wrapper

    model = build_task_model(task, cfg).to(device)  # also sets the default scope
    if task == "det":
        from mmdet.registry import DATASETS
    else:
        from mmseg.registry import DATASETS
    train_set = DATASETS.build(cfg.train_dataloader.dataset)
    val_set = DATASETS.build(cfg.val_dataloader.dataset)
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    param = dict(model.named_parameters())[first_param]
    before = param.detach().clone()
    model.train()
    # a dynamic loss scale starts high (2^16) and skips the steps whose fp16 gradients overflow while
    # it comes down: allow a few
    for _ in range(1 if cfg.optim_wrapper.type == "OptimWrapper" else 8):
        losses = model.train_step(pseudo_collate([train_set[0], train_set[1]]), optim)
        assert all(torch.isfinite(v).all() for v in losses.values())
        if not torch.equal(before, param.detach()):
            break
    assert not torch.equal(before, param.detach()), "the optimizer step did not reach the backbone"
    model.eval()
    with torch.no_grad():
        return losses, model.test_step(pseudo_collate([val_set[0]]))[0], model


def test_mask_rcnn_trains_one_iteration_and_predicts(tmp_path):
    make_coco(tmp_path)
    cfg = load_task_config("det", str(write_det_config(tmp_path)))
    losses, result, _ = _train_and_infer("det", cfg, "backbone.layers.0.blocks.0.op.A_logs")
    assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"} <= set(losses)
    pred = result.pred_instances
    assert pred.bboxes.shape[1] == 4 and len(pred) <= 20
    assert pred.masks.shape[1:] == (96, 128)  # original image size
    assert set(pred.labels.tolist()) <= {0, 1}


def test_upernet_trains_one_iteration_and_predicts(tmp_path):
    make_ade(tmp_path)
    cfg = load_task_config("seg", str(write_seg_config(tmp_path)))
    losses, result, _ = _train_and_infer("seg", cfg, "backbone.layers.3.blocks.0.op.Ds")
    assert {"decode.loss_ce", "aux.loss_ce"} <= set(losses)
    assert result.pred_sem_seg.data.shape == (1, 64, 96)
    assert set(result.gt_sem_seg.data.unique().tolist()) == {0, 1, 2, 255}  # labels 1-3 shifted, 0 ignored


def test_upernet_steps_with_the_graphed_backbone_equal_eager_ones(tmp_path, monkeypatch):
    """``model.backbone.graphed_training=True`` inside mmseg's training step, with the backbone's graphs
    emulated on the CPU (tests/graph_emulation.py): recorded once, replayed at every step, and the
    steps give the eager losses and weights bit for bit (random draws off: warm-up runs and replays
    draw differently)."""
    import copy

    from graph_emulation import emulate_cuda_graphs
    from graph_helpers import assert_trained_identically
    from mmengine.dataset import pseudo_collate
    from mmengine.optim import build_optim_wrapper

    emulate_cuda_graphs(monkeypatch)
    make_ade(tmp_path)
    cfg = load_task_config("seg", str(write_seg_config(tmp_path)))
    cfg.model.backbone.drop_path_rate = 0.0
    cfg.model.decode_head.dropout_ratio = cfg.model.auxiliary_head.dropout_ratio = 0.0
    runs = {}
    for graphed in (False, True):
        cfg.model.backbone.graphed_training = graphed
        torch.manual_seed(0)
        model = build_task_model("seg", cfg).train()  # also sets the default scope
        if not graphed:
            from mmseg.registry import DATASETS

            train_set = DATASETS.build(cfg.train_dataloader.dataset)
            batches = [pseudo_collate([train_set[i], train_set[j]]) for i, j in ((0, 1), (2, 0), (1, 2))]
        optim = build_optim_wrapper(model, cfg.optim_wrapper)
        losses = [{k: v.item() for k, v in model.train_step(copy.deepcopy(batch), optim).items()} for batch in batches]
        runs[graphed] = losses, model
    (eager_losses, eager), (graphed_losses, graphed) = runs[False], runs[True]
    assert graphed_losses == eager_losses
    assert_trained_identically(eager.named_parameters(), graphed.parameters())
    graphs = graphed.backbone.__dict__["_graphed_training"]
    (recorded,) = graphs._graphs.values()
    assert recorded.forward_graph.replays == recorded.backward_graph.replays == len(batches)
    assert eager.backbone.__dict__.get("_graphed_training") is None


# ---------------------------------------------------------------- on the GPU, with AMP


def _gpu_amp_config(task: str, root: Path):
    """The tiny config as ``--amp`` runs it on one GPU: AmpOptimWrapper with a dynamic loss scale,
    and plain BN for SyncBN (no process group in-process)."""
    from defmamba.mm.runner import syncbn_to_bn

    if task == "det":
        make_coco(root)
        cfg = load_task_config("det", str(write_det_config(root)))
    else:
        make_ade(root)
        cfg = load_task_config("seg", str(write_seg_config(root)))
    cfg.optim_wrapper.type = "AmpOptimWrapper"
    cfg.optim_wrapper.loss_scale = "dynamic"
    syncbn_to_bn(cfg.model)
    return cfg


def _assert_same_on_the_cpu(gpu_model, inputs: torch.Tensor) -> None:
    """The GPU model's features equal the same weights' features on the CPU (float32, eval mode; TF32
    off, which cuDNN convolutions use by default and which rounds to 10 mantissa bits)."""
    import copy

    cpu_model = copy.deepcopy(gpu_model).cpu().float()
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            features = gpu_model.extract_feat(inputs.cuda())
            expected = cpu_model.extract_feat(inputs)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    for got, want in zip(features, expected):
        scale = want.abs().max().item()
        assert (got.cpu() - want).abs().max().item() <= 1e-4 * max(scale, 1.0), "GPU and CPU features differ"


@pytest.mark.cuda
def test_mask_rcnn_amp_step_and_inference_on_the_gpu(tmp_path):
    """Needs mmcv's CUDA ops (RoIAlign, NMS): a CPU-only build fails here, not with a skip."""
    cfg = _gpu_amp_config("det", tmp_path)
    losses, result, model = _train_and_infer("det", cfg, "backbone.layers.0.blocks.0.op.A_logs", device="cuda")
    assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"} <= set(losses)
    pred = result.pred_instances
    assert pred.bboxes.is_cuda and pred.bboxes.shape[1] == 4 and len(pred) <= 20
    assert pred.masks.shape[1:] == (96, 128)
    torch.manual_seed(0)
    _assert_same_on_the_cpu(model, torch.randn(1, 3, 96, 128))


@pytest.mark.cuda
def test_upernet_amp_step_and_inference_on_the_gpu(tmp_path):
    cfg = _gpu_amp_config("seg", tmp_path)
    losses, result, model = _train_and_infer("seg", cfg, "backbone.layers.3.blocks.0.op.Ds", device="cuda")
    assert {"decode.loss_ce", "aux.loss_ce"} <= set(losses)
    assert result.pred_sem_seg.data.is_cuda and result.pred_sem_seg.data.shape == (1, 64, 96)
    torch.manual_seed(0)
    _assert_same_on_the_cpu(model, torch.randn(1, 3, 64, 96))


@pytest.mark.cuda
def test_upernet_amp_steps_with_the_graphed_backbone(tmp_path):
    """``model.backbone.graphed_training=True``: the AMP steps replay the backbone from CUDA graphs
    (recorded once for the fixed crop); evaluation runs it eagerly and still matches the CPU."""
    cfg = _gpu_amp_config("seg", tmp_path)
    cfg.model.backbone.graphed_training = True
    losses, result, model = _train_and_infer("seg", cfg, "backbone.layers.3.blocks.0.op.Ds", device="cuda")
    assert {"decode.loss_ce", "aux.loss_ce"} <= set(losses)
    assert model.backbone.__dict__["_graphed_training"].signatures == 1
    torch.manual_seed(0)
    _assert_same_on_the_cpu(model, torch.randn(1, 3, 64, 96))


# ---------------------------------------------------------------- CPU distributed plumbing


def test_cpu_distributed_config_drops_device_ids_and_syncbn():
    cfg = load_task_config("seg", str(SEG / "upernet_defmamba-t_8xb2-160k_ade20k-512x512.py"))
    assert cfg.model.decode_head.norm_cfg.type == "SyncBN"
    _set_ddp_wrapper(cfg)  # as the entry points do for any launcher, then for a CPU run:
    _adapt_to_cpu_distributed(cfg)
    assert cfg.model_wrapper_cfg["device_ids"] is None
    assert cfg.model_wrapper_cfg["type"] == "MMDistributedDataParallel"
    # mmengine's own DDP settings, the gradients kept in DDP's buckets (as on the GPU)
    assert cfg.model_wrapper_cfg["broadcast_buffers"] is False
    assert cfg.model_wrapper_cfg["find_unused_parameters"] is False
    assert cfg.model_wrapper_cfg["gradient_as_bucket_view"] is True
    assert cfg.env_cfg.dist_cfg.backend == "gloo"
    assert "SyncBN" not in repr(cfg.model.to_dict())
    assert cfg.model.decode_head.norm_cfg.type == cfg.model.auxiliary_head.norm_cfg.type == "BN"


def test_ddp_keeps_gradients_in_its_buckets_and_the_configs_own_settings():
    """Distributed runs (GPU or CPU) wrap the model as mmengine does by default, with the gradients
    kept as views of DDP's buckets; what the config sets itself wins."""
    cfg = load_task_config("det", str(DET / "mask-rcnn_defmamba-t_fpn_1x_coco.py"), {"find_unused_parameters": True})
    _set_ddp_wrapper(cfg)
    assert cfg.model_wrapper_cfg == dict(type="MMDistributedDataParallel", broadcast_buffers=False,
                                         find_unused_parameters=True, gradient_as_bucket_view=True)
    cfg.model_wrapper_cfg = dict(gradient_as_bucket_view=False)
    _set_ddp_wrapper(cfg)
    assert cfg.model_wrapper_cfg["gradient_as_bucket_view"] is False


def test_threads_default_to_the_process_share_of_cores(monkeypatch):
    previous = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "0")  # records the original state, so what configure_threads sets is undone
        monkeypatch.delenv(var)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    try:
        threads = configure_threads()
        assert threads == len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == threads and os.environ["OMP_NUM_THREADS"] == str(threads)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_threads() == 1  # a user's explicit choice wins
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------- dist_train.sh / dist_test.sh end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(script: Path, *args: str) -> str:
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(_free_port()))
    proc = subprocess.run(["bash", str(script), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def _logged_metrics(work_dir: Path) -> dict:
    """The last metrics record of mmengine's json logs (training: per-iteration scalars; test: one record)."""
    records = []
    for log in sorted(work_dir.rglob("*.json")):
        records += [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return next(r for r in reversed(records) if any(k.startswith(("coco/", "mIoU")) for k in r))


def test_dist_train_and_test_mask_rcnn_on_cpu():
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_coco(root / "coco")
        config = write_det_config(root / "coco")
        work = root / "work"
        out = _run(REPO / "detection" / "dist_train.sh", str(config), "1", "--work-dir", str(work))
        assert "Iter(train) [2/2]" in out
        metrics = _logged_metrics(work)
        for key in ("coco/bbox_mAP", "coco/bbox_mAP_50", "coco/segm_mAP"):
            assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
        checkpoint = work / "iter_2.pth"
        assert checkpoint.is_file() and checkpoint.stat().st_size < 30e6

        preds = root / "preds.pkl"
        _run(REPO / "detection" / "dist_test.sh", str(config), str(checkpoint), "1",
             "--work-dir", str(root / "test"), "--out", str(preds))
        test_metrics = _logged_metrics(root / "test")
        assert test_metrics["coco/bbox_mAP"] == pytest.approx(metrics["coco/bbox_mAP"], abs=1e-4)
        import pickle

        with open(preds, "rb") as f:
            assert len(pickle.load(f)) == 4


def test_dist_train_and_test_upernet_on_cpu():
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_ade(root / "ade")
        config = write_seg_config(root / "ade")
        work = root / "work"
        out = _run(REPO / "segmentation" / "dist_train.sh", str(config), "1", "--work-dir", str(work))
        assert "Iter(train) [2/2]" in out
        metrics = _logged_metrics(work)
        assert 0.0 <= metrics["mIoU"] <= 100.0, metrics
        checkpoint = work / "iter_2.pth"
        assert checkpoint.is_file() and checkpoint.stat().st_size < 30e6

        _run(REPO / "segmentation" / "dist_test.sh", str(config), str(checkpoint), "1",
             "--work-dir", str(root / "test"), "--tta")
        tta = _logged_metrics(root / "test")
        assert 0.0 <= tta["mIoU"] <= 100.0, tta


# ---------------------------------------------------------------- FLOPs of whole detectors / segmentors


@pytest.mark.parametrize("task", ["det", "seg"])
def test_task_flops_count_backbone_and_heads(task, tmp_path):
    pytest.importorskip("fvcore", reason="FLOP counting needs fvcore")
    from defmamba.flops import count_flops
    from defmamba.mm.runner import count_task_flops

    config = write_det_config(tmp_path) if task == "det" else write_seg_config(tmp_path)
    size = (3, 96, 128)
    total = count_task_flops(task, str(config), size)
    assert count_task_flops(task, str(config), size[1:]) == total  # (H, W) means 3 channels
    backbone = MM_DefMamba(arch=None, dims=16, depths=(1, 1, 1, 1))
    backbone_flops, _ = count_flops(backbone, size)
    # The heads are far heavier than this 16-wide backbone: FPN + RPN + RoI heads, or UperNet.
    assert total > 2 * backbone_flops
    with pytest.raises(ValueError, match="input_shape"):
        count_task_flops(task, str(config), (1, 3, 96, 128))
