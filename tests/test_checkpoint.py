"""Checkpoint loading: the authors' format, wrappers, safe unpickling and explanatory errors."""
import pytest
import torch
from yacs.config import CfgNode

from defmamba import DefMamba, DefMambaBackbone
from defmamba.checkpoint import CheckpointError, extract_state_dict, load_checkpoint, safe_load


def tiny(num_classes: int = 10, dims: int = 16, depths=(1, 1, 1, 1)) -> DefMamba:
    return DefMamba(dims=dims, depths=depths, num_classes=num_classes)


def perturbed_state(model) -> dict:
    return {k: v + torch.rand_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}


def assert_loaded(model, state):
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_authors_format_with_yacs_config_and_ema(tmp_path):
    model = tiny()
    weights, ema = perturbed_state(model), perturbed_state(model)
    config = CfgNode({"MODEL": CfgNode({"TYPE": "vssm", "NAME": "defm_tiny"}), "TRAIN": CfgNode({"EPOCHS": 300})})
    path = tmp_path / "official.pth"
    torch.save({"model": weights, "model_ema": ema, "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"last_epoch": 5}, "max_accuracy": 78.6, "max_accuray_ema": 78.7,
                "epoch": 299, "config": config}, path)
    report = load_checkpoint(model, path)
    assert report.source_key == "model" and not report.missing and not report.unexpected
    assert_loaded(model, weights)
    load_checkpoint(model, path, key="model_ema")
    assert_loaded(model, ema)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix"])
def test_wrappers(tmp_path, wrap):
    model = tiny()
    state = perturbed_state(model)
    payload = {"plain": state, "state_dict": {"state_dict": state, "meta": {"epoch": 1}},
               "module_prefix": {"model": {f"module.{k}": v for k, v in state.items()}}}[wrap]
    torch.save(payload, tmp_path / "ckpt.pth")
    load_checkpoint(model, tmp_path / "ckpt.pth")
    assert_loaded(model, state)


def test_wrong_variant_names_the_likely_cause():
    small_like = DefMamba(dims=24, depths=(1, 2, 1, 1), num_classes=10).state_dict()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny(), {"model": small_like})
    message = str(err.value)
    assert "width 24 and depths (1, 2, 1, 1)" in message and "width 16" in message
    assert "missing in checkpoint" in message or "unexpected in checkpoint" in message
    assert "shape mismatch" in message and "patch_embed.0.weight" in message


def test_official_variant_is_recognised():
    from defmamba.models.registry import defmamba_small, defmamba_tiny

    with pytest.raises(CheckpointError, match="looks like DefMamba-Small"):
        load_checkpoint(defmamba_tiny(), {"model": defmamba_small().state_dict()})


def test_head_mismatch_and_backbone_loading():
    source = tiny(num_classes=10)
    with pytest.raises(CheckpointError, match="different number of classes"):
        load_checkpoint(tiny(num_classes=5), {"model": source.state_dict()})
    backbone = DefMambaBackbone(dims=16, depths=(1, 1, 1, 1))
    with pytest.raises(CheckpointError, match="classification checkpoint loaded into a backbone"):
        load_checkpoint(backbone, {"model": source.state_dict()})
    report = load_checkpoint(backbone, {"model": source.state_dict()}, strict=False)
    assert sorted(report.missing) == sorted(f"outnorm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert sorted(report.unexpected) == sorted(k for k in source.state_dict() if k.startswith("classifier."))


def test_truncated_file_is_reported(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"model": tiny().state_dict()}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tiny(), path)
    with pytest.raises(CheckpointError, match="not found"):
        safe_load(tmp_path / "missing.pth")


class NotAllowed:
    """A class no checkpoint should need."""


def test_unknown_class_is_refused_with_opt_in(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": tiny().state_dict(), "extra": NotAllowed()}, path)
    with pytest.raises(CheckpointError, match=r"NotAllowed.*allow_pickle=True.*--unsafe-load"):
        safe_load(path)
    assert isinstance(safe_load(path, allow_pickle=True)["extra"], NotAllowed)


def test_no_weights_found_is_explained():
    with pytest.raises(CheckpointError, match="no weights found"):
        extract_state_dict({"epoch": 3, "optimizer": {}})
    with pytest.raises(CheckpointError, match="no 'model_ema' entry"):
        extract_state_dict({"model": tiny().state_dict()}, key="model_ema")


class RunsCode:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        import os

        return (os.system, ("echo owned",))


def test_refusals_name_the_object_and_never_advise_weights_only_false(tmp_path):
    path = tmp_path / "malicious.pth"
    torch.save({"model": tiny().state_dict(), "payload": RunsCode()}, path)
    with pytest.raises(CheckpointError) as err:
        safe_load(path)
    message = str(err.value)
    assert message.startswith(f"checkpoint {path} refers to the Python object posix.system, which is not one of "
                              "the plain types allowed in checkpoints")
    assert "trust" in message and "--unsafe-load" in message
    assert "weights_only" not in message and "torch.load.html" not in message
    assert err.value.__cause__ is None and err.value.__suppress_context__    # torch's advice is not chained


@pytest.mark.parametrize("content,expected", [
    (b"hello world\nnot a checkpoint\n", "is not a PyTorch checkpoint: it is a text file (starting 'hello world')"),
    (b"", "is empty (0 bytes)"),
    (bytes([0xf2, 0xbc, 0xe0, 0x3c]) * 16, "is not a PyTorch checkpoint (it starts with the bytes"),
    (b"\x80\x02garbage after a pickle header", "it is truncated or corrupt"),
    (b"PK\x03\x04 a broken zip", "it is truncated or corrupt"),
])
def test_files_that_are_not_checkpoints_are_named_as_such(tmp_path, content, expected):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    for load in (lambda: safe_load(path), lambda: load_checkpoint(tiny(), path)):
        with pytest.raises(CheckpointError) as err:
            load()
        assert str(path) in str(err.value) and expected in str(err.value), str(err.value)
        assert "weights_only" not in str(err.value)


def test_a_folder_given_as_checkpoint_is_not_reported_missing(tmp_path):
    torch.save({"model": tiny().state_dict()}, tmp_path / "last.pth")
    with pytest.raises(CheckpointError, match=f"checkpoint path {tmp_path} is a folder, not a file: pass the "
                                              r"checkpoint file inside it \(it holds last.pth\)"):
        safe_load(tmp_path)


def test_a_mismatch_names_the_file(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save({"model": tiny(dims=24).state_dict()}, path)
    with pytest.raises(CheckpointError, match=f"checkpoint {path} \\['model'\\] does not fit DefMamba"):
        load_checkpoint(tiny(), path)
