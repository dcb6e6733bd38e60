"""Test a DefMamba segmentor checkpoint (command line of OpenMMLab's tools/test.py; see README.md)."""
from defmamba.mm.runner import test

if __name__ == "__main__":
    test("seg")
