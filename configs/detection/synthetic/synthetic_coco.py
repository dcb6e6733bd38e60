# A short Mask R-CNN run on the synthetic shapes set of tools/make_dense_data.py (coco), for any
# Mask R-CNN config. Everything lives in the one dict `synthetic_coco`, which a model's file lays over
# its own config (a second base may not repeat the model config's keys, so it cannot set them itself):
#   _base_ = ['<model config>', './synthetic_coco.py']
#   globals().update(_base_.synthetic_coco)
# Data: SYNTHETIC_COCO=/path/to/set (default data/synthetic_coco), made by
#   python tools/make_dense_data.py coco data/synthetic_coco --train 200 --val 50 --size 1333 800
# Length: --cfg-options train_cfg.max_iters=N train_cfg.val_interval=N (the last checkpoint is kept).
# Training from scratch (no pretrained weights, nothing downloaded), 2 images per GPU, a log every
# 10 iterations (time and data_time averaged over those 10).

# Names starting with '__' stay out of the merged config.
__data_root = '{{$SYNTHETIC_COCO:data/synthetic_coco}}/'
__classes = ('circle', 'square', 'triangle', 'bar')  # tools/make_dense_data.py CLASSES
__iters = 500
__dataset = dict(data_root=__data_root, metainfo=dict(classes=__classes))
__val_dataloader = dict(dataset=dict(
    **__dataset, ann_file='annotations/instances_val.json', data_prefix=dict(img='images/val/')))
__evaluator = dict(ann_file=__data_root + 'annotations/instances_val.json')

synthetic_coco = dict(
    model=dict(
        backbone=dict(init_cfg=None),
        roi_head=dict(bbox_head=dict(num_classes=len(__classes)), mask_head=dict(num_classes=len(__classes)))),
    train_dataloader=dict(
        batch_size=2,
        num_workers=4,
        dataset=dict(
            **__dataset,
            ann_file='annotations/instances_train.json',
            data_prefix=dict(img='images/train/'),
            # the single-scale 1x pipeline for every model (some peers' configs bring multi-scale crops)
            pipeline=[
                dict(type='LoadImageFromFile'),
                dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
                dict(type='Resize', scale=(1333, 800), keep_ratio=True),
                dict(type='RandomFlip', prob=0.5),
                dict(type='PackDetInputs'),
            ])),
    val_dataloader=__val_dataloader,
    test_dataloader=__val_dataloader,
    val_evaluator=__evaluator,
    test_evaluator=__evaluator,
    train_cfg=dict(_delete_=True, type='IterBasedTrainLoop', max_iters=__iters, val_interval=__iters),
    param_scheduler=[dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=50)],
    default_hooks=dict(
        logger=dict(interval=10, log_metric_by_epoch=False),
        checkpoint=dict(by_epoch=False, interval=-1, save_last=True)),
    log_processor=dict(by_epoch=False, window_size=10),
)
