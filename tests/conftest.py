"""Shared test configuration: GPU tests are skipped on machines without CUDA; ``graph_device`` runs
a CUDA-graph test with real graphs on the GPU and with emulated ones on the CPU."""
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def graph_device(request, monkeypatch) -> str:
    """"cuda": real CUDA graphs. "cpu": CPU tensors, with torch.cuda's graphs and streams emulated
    (tests/graph_emulation.py): replays rerun the recorded operators and must give the eager results
    bit for bit."""
    if request.param == "cpu":
        from graph_emulation import emulate_cuda_graphs

        emulate_cuda_graphs(monkeypatch)
    return request.param
