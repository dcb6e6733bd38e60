"""Test a DefMamba detector checkpoint (command line of OpenMMLab's tools/test.py; see README.md)."""
from defmamba.mm_runner import test

if __name__ == "__main__":
    test("det")
