"""The ImageNet training application: config, data, engine, training step, checkpoints, logging.

``classification/main.py`` and the ``defmamba-train`` console script call :func:`defmamba.train.main.main`;
other programs can import the parts (``defmamba.train.config.get_config``,
``defmamba.train.engine.train_one_epoch`` ...). Needs the ``train`` extra (yacs, termcolor).
"""
import importlib.util as _importlib_util

_MISSING = [name for name in ("yacs", "termcolor", "yaml") if _importlib_util.find_spec(name) is None]
if _MISSING:
    raise ImportError(f"the training application needs {', '.join(_MISSING)}, which are not installed: "
                      "pip install 'defmamba[train]' (or pip install -e '.[train]' in a checkout)")
