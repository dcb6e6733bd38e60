# DefMamba-Tiny variant of upernet_defmamba-s_8xb2-160k_ade20k-512x512.py (stage widths 48-384).
# The paper gives no segmentation setting for Tiny; drop-path 0.2 is our choice.
_base_ = ['./upernet_defmamba-s_8xb2-160k_ade20k-512x512.py']

pretrained = 'pretrained/defmamba_tiny.pth'

model = dict(
    backbone=dict(arch='tiny', drop_path_rate=0.2, init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[48, 96, 192, 384]),
    auxiliary_head=dict(in_channels=192))
