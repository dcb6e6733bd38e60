# Mask R-CNN 1x (12 epochs) on COCO with a DefMamba-Small backbone, as in the paper
# (47.5 box AP / 42.8 mask AP). Everything not set here (Mask R-CNN heads, COCO pipeline,
# AdamW lr 1e-4 / wd 0.05, 12-epoch schedule, 8 GPUs x 2 images) comes from mmdet's
# Swin-T Mask R-CNN config, which the authors' configs also start from. That includes their
# weight-decay rule, Swin's paramwise_cfg: no decay for parameters whose name contains 'norm'
# (or 'absolute_pos_embed' / 'relative_position_bias_table', which DefMamba does not have);
# every other parameter, biases and the SSM parameters included, is decayed.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py']
custom_imports = dict(imports=['defmamba.mm'], allow_failed_imports=False)

# Official ImageNet-1k classification checkpoint (their {'model': ...} format loads as is);
# train from scratch with --cfg-options model.backbone.init_cfg=None.
pretrained = 'pretrained/defmamba_small.pth'

model = dict(
    backbone=dict(
        _delete_=True,
        type='MM_DefMamba',
        arch='small',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        use_checkpoint=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
