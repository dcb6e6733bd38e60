# Mask R-CNN, Swin-S (mmdet's config, from scratch), a short run on the synthetic shapes set (see synthetic_coco.py).
# mmdet 3.3 ships Swin-S only as 3x multi-scale-crop with AMP; the pipeline and schedule are replaced
# by synthetic_coco.py, and AMP is left to train.py --amp as for the other models.
_base_ = ['mmdet::swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py', './synthetic_coco.py']
globals().update(_base_.synthetic_coco)
optim_wrapper = dict(type='OptimWrapper')
