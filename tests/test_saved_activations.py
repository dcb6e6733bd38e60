"""Activation memory of a DM block, counted by tools/saved_activations.py: the count is right on a
known case, and the DSSM keeps one copy of its stacked scan sequences, not two."""
from __future__ import annotations

import torch
from tool_helpers import load_tool

from defmamba.models.blocks import DMBlock


def _tool():
    return load_tool("saved_activations")


def test_counts_a_linear_layer_exactly():
    tool = _tool()
    layer = torch.nn.Sequential(torch.nn.Linear(8, 5))
    x = torch.randn(3, 7, 8, requires_grad=True)
    counted = tool.saved_bytes(layer, x, amp=None)
    assert counted == {"0": x.numel() * 4}   # nn.Linear keeps its input (and its weight, a parameter: not counted)


def test_dssm_keeps_the_stacked_sequences_once():
    tool = _tool()
    torch.manual_seed(0)
    dim = 32                                # not the 16 states, so B and C differ in size from the sequences
    block = DMBlock(dim, deform_kernel_size=3, scan_backend="torch").train()
    batch, h, w = 2, 5, 7
    record: list = []
    tool.saved_bytes(block, torch.randn(batch, h, w, dim, requires_grad=True), amp=None, record=record)
    stacked = batch * 3 * dim * h * w * 4   # (B, 3, D, L) float32
    in_dssm = [r for r in record if r[0] == "op" and r[3] == stacked]
    assert len(in_dssm) == 2, in_dssm       # the sequences (scan u and projection input) and Δ
    states = [r for r in record if r[0] == "op" and r[2] == torch.float32 and len(r[1]) == 4 and r[1][-1] == 16
              and r[1][:2] == (batch, 3 * dim)]
    assert states, "the stand-in scan keeps its chunk states"


def test_mlp_keeps_the_gelu_input_but_not_its_output():
    tool = _tool()
    torch.manual_seed(0)
    block = DMBlock(32, deform_kernel_size=3, scan_backend="torch").train()
    batch, h, w = 2, 5, 7
    record: list = []
    tool.saved_bytes(block, torch.randn(batch, h, w, 32, requires_grad=True), amp=None, record=record)
    hidden = batch * h * w * 4 * 32 * 4     # (B, h, w, 4·C) float32
    assert [r[0] for r in record if r[3] == hidden] == ["mlp"]   # fc1's output, once
