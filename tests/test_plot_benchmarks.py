"""tools/plot_benchmarks.py: a PNG of images/s against peak memory from a tools/benchmark.py JSON,
and clear errors for files it cannot plot."""
from __future__ import annotations

import json
import random

import matplotlib
import pytest
from tool_helpers import load_tool

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODELS = ["defmamba_tiny", "defmamba_small", "convnext_tiny", "swin_tiny_patch4_window7_224"]


def _measurement(rng: random.Random, mode: str, on_gpu: bool = True, host_cost: bool = False) -> dict:
    """One result as tools/benchmark.py writes it (with --host-cost: eager, graphed and the host's
    cost), plus a key the tool does not know."""
    result = {"mode": mode.split("_")[0], "amp_dtype": None, "batch_size": 8, "image_size": [64, 64],
              "device": "cuda" if on_gpu else "cpu", "cuda_graphs": False, "images_per_s": rng.uniform(100, 5000),
              "window_images_per_s": [rng.uniform(100, 5000) for _ in range(3)], "ms_per_iter": rng.uniform(1, 50),
              "peak_memory_gib": rng.uniform(0.5, 20) if on_gpu else None, "kernel_names": ["a", "b"]}
    if host_cost:
        result.update(graphed_images_per_s=rng.uniform(100, 5000), graphed_peak_memory_gib=rng.uniform(0.5, 20),
                      eager_over_graphed=rng.uniform(0.3, 1), launches_per_step=rng.randrange(500, 3000),
                      host_ms_per_step=rng.uniform(5, 150), gpu_ms_per_step=rng.uniform(5, 150))
    return result


def _run(rng: random.Random, modes: list[str], on_gpu: bool = True, host_cost: bool = False) -> dict:
    results = {model: {mode: _measurement(rng, mode, on_gpu, host_cost) for mode in modes} for model in MODELS}
    results["swin_tiny_patch4_window7_224"][modes[0]] = {"error": "out of memory"}
    return {"environment": {"gpu": "Test GPU 80GB", "torch": "2.11.0"},
            "settings": {"models": MODELS[:2], "peers": MODELS[2:], "modes": modes, "batch_size": 8,
                         "image_size": 64, "cuda_graphs": not host_cost, "host_cost": host_cost, "compile": None},
            "results": results}


def test_writes_a_png_with_one_panel_per_mode(tmp_path):
    rng = random.Random(7)
    modes = ["infer_fp16", "train_fp16", "train_bf16"]
    run = _run(rng, modes)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(run))
    tool = load_tool("plot_benchmarks")

    panels = tool.points_by_mode(tool.load_run(path))
    assert list(panels) == modes
    assert {p.model for p in panels["infer_fp16"]} == set(MODELS) - {"swin_tiny_patch4_window7_224"}  # the OOM
    expected = run["results"]["defmamba_small"]["train_bf16"]
    small = next(p for p in panels["train_bf16"] if p.model == "defmamba_small")
    assert (small.peak_memory_gib, small.images_per_s) == (expected["peak_memory_gib"], expected["images_per_s"])

    fig = tool.plot_run(run, date="2026-01-02")
    try:
        visible = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title() for ax in visible] == ["infer fp16", "train fp16", "train bf16"]
        labels = {text.get_text() for text in visible[1].texts}
        assert {"DefMamba-T", "DefMamba-S", "ConvNeXt-T", "Swin-T"} <= labels
        assert "Test GPU 80GB, 2026-01-02" in fig.get_suptitle() and "CUDA graphs" in fig.get_suptitle()
    finally:
        plt.close(fig)

    out = tmp_path / "plots" / "plot.png"
    assert tool.main([str(path), "--out", str(out), "--modes", "train_fp16"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.imread(out).shape[0] > 100


def test_a_host_cost_run_has_an_eager_and_a_graphed_panel_per_mode(tmp_path):
    run = _run(random.Random(11), ["train_bf16", "infer_fp16"], host_cost=True)
    tool = load_tool("plot_benchmarks")
    panels = tool.points_by_mode(run)
    assert list(panels) == ["train_bf16 eager", "train_bf16 graphed", "infer_fp16 eager", "infer_fp16 graphed"]
    expected = run["results"]["defmamba_tiny"]["infer_fp16"]
    tiny = next(p for p in panels["infer_fp16 graphed"] if p.model == "defmamba_tiny")
    assert (tiny.peak_memory_gib, tiny.images_per_s) == (expected["graphed_peak_memory_gib"],
                                                         expected["graphed_images_per_s"])
    fig = tool.plot_run(run)
    try:
        axes = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title() for ax in axes] == ["train bf16 eager", "train bf16 graphed", "infer fp16 eager",
                                                   "infer fp16 graphed"]
        assert axes[0].get_ylim() == axes[1].get_ylim() and axes[0].get_xlim() == axes[1].get_xlim()
        assert "eager and CUDA graphs" in fig.get_suptitle()
    finally:
        plt.close(fig)


def test_names_of_models():
    tool = load_tool("plot_benchmarks")
    assert tool.display_name("swin_small_patch4_window7_224") == ("Swin", "Swin-S")
    assert tool.display_name("defmamba_base") == ("DefMamba", "DefMamba-B")
    assert tool.display_name("resnet50") == ("resnet50", "resnet50")


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    tool = load_tool("plot_benchmarks")
    missing = tmp_path / "none.json"
    with pytest.raises(tool.BenchmarkFileError, match="no such file.*tools/benchmark.py --json"):
        tool.load_run(missing)
    assert tool.main([str(missing), "--out", str(tmp_path / "x.png")]) == 2
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "x.png").exists()

    no_results = tmp_path / "no_results.json"
    no_results.write_text(json.dumps({"environment": {"gpu": "x"}, "settings": {}}))
    with pytest.raises(tool.BenchmarkFileError, match="no 'results' mapping"):
        tool.load_run(no_results)
    not_json = tmp_path / "broken.json"
    not_json.write_text("{ results: ")
    with pytest.raises(tool.BenchmarkFileError, match="not valid JSON"):
        tool.load_run(not_json)

    cpu_run = tmp_path / "cpu.json"
    cpu_run.write_text(json.dumps(_run(random.Random(3), ["infer_fp32"], on_gpu=False)))
    with pytest.raises(tool.BenchmarkFileError, match="peak memory is recorded on GPU runs only"):
        tool.points_by_mode(tool.load_run(cpu_run))
    gpu_run = tmp_path / "gpu.json"
    gpu_run.write_text(json.dumps(_run(random.Random(4), ["train_fp16"])))
    with pytest.raises(tool.BenchmarkFileError, match=r"modes \['infer_bf16'\] are not in this run"):
        tool.points_by_mode(tool.load_run(gpu_run), ["infer_bf16"])
