# Mask R-CNN 3x (36 epochs) with multi-scale training and random crops, DefMamba-Small backbone.
# Pipeline, schedule and AdamW settings (lr 1e-4 / wd 0.05) come from mmdet's Swin-T multi-scale
# 3x config, and so does the authors' weight-decay rule (Swin's paramwise_cfg; see
# mask-rcnn_defmamba-s_fpn_1x_coco.py).
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py']
custom_imports = dict(imports=['defmamba.mm'], allow_failed_imports=False)

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
