# Mask R-CNN, DefMamba-S, a short run on the synthetic shapes set (see synthetic_coco.py).
_base_ = ['../mask-rcnn_defmamba-s_fpn_1x_coco.py', './synthetic_coco.py']
globals().update(_base_.synthetic_coco)
