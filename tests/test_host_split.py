"""tools/host_split.py: host time of a training step's phases."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import host_split  # noqa: E402


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def test_every_phase_is_timed_and_the_step_trains():
    torch.manual_seed(0)
    step = host_split.TrainingStep(_Tiny(), batch_size=2, image_size=16, amp_dtype=None, device=torch.device("cpu"))
    before = step.model.head.weight.detach().clone()
    report = host_split.measure(step, warmup=1, repeats=2)
    assert set(report) == set(host_split.PHASES)
    assert all(report[p]["host_ms"] > 0 for p in host_split.PHASES)
    assert all(report[p]["launches"] is None for p in host_split.PHASES)  # launches are counted on CUDA only
    assert not torch.equal(before, step.model.head.weight)  # the optimizer phase updated the weights
    assert step.model.head.weight.grad is None  # and zero_grad(set_to_none) ran after it


def test_unknown_model_names_are_refused(capsys):
    with pytest.raises(SystemExit):
        host_split.parse_args(["--models", "defmamba_tny", "--peers"])
    assert "unknown DefMamba variant 'defmamba_tny'" in capsys.readouterr().err


def test_main_writes_a_table_of_defmamba_and_a_peer(tmp_path):
    out = tmp_path / "split.json"
    assert host_split.main(["--device", "cpu", "--models", "defmamba_tiny", "--peers", "resnet18", "--batch-size", "1",
                            "--image-size", "64", "--amp", "none", "--warmup", "0", "--repeats", "1", "--top", "3",
                            "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"defmamba_tiny", "resnet18"}
    assert len(report["top_host_events"]) == 3 and report["top_host_events"][0]["self_cpu_ms"] > 0


def test_python_profile_counts_each_function_per_step(tmp_path):
    """--python-profile: cProfile's rows per step, the backward's Python included (it runs on the
    profiling thread): one DSSM forward and one deformable sampling backward per DM block."""
    import defmamba
    from defmamba.models.blocks import DMBlock

    out = tmp_path / "split.json"
    assert host_split.main(["--device", "cpu", "--models", "defmamba_tiny", "--peers", "--batch-size", "1",
                            "--image-size", "64", "--amp", "none", "--warmup", "1", "--repeats", "1",
                            "--python-profile", "100000", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["python_functions"]
    blocks = sum(isinstance(m, DMBlock) for m in defmamba.build_model("defmamba_tiny").modules())
    calls = {row["function"]: row["calls"] for row in rows}
    def calls_of(path: str, function: str) -> float:
        return calls[next(f for f in calls if f.startswith(path + ":") and f.endswith(f"({function})"))]

    assert calls_of("defmamba/models/dssm.py", "forward") == blocks
    assert calls_of("ops/deformable_sampling/reference.py", "backward") == blocks  # an autograd.Function's backward
    assert [row["own_ms"] for row in rows] == sorted((row["own_ms"] for row in rows), reverse=True)
    assert all(row["cumulative_ms"] >= row["own_ms"] >= 0 for row in rows)
