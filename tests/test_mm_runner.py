"""The mm train entry point (defmamba.mm.runner.train): the thread its backward runs on."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("mmdet", reason="mmdet not installed (optional extra: bash tools/install_mm.sh)")
pytest.importorskip("mmseg", reason="mmsegmentation not installed (optional extra: bash tools/install_mm.sh)")

from defmamba.mm import runner  # noqa: E402


@pytest.mark.parametrize("task", ["det", "seg"])
@pytest.mark.parametrize("device_thread", [False, True])
def test_training_runs_each_backward_on_the_loops_thread_unless_asked(monkeypatch, task, device_thread):
    seen = []
    monkeypatch.setattr(runner, "_prepare", lambda task, args: SimpleNamespace())
    monkeypatch.setattr(runner, "_run", lambda cfg, action: seen.append((action, torch._C._is_multithreading_enabled())))
    runner.train(task, ["config.py", *(["--autograd-device-thread"] if device_thread else [])])
    assert seen == [("train", device_thread)]
    assert torch._C._is_multithreading_enabled()  # the caller's setting is restored
