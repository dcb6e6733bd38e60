# UperNet, Swin-S (mmseg's config, from scratch), a short run on the synthetic shapes set (see synthetic_ade.py).
_base_ = ['mmseg::swin/swin-small-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py', './synthetic_ade.py']
globals().update(_base_.synthetic_ade)
