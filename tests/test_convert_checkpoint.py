""".safetensors checkpoints: tools/convert_checkpoint.py turns the official layout and ours into one
set of weights with metadata, which loads strictly everywhere a checkpoint path is accepted and
computes exactly what the .pth weights compute; broken inputs get clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from checkpoint_fixtures import authors_config, official_tensors
from safetensors import safe_open
from tool_helpers import load_tool

import defmamba
from defmamba import DefMamba
from defmamba.checkpoint import CheckpointError, load_checkpoint, safe_load


@pytest.fixture(scope="module")
def convert():
    return load_tool("convert_checkpoint")


@pytest.fixture(scope="module")
def official_file(tmp_path_factory) -> tuple[Path, dict, dict]:
    """DefMamba-T weights and EMA in the authors' layout, with their yacs config and training state."""
    weights, ema = official_tensors(2), official_tensors(3)
    path = tmp_path_factory.mktemp("official") / "defmamba_tiny.pth"
    torch.save({"model": weights, "model_ema": ema, "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"last_epoch": 299}, "max_accuracy": 78.6, "epoch": 299, "max_accuray_ema": 78.7,
                "config": authors_config()}, path)
    return path, weights, ema


def small_model() -> DefMamba:
    return DefMamba(dims=16, depths=(1, 2, 1, 1), num_classes=7)


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def outputs(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(image)


@pytest.mark.parametrize("ema", [False, True], ids=["model", "model_ema"])
def test_official_layout_converts_and_computes_the_same(convert, official_file, tmp_path, ema):
    source, weights, ema_weights = official_file
    target = tmp_path / "tiny.safetensors"
    assert convert.main([str(source), "--out", str(target)] + (["--ema"] if ema else [])) == 0
    entry = "model_ema" if ema else "model"
    metadata = metadata_of(target)
    assert metadata["arch"] == "defmamba_tiny" and metadata["weights"] == entry
    assert metadata["source"] == source.name and metadata["defmamba_version"] == defmamba.__version__

    from_safetensors = defmamba.build_model("defmamba_tiny")
    report = load_checkpoint(from_safetensors, target)  # strict
    assert not report.missing and not report.unexpected
    expected = ema_weights if ema else weights
    assert all(torch.equal(v, expected[k]) for k, v in from_safetensors.state_dict().items())
    from_pth = defmamba.build_model("defmamba_tiny")
    load_checkpoint(from_pth, source, key=entry)
    image = torch.randn(2, 3, 37, 45)
    assert torch.equal(outputs(from_safetensors, image), outputs(from_pth, image))


def test_timm_pretrained_overlay_takes_a_safetensors_file(convert, official_file, tmp_path):
    source, weights, _ = official_file
    target = tmp_path / "tiny.safetensors"
    assert convert.main([str(source), "--out", str(target)]) == 0
    for model in (timm.create_model("defmamba_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(target))),
                  defmamba.build_model("defmamba_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(target)))):
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_our_training_checkpoint_converts_default_and_ema(convert, tmp_path):
    model, ema = small_model(), small_model()
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn_like(p))
    optimizer = torch.optim.AdamW(model.parameters())
    source = tmp_path / "ckpt_epoch_4.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": {"t": 40},
                "scaler": {}, "max_accuracy": 12.5, "epoch": 4, "config": "MODEL:\n  NAME: small\n",
                "model_ema": ema.state_dict(), "max_accuray_ema": 13.0}, source)
    image = torch.randn(1, 3, 33, 64)
    for flags, reference in (([], model), (["--ema"], ema)):
        target = tmp_path / f"converted{len(flags)}.safetensors"
        assert convert.main([str(source), "--out", str(target)] + flags) == 0
        assert "arch" not in metadata_of(target)  # not a published variant
        loaded = small_model()
        load_checkpoint(loaded, target)
        assert torch.equal(outputs(loaded, image), outputs(reference, image))


def test_default_output_path_and_refusal_to_overwrite(convert, tmp_path, capsys):
    source = tmp_path / "weights.pth"
    torch.save(small_model().state_dict(), source)  # a plain state dict
    assert convert.main([str(source)]) == 0
    target = tmp_path / "weights.safetensors"
    assert metadata_of(target)["weights"] == "(plain state dict)"
    before = target.read_bytes()
    torch.save(small_model().state_dict(), source)
    assert convert.main([str(source)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert target.read_bytes() == before
    assert convert.main([str(source), "--force"]) == 0
    assert target.read_bytes() != before
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "no_ema", "wrong_suffix"])
def test_bad_input_is_a_clear_error(convert, tmp_path, capsys, case):
    source = tmp_path / "input.pth"
    args = [str(source)]
    if case == "not_a_checkpoint":
        source.write_bytes(b"these are not weights" * 10)
    elif case == "no_ema":
        torch.save({"model": small_model().state_dict()}, source)
        args.append("--ema")
    elif case == "wrong_suffix":
        torch.save({"model": small_model().state_dict()}, source)
        args += ["--out", str(tmp_path / "out.pth")]
    code = convert.main(args)
    message = capsys.readouterr().err
    expected = {"missing": "checkpoint not found", "not_a_checkpoint": "is not a PyTorch checkpoint: it is a text file",
                "no_ema": "no 'model_ema' entry", "wrong_suffix": "must end in .safetensors"}[case]
    assert code in (1, 2) and expected in message
    assert not list(tmp_path.glob("*.safetensors*"))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_is_a_clear_error(convert, tmp_path, damage):
    source = tmp_path / "w.pth"
    torch.save(small_model().state_dict(), source)
    assert convert.main([str(source)]) == 0
    path = tmp_path / "w.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100] if damage == "truncated" else b"\x07" * 64)
    with pytest.raises(CheckpointError, match=r"w\.safetensors: it is not a valid \.safetensors file"):
        load_checkpoint(small_model(), path)


def test_safetensors_reads_in_the_official_layout(tmp_path, convert):
    source = tmp_path / "w.pth"
    state = small_model().state_dict()
    torch.save(state, source)
    assert convert.main([str(source)]) == 0
    loaded = safe_load(tmp_path / "w.safetensors")
    assert list(loaded) == ["model"] and all(torch.equal(loaded["model"][k], v) for k, v in state.items())


def test_mm_backbone_init_takes_a_safetensors_file(convert, tmp_path):
    pytest.importorskip("mmengine", reason="the mm stack is optional (bash tools/install_mm.sh)")
    from defmamba import DefMambaBackbone
    from defmamba.mm import load_backbone_weights

    classifier = small_model()
    source = tmp_path / "cls.pth"
    torch.save({"model": classifier.state_dict()}, source)
    assert convert.main([str(source)]) == 0
    backbone = DefMambaBackbone(dims=16, depths=(1, 2, 1, 1))
    report = load_backbone_weights(backbone, str(tmp_path / "cls.safetensors"))
    assert report.loaded and all(k.startswith("classifier.") for k in report.ignored)
    state = classifier.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in backbone.state_dict().items() if k in report.loaded)
