"""PEP 517 backend for this folder: setuptools, with the installing environment's PyTorch visible.

pip builds in an isolated environment by default, where the already-installed torch (which the
extension must be compiled against) is hidden. When torch is not importable there, this adds the
running interpreter's own site-packages to the end of sys.path, so `pip install .` works without
`--no-build-isolation`. Build requirements still come from the isolated environment first.
"""
import sys
import sysconfig

try:
    import torch  # noqa: F401
except ImportError:
    for _key in ("purelib", "platlib"):
        _path = sysconfig.get_paths()[_key]
        if _path not in sys.path:
            sys.path.append(_path)

from setuptools.build_meta import *  # noqa: E402,F401,F403
