# Mask R-CNN 3x (36 epochs) with multi-scale training and random crops, DefMamba-Small backbone.
# Pipeline, schedule and AdamW settings come from mmdet's Swin-T multi-scale 3x config.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py']
custom_imports = dict(imports=['defmamba.mm'], allow_failed_imports=False)

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
