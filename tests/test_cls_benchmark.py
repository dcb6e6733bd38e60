"""Smoke test of tools/benchmark.py on CPU at a tiny size (GPU numbers come from the device)."""
from __future__ import annotations

import json

import pytest
import torch

import defmamba
from graph_helpers import amp_step, assert_trained_alike, assert_trained_identically
from tool_helpers import load_tool


@pytest.fixture(scope="module")
def bench():
    return load_tool("benchmark")


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


@pytest.mark.parametrize("calling_thread", [False, True])
def test_backward_runs_on_the_calling_thread_unless_asked_for_every_model(bench, monkeypatch, calling_thread):
    seen = []

    def measure_one(name, mode, args, device):
        seen.append((name, torch._C._is_multithreading_enabled()))
        return {"images_per_s": 1.0}

    monkeypatch.setattr(bench, "measure_one", measure_one)
    flag = [] if calling_thread else ["--autograd-device-thread"]
    assert bench.main(["--device", "cpu", "--models", "defmamba_tiny", "--peers", "convnext_tiny",
                       "--modes", "train_fp16", *flag]) == 0
    assert seen == [("defmamba_tiny", not calling_thread), ("convnext_tiny", not calling_thread)]
    assert torch._C._is_multithreading_enabled()  # restored after the run


def test_benchmark_rejects_unknown_mode(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "infer_int8"])


def test_benchmark_rejects_unknown_model_names_before_measuring(bench, capsys):
    """A peer that timm does not know (a common short name) and a DefMamba variant that does not
    exist are argument errors naming the fix, not a traceback after the other models have run."""
    with pytest.raises(SystemExit):
        bench.parse_args(["--peers", "convnext_tiny", "swin_small"])
    err = capsys.readouterr().err
    assert "'swin_small' is not a timm model name" in err and "swin_small_patch4_window7_224" in err
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "defmamba_huge", "--peers"])
    assert "unknown DefMamba variant 'defmamba_huge'" in capsys.readouterr().err
    assert bench.unknown_model_names(["defmamba_small"], ["swin_small_patch4_window7_224", "convnext_small"]) == []


def test_benchmark_cuda_graphs_need_a_gpu_and_exclude_reduce_overhead(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--cuda-graphs", "--compile", "reduce-overhead"])
    assert "choose one" in capsys.readouterr().err
    assert bench.main(["--device", "cpu", "--cuda-graphs", "--models", "defmamba_tiny", "--peers"]) == 2
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err


def test_benchmark_graphed_training_needs_a_gpu_and_an_eager_loop(bench, capsys):
    for other in (["--cuda-graphs"], ["--compile"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--graphed-training", *other])
        assert "drop --cuda-graphs/--compile" in capsys.readouterr().err
    assert bench.main(["--device", "cpu", "--graphed-training", "--models", "defmamba_tiny", "--peers"]) == 2
    assert "--graphed-training needs a CUDA device" in capsys.readouterr().err


@pytest.mark.cuda
def test_benchmark_graphed_training_graphs_defmamba_only(bench, monkeypatch):
    """With --graphed-training the DefMamba models train through their graphs, the peers as they are."""
    from defmamba.graphed_training import GraphedTraining

    calls = []
    original = GraphedTraining.__call__
    monkeypatch.setattr(GraphedTraining, "__call__", lambda self, *a: calls.append(self.signatures) or original(self, *a))
    args = bench.parse_args(["--graphed-training", "--models", "defmamba_tiny", "--peers", "convnext_tiny",
                             "--batch-size", "2", "--image-size", "64", "--warmup", "1", "--repeats", "1",
                             "--iters", "2"])
    result = bench.measure_one("defmamba_tiny", "train_bf16", args, torch.device("cuda"))
    assert result["images_per_s"] > 0 and calls and calls[-1] == 1  # recorded once, then replayed
    calls.clear()
    bench.measure_one("convnext_tiny", "train_bf16", args, torch.device("cuda"))
    assert calls == []


@pytest.mark.cuda
def test_graphed_training_peak_memory_counts_the_recorded_activations():
    """A graph keeps its activations in its own memory pool, allocated when it is recorded (in the
    warm-up): the reported peak must include them, not only the timed replays' allocations."""
    from defmamba.benchmark import measure_throughput

    peaks = {}
    for graphed in (False, True):
        model = defmamba.build_model("defmamba_tiny")
        model.set_graphed_training(graphed)
        peaks[graphed] = measure_throughput(model, 16, 128, mode="train", amp_dtype=torch.bfloat16, warmup=2,
                                            repeats=1, iters_per_window=1, device="cuda")["peak_memory_gib"]
        del model
    assert peaks[True] > 0.8 * peaks[False], peaks


def test_measure_throughput_rejects_cuda_graphs_on_cpu():
    from defmamba.benchmark import measure_throughput
    from defmamba.cuda_graphs import capture_cuda_graph

    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        measure_throughput(model, 2, 8, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        capture_cuda_graph(lambda: None, "cpu")


def _small_model(seed: int, device: str = "cuda") -> torch.nn.Module:
    import defmamba

    torch.manual_seed(seed)
    return defmamba.DefMamba(dims=32, depths=(1, 1, 1, 1), num_classes=10, drop_path_rate=0.0).to(device)


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16, torch.float16])
def test_graphed_training_step_follows_the_eager_steps(graph_device, amp_dtype):
    """Three warm-up steps, the capture and three replays give the losses of six eager steps (on
    the CPU, with emulated graphs, bit for bit)."""
    import copy

    from defmamba.cuda_graphs import capture_cuda_graph

    eager_model = _small_model(0, graph_device)
    graphed_model = copy.deepcopy(eager_model)
    images = torch.randn(2, 3, 64, 96, device=graph_device)  # odd, non-square stage sizes down to 2 × 3
    targets = torch.tensor([3, 7], device=graph_device)

    def make_step(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)
        scaler = torch.amp.GradScaler(graph_device, enabled=amp_dtype == torch.float16)
        last_loss = torch.zeros((), device=graph_device)

        def step():
            loss = amp_step(model, optimizer, scaler, images, targets, amp_dtype, cache_enabled=False)
            last_loss.copy_(loss.detach())
        return step, last_loss

    eager_step, eager_loss = make_step(eager_model)
    eager_losses = []
    for _ in range(6):
        eager_step()
        eager_losses.append(eager_loss.item())

    graphed_step, graphed_loss = make_step(graphed_model)
    replay = capture_cuda_graph(graphed_step, graph_device, warmup=3)
    graphed_losses = []
    for _ in range(3):
        replay()
        graphed_losses.append(graphed_loss.item())

    # The replays carry on from the third eager step: the weights they read are updated in place.
    if graph_device == "cpu":
        assert graphed_losses == eager_losses[3:]
        assert_trained_identically(eager_model.named_parameters(), graphed_model.parameters())
        return
    # Measured on an H100: float32 losses 1.4e-5 apart after six steps (atomic-order noise).
    lr = 1e-3
    tol = 1e-4 if amp_dtype is None else 2e-3
    assert graphed_losses == pytest.approx(eager_losses[3:], rel=tol)
    assert len(set(graphed_losses)) == 3, graphed_losses
    assert_trained_alike(eager_model.named_parameters(), graphed_model.parameters(), max_step_change=3 * lr)


@pytest.mark.cuda
@pytest.mark.parametrize("mode,amp_dtype", [("infer", torch.float16), ("train", torch.bfloat16)])
def test_measure_throughput_with_cuda_graphs(mode, amp_dtype):
    from defmamba.benchmark import measure_throughput

    result = measure_throughput(_small_model(1), 4, (64, 96), mode=mode, amp_dtype=amp_dtype, warmup=1, repeats=2,
                                iters_per_window=2, cuda_graphs=True)
    assert result["cuda_graphs"] is True and result["images_per_s"] > 0
    assert result["peak_memory_gib"] > 0


def test_a_model_that_a_graph_cannot_hold_becomes_an_error_row(bench, monkeypatch, capsys):
    import defmamba.benchmark
    from defmamba.cuda_graphs import CudaGraphError

    def fail(*args, **kwargs):
        raise CudaGraphError("recording the step into a CUDA graph failed (operation not permitted)")

    monkeypatch.setattr(defmamba.benchmark, "measure_throughput", fail)
    args = bench.parse_args(["--device", "cpu", "--image-size", "32", "--cuda-graphs"])
    assert bench.measure_one("convnext_tiny", "train_bf16", args, torch.device("cpu")) == {
        "error": "CUDA graph capture failed"}
    assert "operation not permitted" in capsys.readouterr().err


def test_host_cost_needs_an_eager_gpu_step(bench, capsys):
    from defmamba.benchmark import measure_throughput

    with pytest.raises(ValueError, match="eager step on a CUDA device"):
        measure_throughput(torch.nn.Linear(4, 2), 2, 8, device="cpu", with_host_cost=True)
    with pytest.raises(SystemExit):
        bench.parse_args(["--host-cost", "--cuda-graphs"])
    assert "drop --cuda-graphs/--compile" in capsys.readouterr().err
    assert bench.main(["--device", "cpu", "--host-cost", "--models", "defmamba_tiny", "--peers"]) == 2
    assert "--host-cost needs a CUDA device" in capsys.readouterr().err


def test_gpu_busy_time_is_the_union_of_kernel_intervals():
    from defmamba.benchmark import _busy_ms

    rng = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 10_000, (200,), generator=rng).tolist()
    lengths = torch.randint(1, 300, (200,), generator=rng).tolist()
    intervals = [(float(s), float(s + n)) for s, n in zip(starts, lengths)]
    covered = torch.zeros(10_400, dtype=torch.bool)        # one flag per microsecond
    for s, e in intervals:
        covered[int(s):int(e)] = True
    assert _busy_ms(intervals) == pytest.approx(covered.sum().item() / 1000.0)
    assert _busy_ms([]) == 0.0


@pytest.mark.cuda
def test_host_cost_counts_launches_and_times_the_step():
    from defmamba.benchmark import measure_throughput

    result = measure_throughput(_small_model(2), 4, (64, 96), mode="train", amp_dtype=torch.bfloat16, warmup=2,
                                repeats=2, iters_per_window=2, with_host_cost=True)
    # forward, backward and the fused optimizer of four stages: hundreds of kernels, each timed
    assert 100 < result["launches_per_step"] < 5000
    assert result["host_ms_per_step"] > 0 and result["gpu_ms_per_step"] > 0
    assert result["gpu_ms_per_step"] < result["ms_per_iter"] * 3


def test_ab_table_row_reports_both_rates_the_change_and_the_peaks():
    helpers = load_tool("benchmark_helpers")
    base_rate, new_rate = 100 + 900 * torch.rand(2).double()
    base = {"images_per_s": base_rate.item(), "peak_memory_gib": 5.25}
    new = {"images_per_s": new_rate.item(), "peak_memory_gib": None}
    cells = [c.strip() for c in helpers.ab_table_row("defmamba_tiny", "train_bf16", base, new).strip("|").split("|")]
    assert cells[:2] == ["defmamba_tiny", "train_bf16"]
    assert float(cells[2]) == pytest.approx(base_rate.item(), abs=0.05)
    assert float(cells[3]) == pytest.approx(new_rate.item(), abs=0.05)
    assert float(cells[4].rstrip("%")) == pytest.approx(100 * (new_rate / base_rate - 1).item(), abs=0.05)
    assert cells[5] == "5.25/-"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("tool", ["benchmark_sampling", "benchmark_depthwise_conv"])
def test_ab_benchmarks_load_their_helpers_and_refuse_without_a_gpu(tool, capsys):
    assert load_tool(tool).main(["--models", "defmamba_tiny"]) == 2
    assert "error:" in capsys.readouterr().err


def test_compile_token_mixers_compiles_defmamba_regions_and_leaves_peers_eager(bench, monkeypatch):
    """--compile token-mixers hands each DefMamba model to compile_token_mixers (main.py --compile's
    training) and measures the peers as they are."""
    import defmamba.benchmark
    import defmamba.regional_compile

    compiled, measured = [], []
    monkeypatch.setattr(defmamba.regional_compile, "compile_token_mixers", lambda model: compiled.append(model))
    monkeypatch.setattr(defmamba.benchmark, "measure_throughput",
                        lambda model, *args, **kwargs: measured.append(model) or {"images_per_s": 1.0})
    args = bench.parse_args(["--device", "cpu", "--compile", "token-mixers", "--image-size", "32"])
    bench.measure_one("defmamba_tiny", "train_bf16", args, torch.device("cpu"))
    bench.measure_one("convnext_tiny", "train_bf16", args, torch.device("cpu"))
    assert len(compiled) == 1 and measured[0] is compiled[0]
    assert type(measured[1]).__name__ == "ConvNeXt"
