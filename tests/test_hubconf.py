"""hubconf.py: torch.hub builds the published variants from a local checkout, without the network,
and loads weights only from the file it is given."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from checkpoint_fixtures import official_tensors

import defmamba
from defmamba.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.hub.load touched the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def hub_load(name: str, **kwargs) -> torch.nn.Module:
    return torch.hub.load(str(ROOT), name, source="local", **kwargs)


def test_builds_the_variant_without_the_network(no_network):
    model = hub_load("defmamba_tiny", pretrained=False, num_classes=5)
    reference = defmamba.build_model("defmamba_tiny", num_classes=5)
    assert isinstance(model, defmamba.DefMamba)
    assert model.dims == reference.dims and model.depths == reference.depths
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


def test_pretrained_reads_the_given_file(no_network, tmp_path):
    weights = official_tensors(4)
    path = tmp_path / "defmamba_tiny.pth"
    torch.save({"model": weights}, path)
    model = hub_load("defmamba_tiny", pretrained=True, weights=str(path))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_pretrained_without_a_file_says_where_the_weights_are():
    with pytest.raises(CheckpointError, match=r"weights='/path/to/defmamba_small.pth'.*Google Drive"):
        hub_load("defmamba_small", pretrained=True)
    with pytest.raises(ValueError, match="only read with pretrained=True"):
        hub_load("defmamba_small", weights="defmamba_small.pth")
