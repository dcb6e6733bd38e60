# UperNet, 160k iterations on ADE20K 512x512 crops, DefMamba-Small backbone, as in the paper
# (48.8 mIoU single-scale, 49.6 multi-scale with segmentation/test.py --tta). Everything not set
# here (UperNet/FCN heads, ADE20K pipeline and TTA pipeline, AdamW lr 6e-5 / wd 0.01, poly
# schedule with 1500 warm-up iterations, 8 GPUs x 2 images) comes from mmseg's Swin-T UperNet
# config, which the authors' configs also start from. That includes their weight-decay rule,
# Swin's paramwise_cfg: no decay for parameters whose name contains 'norm' (or
# 'absolute_pos_embed' / 'relative_position_bias_table', which DefMamba does not have); every
# other parameter, biases and the SSM parameters included, is decayed.
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']
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
        drop_path_rate=0.3,
        use_checkpoint=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150))
