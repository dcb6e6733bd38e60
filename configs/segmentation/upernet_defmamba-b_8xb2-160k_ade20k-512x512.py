# DefMamba-Base variant of upernet_defmamba-s_8xb2-160k_ade20k-512x512.py (depths 2-3-16-2).
# The paper gives no segmentation setting for Base; drop-path 0.5 is our choice.
_base_ = ['./upernet_defmamba-s_8xb2-160k_ade20k-512x512.py']

pretrained = 'pretrained/defmamba_base.pth'

model = dict(
    backbone=dict(arch='base', drop_path_rate=0.5, init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
