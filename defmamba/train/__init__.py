"""The ImageNet training application: config, data, engine, training step, checkpoints, logging.

``classification/main.py`` and the ``defmamba-train`` console script call :func:`defmamba.train.main.main`;
other programs can import the parts (``defmamba.train.config.get_config``,
``defmamba.train.engine.train_one_epoch`` ...). Needs the ``train`` extra (yacs, termcolor).
"""
