"""Scan visualiser: the captured records describe the deformable layers correctly, and the
command-line tool writes one readable PNG per stage, with random weights or a checkpoint."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

import defmamba
from defmamba.visualize import capture_scans, plot_scan

matplotlib.use("Agg")
TOOL = Path(__file__).resolve().parents[1] / "tools" / "visualize_scan.py"
SMALL = dict(dims=16, depths=(1, 2, 1, 1), num_classes=4, scan_backend="torch")


def _run_tool(*argv: str) -> None:
    saved = sys.argv
    sys.argv = [str(TOOL), *argv]
    try:
        runpy.run_path(str(TOOL), run_name="__main__")
    finally:
        sys.argv = saved


def test_capture_records_every_requested_layer():
    torch.manual_seed(0)
    model = defmamba.DefMamba(**SMALL).eval()
    image = torch.randn(2, 3, 64, 96)
    records = capture_scans(model, image, [(0, 0), (1, 1), (3, 0)])
    assert [(r.stage, r.block) for r in records] == [(0, 0), (1, 1), (3, 0)]
    assert [(r.height, r.width) for r in records] == [(16, 24), (8, 12), (2, 3)]
    for record in records:
        length = record.height * record.width
        assert sorted(record.order.tolist()) == list(range(length))  # a permutation
        assert torch.equal(record.order, torch.argsort(record.path, stable=True))
        # Offsets are at most half a cell: |sample − reference| ≤ 1/(size − 1) grid units per axis.
        offset = (record.sample_points - record.reference_points).abs()
        assert offset[..., 0].max() <= 1 / (record.width - 1) + 1e-6
        assert offset[..., 1].max() <= 1 / (record.height - 1) + 1e-6
        shift = record.sequence_shift.flatten()
        position = torch.empty(length, dtype=torch.long)
        position[record.order] = torch.arange(length)
        assert torch.equal(shift, (position - torch.arange(length)).abs())
    assert not model.layers[0].blocks[0].op.DS._forward_hooks  # hooks removed


def test_capture_rejects_missing_block():
    model = defmamba.DefMamba(**SMALL)
    with pytest.raises(ValueError, match=r"depths \[1, 2, 1, 1\]"):
        capture_scans(model, torch.randn(1, 3, 64, 64), [(2, 1)])


def test_plot_scan_draws_four_panels():
    torch.manual_seed(0)
    model = defmamba.DefMamba(**SMALL).eval()
    record = capture_scans(model, torch.randn(1, 3, 64, 64), [(1, 0)])[0]
    fig = plot_scan(np.random.default_rng(0).random((64, 64, 3)), record, title="test")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 4 and any("raster" in t for t in titles) and any("learned" in t for t in titles)
    assert "8×8 tokens" in fig.get_suptitle()
    matplotlib.pyplot.close(fig)


def _random_png(path: Path, height: int, width: int) -> Path:
    from PIL import Image

    pixels = (np.random.default_rng(1).random((height, width, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_tool_writes_one_png_per_stage(tmp_path):
    image = _random_png(tmp_path / "photo.png", 50, 70)
    out = tmp_path / "scans"
    _run_tool(str(image), "--out", str(out), "--height", "64", "--width", "96")
    written = sorted(p.name for p in out.iterdir())
    assert written == [f"scan_photo_stage{i}_block0.png" for i in range(4)]
    from PIL import Image

    for name in written:
        with Image.open(out / name) as png:
            assert png.format == "PNG" and min(png.size) > 400
            assert np.asarray(png.convert("L")).std() > 10  # not a blank canvas


def test_tool_loads_checkpoint_and_chooses_block(tmp_path):
    torch.manual_seed(3)
    model = defmamba.build_model("defmamba_tiny")
    ckpt = tmp_path / "tiny.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, ckpt)
    image = _random_png(tmp_path / "img.png", 64, 64)
    _run_tool(str(image), "--checkpoint", str(ckpt), "--block", "4", "--stages", "2",
              "--height", "64", "--width", "64", "--out", str(tmp_path), "--name", "viz")
    assert (tmp_path / "viz_stage2_block4.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="no deformable layer"):
        _run_tool(str(image), "--block", "4", "--stages", "1", "--height", "64", "--width", "64", "--out", str(tmp_path))


def test_tool_reports_unreadable_images_and_bad_arguments(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    image = _random_png(tmp_path / "ok.png", 40, 40)
    text_checkpoint = tmp_path / "notes.pth"
    text_checkpoint.write_text("notes\n")
    cases = [
        ([str(broken)], f"cannot read image {broken}: .*delete or replace the file"),
        ([str(tmp_path)], f"{tmp_path} is not an image file"),
        ([str(image), "--height", "31"], "--height 31 --width 224: DefMamba needs inputs of at least 32×32"),
        ([str(image), "--model", "defmamba_huge"], "--model: unknown model 'defmamba_huge'"),
        ([str(image), "--checkpoint", str(text_checkpoint)], f"{text_checkpoint} is not a PyTorch checkpoint"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            _run_tool(*argv, "--out", str(tmp_path / "scans"))
    assert not (tmp_path / "scans").exists()


def test_tool_scales_a_16_bit_image_instead_of_clipping_it(tmp_path):
    from PIL import Image

    from tool_helpers import load_tool

    values = (np.random.default_rng(2).random((48, 40)) * 65535).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    picture, name = load_tool("visualize_scan").load_image(str(path), 48, 40)
    expected = np.round(values / 257.0) / 255.0
    assert name == "deep" and picture.shape == (48, 40, 3)
    np.testing.assert_allclose(picture[..., 0], expected, atol=1 / 255 + 1e-6)   # bicubic resize to the same size


def test_tool_accepts_unsafe_load_as_its_refusal_advises(tmp_path):
    import argparse

    torch.manual_seed(3)
    model = defmamba.build_model("defmamba_tiny")
    ckpt = tmp_path / "with_args.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, ckpt)
    image = _random_png(tmp_path / "img.png", 64, 64)
    argv = [str(image), "--checkpoint", str(ckpt), "--stages", "3", "--height", "64", "--width", "64",
            "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="argparse.Namespace.*--unsafe-load"):
        _run_tool(*argv)
    _run_tool(*argv, "--unsafe-load")
    assert (tmp_path / "scan_img_stage3_block0.png").is_file()
