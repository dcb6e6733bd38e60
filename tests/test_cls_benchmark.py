"""Smoke test of tools/benchmark.py on CPU at a tiny size (GPU numbers come from the device)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("defmamba_tools_benchmark", ROOT / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_on_cpu_and_writes_json_and_table(bench, tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = bench.main(["--device", "cpu", "--models", "defmamba_tiny", "--peers", "convnext_tiny",
                             "--batch-size", "2", "--image-size", "32", "--modes", "infer_fp32", "train_bf16",
                             "--warmup", "1", "--repeats", "2", "--iters", "1", "--backend", "torch",
                             "--json", str(tmp_path / "bench.json")])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    out = capsys.readouterr().out
    assert "environment: python=" in out and "torch=" in out
    assert "| model | infer_fp32 img/s | train_bf16 img/s | train_bf16 peak GiB |" in out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["environment"]["device"] == "cpu"
    assert set(report["results"]) == {"defmamba_tiny", "convnext_tiny"}
    for name, by_mode in report["results"].items():
        assert set(by_mode) == {"infer_fp32", "train_bf16"}
        for mode, r in by_mode.items():
            assert r["images_per_s"] > 0 and len(r["window_images_per_s"]) == 2, (name, mode)
            assert r["batch_size"] == 2 and r["image_size"] == [32, 32]
        assert by_mode["train_bf16"]["amp_dtype"] == "bfloat16" and by_mode["train_bf16"]["mode"] == "train"
        assert f"| {name} |" in out


def test_benchmark_rejects_unknown_mode(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "infer_int8"])
