# DefMamba-Tiny variant of mask-rcnn_defmamba-s_fpn_1x_coco.py (stage widths 48-384).
# The paper gives no detection setting for Tiny; drop-path 0.1 is our choice.
_base_ = ['./mask-rcnn_defmamba-s_fpn_1x_coco.py']

pretrained = 'pretrained/defmamba_tiny.pth'

model = dict(
    backbone=dict(arch='tiny', drop_path_rate=0.1, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[48, 96, 192, 384]))
