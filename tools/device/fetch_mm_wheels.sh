#!/usr/bin/env bash
# Download, for an offline GPU machine (Python 3.12, x86-64 Linux, the workplace's CUDA image), what
# `pip install -e .` and tools/install_mm.sh install there and the image lacks: the `mm` extra of
# pyproject.toml and the dependencies of its packages, mmengine, mmcv's sdist (built there with the
# CUDA ops), setuptools < 81. numpy, scipy, matplotlib, Pillow, opencv-python-headless, pyyaml, rich,
# six, tqdm, regex and packaging come with the image. Keep the list in step with the extra.
# Usage: PYTHON=/path/to/python bash tools/device/fetch_mm_wheels.sh DIR
#   then there: MM_WHEELS=DIR bash tools/device/dense_tasks.sh OUT_DIR
# PYTHON (default python3) needs pip and torch: pip runs mmcv's setup.py, which imports torch.
set -euo pipefail
dir=${1:?usage: $0 DIR}
mkdir -p "$dir"
download=("${PYTHON:-python3}" -m pip download --no-deps --disable-pip-version-check -d "$dir")
"${download[@]}" --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  'setuptools<81' addict yapf platformdirs termcolor pycocotools shapely terminaltables prettytable wcwidth \
  ftfy 'mmengine==0.10.7' 'mmdet==3.3.0' 'mmsegmentation==1.2.2'
"${download[@]}" --no-binary=:all: --no-build-isolation 'mmcv==2.1.0'
du -sh "$dir"
