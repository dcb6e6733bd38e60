# A short UperNet run on the synthetic shapes set of tools/make_dense_data.py (ade), for any UperNet
# config. Everything lives in the one dict `synthetic_ade`, which a model's file lays over its own
# config (a second base may not repeat the model config's keys, so it cannot set them itself):
#   _base_ = ['<model config>', './synthetic_ade.py']
#   globals().update(_base_.synthetic_ade)
# Data: SYNTHETIC_ADE=/path/to/set (default data/synthetic_ade), made by
#   python tools/make_dense_data.py ade data/synthetic_ade --train 200 --val 50 --size 512 512
# Length: --cfg-options train_cfg.max_iters=N train_cfg.val_interval=N (the last checkpoint is kept).
# Training from scratch (no pretrained weights, nothing downloaded), 2 images per GPU, a log every
# 10 iterations (time and data_time averaged over those 10). Pipelines (512x512 crops, TTA) are ADE20K's.

# Names starting with '__' stay out of the merged config.
__classes = ('background', 'circle', 'square', 'triangle', 'bar')  # label 1.. of make_dense_data.py ade
__iters = 500
__dataset = dict(
    type='BaseSegDataset',  # ADE20KDataset would insist on ADE's 150 classes
    data_root='{{$SYNTHETIC_ADE:data/synthetic_ade}}',
    metainfo=dict(classes=__classes),
    img_suffix='.jpg',
    seg_map_suffix='.png',
    reduce_zero_label=True)

synthetic_ade = dict(
    model=dict(
        backbone=dict(init_cfg=None),
        decode_head=dict(num_classes=len(__classes)),
        auxiliary_head=dict(num_classes=len(__classes))),
    train_dataloader=dict(batch_size=2, dataset=__dataset),
    val_dataloader=dict(dataset=__dataset),
    test_dataloader=dict(dataset=__dataset),
    train_cfg=dict(type='IterBasedTrainLoop', max_iters=__iters, val_interval=__iters),
    param_scheduler=[dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=50)],
    default_hooks=dict(
        logger=dict(interval=10, log_metric_by_epoch=False),
        checkpoint=dict(by_epoch=False, interval=-1, save_last=True)),
    log_processor=dict(by_epoch=False, window_size=10),
)
