# Mask R-CNN 1x (12 epochs) on COCO with a DefMamba-Small backbone, as in the paper
# (47.5 box AP / 42.8 mask AP). Everything not set here (Mask R-CNN heads, COCO pipeline,
# AdamW lr 1e-4 / wd 0.05, 12-epoch schedule, 8 GPUs x 2 images) comes from mmdet's
# Swin-T Mask R-CNN config, which the authors' configs also start from.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py']
custom_imports = dict(imports=['defmamba.mm'], allow_failed_imports=False)

# Official ImageNet-1k classification checkpoint (their {'model': ...} format loads as is);
# train from scratch with --cfg-options model.backbone.init_cfg=None.
pretrained = 'pretrained/defmamba_small.pth'

model = dict(
    backbone=dict(
        _delete_=True,
        type='MM_DefMamba',
        dims=96,
        depths=(2, 2, 6, 2),
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        use_checkpoint=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))

# No weight decay on norms, biases and the SSM parameters A_logs, Ds, dt_projs_bias, rpe_table.
optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True,
        norm_decay_mult=0.,
        bias_decay_mult=0.,
        flat_decay_mult=0.,
        custom_keys={
            '.A_logs': dict(decay_mult=0.),
            '.Ds': dict(decay_mult=0.),
            '.dt_projs_bias': dict(decay_mult=0.),
            '.rpe_table': dict(decay_mult=0.),
        }))
