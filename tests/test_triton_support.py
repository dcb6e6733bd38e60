"""The host-side launch arithmetic of the Triton ops (defmamba.ops.triton_support): plain-Python
``cdiv`` and ``next_power_of_2`` give Triton's values, so the grids and block sizes are unchanged."""
from __future__ import annotations

import random

import pytest

from defmamba.ops.triton_support import cdiv, next_power_of_2

triton = pytest.importorskip("triton")


def test_cdiv_matches_triton_on_grid_sizes():
    rng = random.Random()
    pairs = [(a, b) for a in range(0, 200) for b in range(1, 40)]
    pairs += [(rng.randrange(0, 10 ** 7), rng.randrange(1, 4097)) for _ in range(2000)]
    for a, b in pairs:
        assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_next_power_of_2_matches_triton_on_block_sizes():
    rng = random.Random()
    sizes = list(range(1, 5000)) + [2 ** k + d for k in range(13, 24) for d in (-1, 0, 1)]
    sizes += [rng.randrange(1, 10 ** 7) for _ in range(2000)]
    for n in sizes:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
