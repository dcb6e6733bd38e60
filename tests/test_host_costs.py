"""tools/host_costs.py: host time per call of the launch primitives and of each op."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import host_costs  # noqa: E402


def test_time_call_reports_microseconds_per_call():
    per_call = host_costs.time_call(lambda: time.sleep(0.002), torch.device("cpu"), warmup=1, repeats=3, iters=2)
    assert 2000 <= per_call < 20000


def test_cases_cover_every_op_and_its_peer_on_cpu():
    names = [name for _, name, _ in host_costs.cases(torch.device("cpu"), dim=32, size=5)]
    for op in ("LayerNorm", "DepthwiseConv2d 3×3", "Mlp"):
        for suffix in ("forward", "forward+backward", "forward (PyTorch peer)", "forward+backward (PyTorch peer)"):
            assert f"{op} {suffix}" in names
    assert "selective scan (torch) forward+backward" in names and "DMBlock forward+backward" in names
    assert not [n for n in names if "Triton" in n]  # no Triton case without a GPU


def test_every_case_runs_and_the_json_names_them(tmp_path):
    out = tmp_path / "costs.json"
    assert host_costs.main(["--device", "cpu", "--dtype", "float32", "--only", "forward", "--warmup", "0",
                            "--repeats", "1", "--iters", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["environment"]["device"] == "cpu"
    cases = {r["case"]: r["host_us"] for r in report["results"]}
    assert "DMBlock forward" in cases and "x * 2 forward+backward" in cases
    assert all(us > 0 for us in cases.values())


@pytest.mark.parametrize("device_thread", [False, True])
def test_the_backward_thread_is_applied_to_every_case_and_recorded(tmp_path, monkeypatch, device_thread):
    seen = []
    monkeypatch.setattr(host_costs, "cases", lambda device: [
        ("primitives", "probe", lambda: seen.append(torch._C._is_multithreading_enabled()))])
    out = tmp_path / "costs.json"
    assert host_costs.main(["--device", "cpu", "--dtype", "float32", "--warmup", "0", "--repeats", "1", "--iters", "1",
                            *(["--autograd-device-thread"] if device_thread else []), "--json", str(out)]) == 0
    assert seen and all(on == device_thread for on in seen)
    assert json.loads(out.read_text())["environment"]["autograd_device_thread"] is device_thread
    assert torch._C._is_multithreading_enabled()
