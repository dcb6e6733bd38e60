"""Parameter and FLOP counts: the paper's numbers for T/S/B at 224², the counting rules on odd
sizes, and the command-line tool."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tool_helpers import load_tool

pytest.importorskip("fvcore")

import defmamba  # noqa: E402
from defmamba.flops import (OPERATORS, count_flops, count_params, countable_selective_scan,  # noqa: E402
                            flop_handles, selective_scan_flops)
from defmamba.models import dssm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The authors' counts at 1×3×224×224 (their VSSM.flops: fvcore with their selective-scan rule,
# run on their code; parameters are sum(p.numel())), per operator in FLOPs.
REFERENCE = {
    "defmamba_tiny": dict(
        params=7_547_878, total=1_292_522_000,
        by_op=dict(conv=183_117_312, layer_norm=13_171_200, linear=874_713_408, adaptive_avg_pool2d=696_192,
                   grid_sampler=5_419_008, upsample_bilinear2d=2_709_504, einsum=94_834_500,
                   selective_scan=117_860_876)),
    "defmamba_small": dict(
        params=30_201_340, total=5_007_415_986,
        by_op=dict(conv=629_131_776, layer_norm=27_471_360, linear=3_816_019_200, adaptive_avg_pool2d=1_467_648,
                   grid_sampler=11_440_128, upsample_bilinear2d=5_720_064, einsum=267_350_000,
                   selective_scan=248_815_810)),
    "defmamba_base": dict(
        params=48_595_576, total=8_930_075_934,
        by_op=dict(conv=666_161_664, layer_norm=41_018_880, linear=7_313_274_624, adaptive_avg_pool2d=2_370_816,
                   grid_sampler=18_665_472, upsample_bilinear2d=9_332_736, einsum=473_290_000,
                   selective_scan=405_961_742)),
}
TOTAL_RTOL = 5e-3  # the criterion for the total
OP_RTOL = 1e-9  # each operator is counted by the same rule as the authors': equal up to float rounding


@pytest.mark.parametrize("name", list(REFERENCE))
def test_published_variants_at_224(name):
    """Parameters exactly; FLOPs within 0.5% in total and to float rounding per operator."""
    ref = REFERENCE[name]
    model = defmamba.build_model(name)
    assert count_params(model) == ref["params"]
    total, by_op = count_flops(model, input_size=(3, 224, 224))
    assert total == pytest.approx(ref["total"], rel=TOTAL_RTOL)
    assert set(by_op) == set(OPERATORS), f"unexpected operators counted: {sorted(set(by_op) - set(OPERATORS))}"
    for op, flops in ref["by_op"].items():
        assert by_op[op] == pytest.approx(flops, rel=OP_RTOL), op
    assert total == pytest.approx(sum(by_op.values()), rel=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_counts_a_model_on_the_gpu():
    """main.py counts the model where it trains: on the GPU, where the Triton ops would run
    outside the tracer, the count is the same as on the CPU."""
    ref = REFERENCE["defmamba_tiny"]
    total, by_op = count_flops(defmamba.build_model("defmamba_tiny").cuda(), input_size=(3, 224, 224))
    assert total == pytest.approx(ref["total"], rel=TOTAL_RTOL)
    for op, flops in ref["by_op"].items():
        assert by_op[op] == pytest.approx(flops, rel=OP_RTOL), op


def test_selective_scan_formula():
    """The scan's count: exact on a case too small for numpy's 4-digit rounding, and close to
    the closed form 3.5·B·D·L·N + 2·B·D·L (rounding aside) on the model's own shapes."""
    # B=1, D=6, L=10, N=4: exp(Δ·A) 240/2 = 120, Δ·u·B (numpy: 481)/2 → 240,
    # per step D·N + ⟨C, h⟩ 48/2 = 24 + 24, times L = 480; skip and gate 2·60 = 120.
    assert selective_scan_flops(1, 6, 4, 10) == 120 + 240 + 480 + 120
    for batch, channels, d_state, length in [(2, 144, 16, 3136), (1, 2304, 16, 49), (1, 576, 16, 200 * 320)]:
        bdln, bdl = batch * channels * length * d_state, batch * channels * length
        assert selective_scan_flops(batch, channels, d_state, length) == pytest.approx(3.5 * bdln + 2 * bdl, rel=2e-3)


def _mini_model() -> torch.nn.Module:
    return defmamba.DefMamba(dims=16, depths=(1, 2, 1, 1), num_classes=10)


def _stage_sizes(height: int, width: int, stages: int = 4) -> list[tuple[int, int]]:
    h, w = math.ceil(math.ceil(height / 2) / 2), math.ceil(math.ceil(width / 2) / 2)
    sizes = []
    for _ in range(stages):
        sizes.append((h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return sizes


def test_rules_on_an_odd_size():
    """Scan and mean rules at a non-square odd size, from the model's shapes alone."""
    model = _mini_model()
    height, width = 65, 97
    _, by_op = count_flops(model, input_size=(3, height, width))
    sizes = _stage_sizes(height, width)
    dims = [16 * 2 ** i for i in range(4)]
    scans = sum(depth * selective_scan_flops(1, 3 * dim, 16, h * w)
                for depth, dim, (h, w) in zip(model.depths, dims, sizes))
    assert by_op["selective_scan"] == scans
    # Means: the channel attention of every deformable layer (over its D×h×w input) and the head.
    means = sum(depth * dim * h * w for depth, dim, (h, w) in zip(model.depths, dims, sizes)) + dims[-1] * math.prod(sizes[-1])
    assert by_op["adaptive_avg_pool2d"] == means
    # Bias table resized once (4 FLOPs per output element) and two bilinear samplings per layer.
    resized = sum(depth * 4 * dim * h * w for depth, dim, (h, w) in zip(model.depths, dims, sizes))
    assert by_op["upsample_bilinear2d"] == resized
    assert by_op["grid_sampler"] == 2 * resized


def test_scan_is_one_opaque_operator_and_is_restored():
    """While counting, the scan is a single traced node whose inner ops are not seen; afterwards
    (also after an error) the DSSM calls the original function again."""
    from fvcore.nn import FlopCountAnalysis

    model = _mini_model().eval()
    original = dssm.selective_scan
    image = torch.randn(1, 3, 40, 36)
    with torch.no_grad(), countable_selective_scan():
        assert dssm.selective_scan is not original
        analysis = FlopCountAnalysis(model, (image,)).set_op_handle(**flop_handles())
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        counted = analysis.by_operator()
        unsupported = analysis.unsupported_ops()
    assert dssm.selective_scan is original
    assert counted["selective_scan"] > 0
    assert not any("SelectiveScan" in op for op in unsupported)
    assert "aten::gelu" in unsupported  # uncounted ops are recorded, so their absence below means something
    # Nothing of a scan backend (the reference's softplus, its doubling passes' cat) shows beside the node.
    assert "aten::softplus" not in unsupported and "aten::cat" not in unsupported, unsupported
    with pytest.raises(ZeroDivisionError), countable_selective_scan():
        1 / 0
    assert dssm.selective_scan is original


def test_counting_leaves_the_model_as_it_was_and_rejects_bad_sizes():
    """Module modes and the model's function are the same after counting as before."""
    model = _mini_model().train()
    model.layers[1].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    image = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        before = model.eval()(image)
    model.train()
    model.layers[1].eval()
    count_flops(model, input_size=(3, 48, 40))
    assert {name: m.training for name, m in model.named_modules()} == modes
    with torch.no_grad():
        after = model.eval()(image)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert before.abs().max() > 0
    with pytest.raises(ValueError, match="input_size"):
        count_flops(model, input_size=(224, 224))


def test_count_params_counts_shared_tensors_once():
    layer = torch.nn.Linear(3, 4)
    assert count_params(torch.nn.Sequential(layer, torch.nn.ReLU(), layer)) == 3 * 4 + 4


def _load_tool():
    """tools/flops.py as a module (it is a script, not part of the package)."""
    return load_tool("flops")


def test_cli_prints_the_counts(capsys):
    """The tool reports the same numbers as the library (at a small size, to stay fast)."""
    assert _load_tool().main(["--model", "defmamba_tiny", "--size", "64", "80"]) == 0
    out = capsys.readouterr().out
    total, by_op = count_flops(defmamba.build_model("defmamba_tiny"), input_size=(3, 64, 80))
    assert "input 3×64×80" in out
    assert "7,547,878" in out and "(paper at 224×224: 8M)" in out
    assert f"{total / 1e9:.4f} G" in out
    for op in OPERATORS:
        assert any(line.split()[:2] == [op, f"{by_op[op] / 1e9:.4f}"] for line in out.splitlines()), op


def test_cli_help_runs_as_a_script():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "flops.py"), "--help"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert "--task {cls,det,seg}" in out and "--size H W" in out


def test_cli_task_without_openmmlab(monkeypatch, capsys):
    """--task det/seg names the missing OpenMMLab stack and how to install it."""
    tool = _load_tool()
    for package in ("mmdet", "mmseg"):
        monkeypatch.setitem(sys.modules, package, None)  # makes `import mmdet` fail
    assert tool.main(["--task", "seg", "--model", "defmamba_small"]) == 2
    err = capsys.readouterr().err
    assert "mmseg" in err and "install_mm.sh" in err


@pytest.mark.slow
def test_cli_segmentation_task(capsys):
    """--task seg counts the whole UperNet of our config (needs the mm extra)."""
    pytest.importorskip("mmseg")
    pytest.importorskip("mmcv.ops")
    assert _load_tool().main(["--model", "defmamba_tiny", "--task", "seg", "--size", "64", "96"]) == 0
    out = capsys.readouterr().out
    assert "upernet_defmamba-t_8xb2-160k_ade20k-512x512.py, input 3×64×96" in out
    gflops = float(out.split("FLOPs")[1].split()[0])
    backbone, _ = count_flops(defmamba.DefMambaBackbone(dims=48, depths=(2, 2, 5, 2)), input_size=(3, 64, 96))
    assert gflops > backbone / 1e9  # the backbone plus a decoder at full resolution
    assert "paper" not in out  # the paper's 950 G is for 512×2048 only


@pytest.mark.parametrize("argv,config,paper", [
    (["--task", "det"], "mask-rcnn_defmamba-t_fpn_1x_coco.py", "DefMamba-S only"),
    (["--task", "det", "--model", "defmamba_small"], "mask-rcnn_defmamba-s_fpn_1x_coco.py", "(paper, DefMamba-S: 273G)"),
    (["--task", "seg", "--model", "defmamba_base"], "upernet_defmamba-b_8xb2-160k_ade20k-512x512.py", "DefMamba-S only"),
    (["--task", "seg", "--config", str(REPO / "configs" / "segmentation" / "upernet_defmamba-s_8xb2-160k_ade20k-512x512.py")],
     "upernet_defmamba-s_8xb2-160k_ade20k-512x512.py", "(paper, DefMamba-S: 950G)"),
])
def test_cli_task_prints_the_paper_number_of_the_counted_variant(argv, config, paper, monkeypatch, capsys):
    """The paper gives detection/segmentation FLOPs for DefMamba-S alone: beside a count of another
    variant's config it says so rather than print S's number. (The count itself is stubbed: what
    is checked is which config is counted and what is printed beside it.)"""
    pytest.importorskip("mmdet")
    pytest.importorskip("mmseg")
    import defmamba.mm.runner as runner

    counted = []
    monkeypatch.setattr(runner, "count_task_flops", lambda task, path, shape: counted.append(Path(path).name) or 2.5e11)
    assert _load_tool().main(argv) == 0
    out = capsys.readouterr().out
    assert counted == [config] and f"with {config}" in out and "250.0 G" in out
    assert paper in out
    assert ("273G" in out) == ("273G" in paper) and ("950G" in out) == ("950G" in paper)
