# DefMamba-Base variant of mask-rcnn_defmamba-s_fpn_1x_coco.py (stage widths 96-768, depths 2-3-16-2).
# The paper gives no detection setting for Base; drop-path 0.4 (its classification rate) is our choice.
_base_ = ['./mask-rcnn_defmamba-s_fpn_1x_coco.py']

pretrained = 'pretrained/defmamba_base.pth'

model = dict(
    backbone=dict(arch='base', drop_path_rate=0.4, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
