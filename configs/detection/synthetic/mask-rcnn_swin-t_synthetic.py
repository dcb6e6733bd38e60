# Mask R-CNN, Swin-T (mmdet's config, from scratch), a short run on the synthetic shapes set (see synthetic_coco.py).
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', './synthetic_coco.py']
globals().update(_base_.synthetic_coco)
