"""Train a DefMamba detector (command line of OpenMMLab's tools/train.py; see README.md)."""
from defmamba.mm.runner import train

if __name__ == "__main__":
    train("det")
