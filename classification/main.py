"""Train and evaluate DefMamba image classifiers (the application lives in ``defmamba.train``).

    python classification/main.py --cfg configs/classification/defmamba_tiny_224.yaml \
        --batch-size 128 --data-path /path/to/imagenet --output output
    torchrun --nproc_per_node 8 classification/main.py --cfg ... --data-path ...
    python classification/main.py --cfg ... --data-path ... --resume ckpt.pth --eval
    python classification/main.py --cfg ... --throughput
"""
import sys

from defmamba.train.main import main

if __name__ == "__main__":
    sys.exit(main())
