"""ONNX export: the exported graph passes onnx.checker and ONNX Runtime reproduces PyTorch,
for the batch it was traced with and another one (dynamic batch)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import defmamba
from defmamba.onnx_export import _stable_argsort_symbolic, check_onnx, export_onnx

onnxruntime = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

REL_TOL = 1e-4
EXPORT_TOOL = Path(__file__).resolve().parents[1] / "tools" / "export_onnx.py"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = defmamba.DefMamba(dims=32, depths=(1, 1, 1, 1), num_classes=10, scan_backend="torch")
    path = tmp_path_factory.mktemp("onnx") / "mini.onnx"
    export_onnx(model, path, height=64, width=72, batch_size=2, dynamic_batch=True)
    return model, path


@pytest.mark.parametrize("batch", [2, 3, 1])
def test_onnxruntime_matches_pytorch(exported, batch):
    model, path = exported
    inputs = torch.randn(batch, 3, 64, 72, generator=torch.Generator().manual_seed(batch))
    check = check_onnx(model, path, inputs)
    assert check.batch_size == batch
    assert check.max_rel_diff <= REL_TOL, check


def test_learned_order_is_not_raster(exported):
    """Guard on the comparison above: the exported graph exercises a real permutation."""
    model, _ = exported
    orders = []
    hook = model.layers[0].blocks[0].op.DS.register_forward_hook(lambda m, i, out: orders.append(out.order))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 72))
    hook.remove()
    assert (orders[0][0] != torch.arange(orders[0].shape[1])).sum() > orders[0].shape[1] // 2


def test_graph_has_fixed_spatial_size_and_dynamic_batch(exported):
    _, path = exported
    graph_input = onnx.load(str(path)).graph.input[0]
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 64, 72]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)dimension"):
        session.run(None, {"image": np.zeros((1, 3, 64, 64), dtype=np.float32)})


@pytest.mark.slow
def test_dynamo_exporter_matches_pytorch(tmp_path):
    torch.manual_seed(1)
    model = defmamba.DefMamba(dims=16, depths=(1, 1, 1, 1), num_classes=10, scan_backend="torch")
    path = tmp_path / "mini_dynamo.onnx"
    export_onnx(model, path, height=64, width=40, batch_size=2, dynamic_batch=True, exporter="dynamo")
    for batch in (2, 3):
        check = check_onnx(model, path, torch.randn(batch, 3, 64, 40))
        assert check.max_rel_diff <= REL_TOL, check


class _StableArgsort(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.argsort(x, dim=1, stable=True)


def test_stable_argsort_exports_with_ties_in_order(tmp_path):
    """The TopK translation keeps tied values in index order, as the stable sort does."""
    path = tmp_path / "argsort.onnx"
    x = torch.tensor([[0.5, -1.0, 0.5, 0.5, -1.0, 2.0, 0.0, 0.5]]).repeat(3, 1)
    x[1] = x[1].flip(0)
    x[2] = torch.randn(8)
    with _stable_argsort_symbolic():
        torch.onnx.export(_StableArgsort(), (x,), str(path), input_names=["x"], output_names=["order"], opset_version=17,
                         dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})[0]
    np.testing.assert_array_equal(got, torch.argsort(x, dim=1, stable=True).numpy())


def test_cli_refuses_dynamic_height_width_with_reason(capsys):
    import runpy
    import sys

    argv = sys.argv
    sys.argv = ["export_onnx.py", "--model", "defmamba_tiny", "--out", "unused.onnx", "--dynamic", "all"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(EXPORT_TOOL), run_name="__main__")
    finally:
        sys.argv = argv
    assert exit_info.value.code == 2
    assert "height/width" in capsys.readouterr().err


def _export_tool(argv: list[str], capsys) -> tuple[int, str]:
    from tool_helpers import load_tool

    status = load_tool("export_onnx").main([str(a) for a in argv])
    return status, capsys.readouterr().err


def test_cli_bad_arguments_are_refused_before_exporting(tmp_path, capsys):
    """Every case stops before the (seconds-long) export, with exit status 2 and the reason."""
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder")
    text_checkpoint = tmp_path / "notes.pth"
    text_checkpoint.write_text("these are my notes\n")
    out = tmp_path / "model.onnx"
    cases = [
        (["--model", "defmamba_huge", "--out", out], "--model: unknown model 'defmamba_huge'; choose one of"),
        (["--model", "defmamba_tiny", "--out", out, "--height", "31"], "--height 31 --width 224: DefMamba needs inputs of at least 32×32"),
        (["--model", "defmamba_tiny", "--out", out, "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--model", "defmamba_tiny", "--out", tmp_path], f"--out {tmp_path} is a folder; name the .onnx file to write"),
        (["--model", "defmamba_tiny", "--out", a_file / "model.onnx"], f"--out {a_file / 'model.onnx'} cannot be written"),
    ]
    for argv, message in cases:
        status, err = _export_tool(argv, capsys)
        assert status == 2 and f"error: {message}" in err, (argv, err)
    assert not out.exists()
    status, err = _export_tool(["--model", "defmamba_tiny", "--out", out, "--checkpoint", text_checkpoint], capsys)
    assert status == 1 and f"{text_checkpoint} is not a PyTorch checkpoint: it is a text file" in err
    assert "Traceback" not in err and "weights_only" not in err


def test_cli_accepts_unsafe_load_as_its_refusal_advises(tmp_path, capsys, monkeypatch):
    """A checkpoint with a class outside the allowlist is refused, naming --unsafe-load, which the tool
    takes: the weights then reach the exporter (replaced here by a stub: exporting takes a minute on CPU)."""
    import argparse
    import types

    from tool_helpers import load_tool

    torch.manual_seed(0)
    weights = defmamba.build_model("defmamba_tiny").state_dict()
    checkpoint = tmp_path / "with_args.pth"
    torch.save({"model": weights, "args": argparse.Namespace(lr=0.1)}, checkpoint)
    argv = [str(a) for a in ["--model", "defmamba_tiny", "--checkpoint", checkpoint, "--out", tmp_path / "m.onnx"]]
    tool = load_tool("export_onnx")
    exported = []

    def stub_export(model, path, *args, **kwargs):
        exported.append(model.state_dict())
        Path(path).write_bytes(b"stub")

    monkeypatch.setattr(tool, "export_onnx", stub_export)
    monkeypatch.setattr(tool, "check_onnx", lambda model, path, inputs: types.SimpleNamespace(
        batch_size=len(inputs), max_abs_diff=0.0, max_rel_diff=0.0))
    assert tool.main(argv) == 1
    err = capsys.readouterr().err
    assert "argparse.Namespace" in err and "--unsafe-load" in err and not exported
    assert tool.main(argv + ["--unsafe-load"]) == 0
    assert all(torch.equal(exported[0][k], v) for k, v in weights.items())
