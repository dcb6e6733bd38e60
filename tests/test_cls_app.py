"""End-to-end tests of `classification/main.py` on CPU with a tiny DefMamba (dims 16, one block
per stage, 32² images) and a generated 3-class ImageFolder: training, `--resume --eval`,
`--throughput`, exact resume after a SIGKILL during a checkpoint write, torchrun /
torch.distributed.launch (gloo), mixed precision, the official checkpoint format and the
bad-input messages. Most runs call `main.main(argv)` in this process (the same code path as the
command line, without paying for a new interpreter); the ones that need a real process use one.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "classification"
PY = sys.executable
# CPU runs (the deterministic ones) even on a GPU machine, with the in-process runs' thread count.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
CLASSES = ("cat", "dog", "fox")
N_TRAIN, N_VAL = 4, 2      # images per class

TINY_CFG = """\
MODEL:
  NAME: tiny
  NUM_CLASSES: 3
  DROP_PATH_RATE: 0.1
  DEFMAMBA:
    DIMS: 16
    DEPTHS: [1, 1, 1, 1]
    D_STATE: 4
DATA:
  IMG_SIZE: 32
  BATCH_SIZE: 4
  NUM_WORKERS: 0
TRAIN:
  EPOCHS: 4
  WARMUP_EPOCHS: 1
  BASE_LR: 0.02
AUG:
  MIXUP: 0.8
  CUTMIX: 1.0
  REPROB: 0.25
  AUTO_AUGMENT: rand-m9-mstd0.5-inc1
MODEL_EMA_DECAY: 0.9
AMP_ENABLE: false
PRINT_FREQ: 1
SAVE_KEEP: 2
"""


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def app():
    """The application module behind `classification/main.py`, run on CPU with one thread."""
    from defmamba.train import main as app_main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # tiny tensors: one thread is faster and immune to oversubscription
    cpu_only = pytest.MonkeyPatch()
    cpu_only.setattr(torch.cuda, "is_available", lambda: False)   # the CPU path, also on GPU machines
    try:
        yield app_main
    finally:
        cpu_only.undo()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tiny ImageFolder (3 classes, 4 train + 2 val non-square JPEGs each) and the tiny config."""
    root = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    for split, count in (("train", N_TRAIN), ("val", N_VAL)):
        for c, name in enumerate(CLASSES):
            folder = root / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                pixels[..., c] = 255 - (pixels[..., c] // 4)       # a learnable colour cue per class
                Image.fromarray(pixels).save(folder / f"{name}_{i}.JPEG", quality=90)
    (root / "tiny.yaml").write_text(TINY_CFG)
    return root


def base_args(work: Path, out: Path) -> list[str]:
    return ["--cfg", str(work / "tiny.yaml"), "--data-path", str(work / "data"), "--output", str(out)]


def run_dir(out: Path, tag: str = "default") -> Path:
    return out / "tiny" / tag


def call(app, argv: list[str], capsys=None) -> tuple[int, str]:
    """Run main in this process; returns (exit status, stderr text when capsys is given)."""
    status = app.main([str(a) for a in argv])
    err = capsys.readouterr().err if capsys is not None else ""
    return status, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def reference_eval(state: dict, data_dir: Path, size: int = 32) -> tuple[float, float]:
    """Top-1 (%) and mean cross-entropy of ``state`` on val/, computed without the application's code."""
    import defmamba
    from torchvision import transforms as T

    model = defmamba.DefMamba(dims=16, depths=(1, 1, 1, 1), num_classes=3, d_state=4)
    model.load_state_dict(state)
    model.eval()
    tf = T.Compose([T.Resize(int(size / 0.875), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    images, labels = [], []
    for c, name in enumerate(CLASSES):
        for path in sorted((data_dir / "val" / name).iterdir()):
            images.append(tf(Image.open(path).convert("RGB")))
            labels.append(c)
    with torch.no_grad():
        logits = model(torch.stack(images))
    labels = torch.tensor(labels)
    return 100.0 * (logits.argmax(1) == labels).float().mean().item(), F.cross_entropy(logits, labels).item()


KILL_WRAPPER = """\
import io, os, signal, sys
import torch
_save, _calls = torch.save, [0]
def save(obj, f, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == {kill_at}:      # write half of this checkpoint, then die like a preempted job
        buf = io.BytesIO(); _save(obj, buf); data = buf.getvalue()
        f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *args, **kwargs)
torch.save = save
from defmamba.train import main
sys.exit(main.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def reference_run(app, work) -> Path:
    """4 uninterrupted epochs on the tiny ImageFolder."""
    out = work / "out_ref"
    status, _ = call(app, base_args(work, out))
    assert status == 0
    return run_dir(out)


@pytest.fixture(scope="module")
def killed_run(work) -> tuple[Path, subprocess.CompletedProcess]:
    """The same training in a process SIGKILLed half-way through writing its 3rd checkpoint."""
    out = work / "out_killed"
    script = work / "kill_during_save.py"
    script.write_text(KILL_WRAPPER.format(kill_at=3))
    proc = subprocess.run([PY, str(script), *base_args(work, out)], capture_output=True, text=True, timeout=600,
                          env=ENV)
    return run_dir(out), proc


# ---------------------------------------------------------------- training, evaluation, throughput
def test_training_writes_checkpoints_logs_and_metrics(reference_run):
    out = reference_run
    records = metrics(out)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert all(np.isfinite([r["train_loss"], r["val_loss"], r["ema_loss"]]).all() for r in records)
    assert all(r["val_acc1"] in {100.0 * k / 6 for k in range(7)} for r in records)   # 6 val images
    assert sorted(p.name for p in out.glob("ckpt_epoch_*.pth")) == ["ckpt_epoch_2.pth", "ckpt_epoch_3.pth"]
    for name in ("last.pth", "best.pth", "best_ema.pth", "config.yaml"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp"))
    ckpt = load(out / "last.pth")      # our checkpoints load with weights_only=True
    assert {"model", "model_ema", "optimizer", "lr_scheduler", "scaler", "max_accuracy", "max_accuray_ema",
            "epoch", "config"} <= set(ckpt)
    assert ckpt["epoch"] == 3 and isinstance(ckpt["config"], str) and "DIMS: 16" in ckpt["config"]
    assert ckpt["max_accuracy"] == max(r["val_acc1"] for r in records)
    schedule = ckpt["lr_scheduler"]                                # timm's CosineLRScheduler, 3 steps per epoch
    assert (schedule["warmup_t"], schedule["t_initial"]) == (1 * 3, (4 - 1) * 3)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-6 * 4 / 512)   # MIN_LR × batch/512 at the end
    assert load(out / "best.pth")["max_accuracy"] == ckpt["max_accuracy"]
    log = (out / "log_rank0.txt").read_text()
    for text in ("M parameters", "eta ", "lr ", "grad_norm ", "mem ", "Train: [3/4][2/3]", "training finished",
                 "best top-1", "last.pth"):
        assert text in log, text
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_eval_of_a_checkpoint_matches_an_independent_evaluation(app, work, reference_run):
    out = work / "out_eval"
    status, _ = call(app, base_args(work, out) + ["--resume", reference_run / "last.pth", "--eval"])
    assert status == 0
    result = json.loads((run_dir(out) / "eval.json").read_text())
    ckpt = load(reference_run / "last.pth")
    for key in ("model", "model_ema"):
        acc1, loss = reference_eval(ckpt[key], work / "data")
        assert result[key]["count"] == 6
        assert result[key]["acc1"] == pytest.approx(acc1)
        assert result[key]["loss"] == pytest.approx(loss, rel=1e-4)
    assert metrics(reference_run)[-1]["val_loss"] == pytest.approx(result["model"]["loss"], rel=1e-6)


def test_eval_with_pretrained_weights(app, work, reference_run):
    out = work / "out_pretrained_eval"
    status, _ = call(app, base_args(work, out) + ["--pretrained", reference_run / "best.pth", "--eval",
                                                  "--model_ema", "false"])
    assert status == 0
    result = json.loads((run_dir(out) / "eval.json").read_text())
    acc1, loss = reference_eval(load(reference_run / "best.pth")["model"], work / "data")
    assert set(result) == {"checkpoint", "model"}
    assert result["model"]["acc1"] == pytest.approx(acc1) and result["model"]["loss"] == pytest.approx(loss, rel=1e-4)


def test_throughput_mode(app, work):
    out = work / "out_tp"
    status, _ = call(app, base_args(work, out) + ["--throughput", "--batch-size", "1"])
    assert status == 0
    log = (run_dir(out) / "log_rank0.txt").read_text()
    assert "throughput:" in log and "images/s (batch 1, 32²" in log
    assert not (run_dir(out) / "last.pth").exists()


def test_digits_dataset_trains_two_epochs(app, work, monkeypatch):
    """The embedded dataset end to end (a tenth of it, to stay fast)."""
    from defmamba.train.data import digits
    full_split = digits._split_indices
    monkeypatch.setattr(digits, "_split_indices", lambda labels, split: full_split(labels, split)[::10])
    out = work / "out_digits"
    status, _ = call(app, ["--cfg", work / "tiny.yaml", "--output", out, "--batch-size", "16",
                           "--opts", "DATA.DATASET", "digits", "MODEL.NUM_CLASSES", "10", "TRAIN.EPOCHS", "2",
                           "AUG.HFLIP", "0.0"])
    assert status == 0
    records = metrics(run_dir(out))
    assert [r["epoch"] for r in records] == [0, 1]
    log = (run_dir(out) / "log_rank0.txt").read_text()
    assert "data: digits, 10 classes, 144 training / 36 validation images" in log
    assert "on 36 images" in log


def test_synthetic_dataset_trains_and_reports_images_per_second(app, work):
    out = work / "out_synthetic"
    status, _ = call(app, ["--cfg", work / "tiny.yaml", "--output", out, "--batch-size", "8",
                           "--opts", "DATA.DATASET", "synthetic", "DATA.SYNTHETIC_IMAGES", "40", "TRAIN.EPOCHS", "1"])
    assert status == 0
    (record,) = metrics(run_dir(out))
    assert record["train_images_per_s"] > 0
    log = (run_dir(out) / "log_rank0.txt").read_text()
    assert "images/s over all processes" in log and "on 4 images" in log


def test_gradient_accumulation_matches_the_larger_batch(app, work):
    """Batch 2 × 2 accumulation steps = batch 4 (same images, order, augmentation and learning rate).
    SGD, whose update is linear in the gradient, so summation-order noise stays at rounding level."""
    plain = ["--opts", "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0", "MODEL.DROP_PATH_RATE", "0.0", "TRAIN.EPOCHS", "1",
             "TRAIN.WARMUP_EPOCHS", "0", "MODEL_EMA", "False", "TRAIN.OPTIMIZER.NAME", "sgd", "TRAIN.BASE_LR", "5.0"]
    status_a, _ = call(app, base_args(work, work / "out_b4") + ["--batch-size", "4"] + plain)
    status_b, _ = call(app, base_args(work, work / "out_b2x2") + ["--batch-size", "2", "--accumulation-steps", "2"] + plain)
    assert status_a == status_b == 0
    big, accumulated = load(run_dir(work / "out_b4") / "last.pth"), load(run_dir(work / "out_b2x2") / "last.pth")
    assert big["lr_scheduler"]["t_initial"] == accumulated["lr_scheduler"]["t_initial"] == 3   # optimizer steps
    assert big["lr_scheduler"]["base_values"] == accumulated["lr_scheduler"]["base_values"] == [5.0 * 4 / 512] * 2
    import defmamba

    torch.manual_seed(0)       # the run's seed: the weights both runs started from
    start = defmamba.DefMamba(dims=16, depths=(1, 1, 1, 1), num_classes=3, d_state=4).state_dict()
    changed = 0
    for name, value in big["model"].items():
        torch.testing.assert_close(accumulated["model"][name], value, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(value, start[name])
    assert changed > len(start) // 2          # the comparison is between trained weights
    assert metrics(run_dir(work / "out_b4"))[0]["train_loss"] == pytest.approx(
        metrics(run_dir(work / "out_b2x2"))[0]["train_loss"], rel=1e-4)


# ---------------------------------------------------------------- crash safety and exact resume
def test_sigkill_during_checkpoint_write_leaves_the_previous_one_loadable(killed_run):
    out, proc = killed_run
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "last.pth.tmp").is_file()                    # the half-written file
    from defmamba.checkpoint import CheckpointError, safe_load

    with pytest.raises(CheckpointError):
        safe_load(out / "last.pth.tmp")
    assert safe_load(out / "last.pth")["epoch"] == 1           # two complete epochs survived
    assert [r["epoch"] for r in metrics(out)] == [0, 1]


def test_resume_after_the_kill_reproduces_the_uninterrupted_run_exactly(app, work, killed_run, reference_run):
    """4 epochs in one go == 2 epochs, a killed process, and a new run resuming 2 more:
    bit-identical weights, EMA, optimizer state and logged metrics."""
    out, _ = killed_run
    status, _ = call(app, base_args(work, work / "out_killed"))      # same output folder: auto-resume
    assert status == 0
    log = (out / "log_rank0.txt").read_text()
    assert f"auto-resume: continuing from {out / 'last.pth'}" in log and "resuming at epoch 2" in log
    assert not (out / "last.pth.tmp").exists()
    resumed, ref = load(out / "last.pth"), load(reference_run / "last.pth")
    assert resumed["epoch"] == ref["epoch"] == 3
    for key in ("model", "model_ema"):
        assert resumed[key].keys() == ref[key].keys()
        for name in ref[key]:
            assert torch.equal(resumed[key][name], ref[key][name]), f"{key}.{name} differs"
    for pid, state in ref["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(resumed["optimizer"]["state"][pid][name], value), f"optimizer {pid}.{name}"
    assert resumed["lr_scheduler"] == ref["lr_scheduler"]
    timing = "train_images_per_s"   # wall-clock speed: the only field that may differ
    assert all(timing in r for r in metrics(out)) and all(timing in r for r in metrics(reference_run))
    without_timing = lambda records: [{k: v for k, v in r.items() if k != timing} for r in records]  # noqa: E731
    assert without_timing(metrics(out)) == without_timing(metrics(reference_run))


# ---------------------------------------------------------------- distributed (gloo on CPU)
DDP_SIZE = 64    # DDP needs a gradient for every parameter; at 32² the last stage is 1×1 and A_logs gets none


@pytest.fixture(scope="module")
def torchrun_run(work) -> Path:
    out = work / "out_ddp"
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(APP / "main.py"), *base_args(work, out), "--batch-size", "2", "--opts", "TRAIN.EPOCHS", "1",
           "TRAIN.WARMUP_EPOCHS", "0", "DATA.IMG_SIZE", str(DDP_SIZE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir(out)


def test_torchrun_two_processes_train_and_reduce_metrics(app, work, torchrun_run):
    out = torchrun_run
    log0, log1 = (out / "log_rank0.txt").read_text(), (out / "log_rank1.txt").read_text()
    assert "processes: 2, this is rank 0" in log0 and "processes: 2, this is rank 1" in log1
    assert "on 6 images" in log0 and "on 6 images" in log1      # 3 images per rank, summed
    assert "Train: [0/1][2/3]" in log0                            # 6 images per rank / batch 2 = 3 batches
    record = metrics(out)[0]
    acc1, loss = reference_eval(load(out / "last.pth")["model"], work / "data", DDP_SIZE)
    assert record["val_acc1"] == pytest.approx(acc1) and record["val_loss"] == pytest.approx(loss, rel=1e-4)


def test_torch_distributed_launch_from_the_classification_folder(work, torchrun_run):
    """`python -m torch.distributed.launch` (passes --local-rank) evaluating with 2 processes,
    started from classification/ rather than the repository root."""
    out = work / "out_launch"
    cmd = [PY, "-m", "torch.distributed.launch", "--nnodes=1", "--node_rank=0", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "main.py", *base_args(work, out),
           "--resume", str(torchrun_run / "last.pth"), "--eval", "--opts", "DATA.IMG_SIZE", str(DDP_SIZE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=APP,
                          env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((run_dir(out) / "eval.json").read_text())
    ckpt = load(torchrun_run / "last.pth")
    for key in ("model", "model_ema"):
        acc1, loss = reference_eval(ckpt[key], work / "data", DDP_SIZE)
        assert result[key]["count"] == 6
        assert result[key]["acc1"] == pytest.approx(acc1) and result[key]["loss"] == pytest.approx(loss, rel=1e-4)


# ---------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_training_stays_finite(app, work, dtype):
    """bf16 autocast without a scaler, fp16 with a GradScaler (both run on CPU autocast)."""
    out = work / f"out_amp_{dtype}"
    status, _ = call(app, base_args(work, out) + ["--amp-dtype", dtype, "--opts", "AMP_ENABLE", "True",
                                                  "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0"])
    assert status == 0
    ckpt = load(run_dir(out) / "last.pth")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    record = metrics(run_dir(out))[0]
    assert np.isfinite([record["train_loss"], record["val_loss"]]).all()
    scale = ckpt["scaler"].get("scale")
    assert (scale is not None and scale > 0) if dtype == "float16" else not ckpt["scaler"]
    if dtype == "float16":
        assert "loss_scale" in (run_dir(out) / "log_rank0.txt").read_text()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_mixed_precision_training_and_throughput(work, dtype):
    out = work / f"out_gpu_{dtype}"
    gpu_env = {k: v for k, v in ENV.items() if k != "CUDA_VISIBLE_DEVICES"}
    args = [PY, str(APP / "main.py"), *base_args(work, out), "--amp-dtype", dtype, "--opts", "AMP_ENABLE", "True",
            "TRAIN.EPOCHS", "2", "DATA.IMG_SIZE", "64"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT, env=gpu_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (run_dir(out) / "log_rank0.txt").read_text()
    assert "on cuda:0" in log and ("loss_scale" in log) == (dtype == "float16")
    for record in metrics(run_dir(out)):
        assert np.isfinite([record["train_loss"], record["val_loss"], record["ema_loss"]]).all()
    proc = subprocess.run(args + ["--throughput", "--batch-size", "8"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=gpu_env)
    assert proc.returncode == 0 and "peak memory" in (run_dir(out) / "log_rank0.txt").read_text()


@pytest.mark.cuda
def test_gpu_training_with_cuda_graphs(work):
    """main.py end to end with the graphs: recorded in the first epoch after 3 eager steps, replayed
    through three epochs with validation in between; finite losses, and a checkpoint whose optimizer
    state keeps plain float learning rates. (That the replays follow the schedule is checked in
    tests/test_cls_units.py.)"""
    out = work / "out_gpu_graphs"
    gpu_env = {k: v for k, v in ENV.items() if k != "CUDA_VISIBLE_DEVICES"}
    args = [PY, str(APP / "main.py"), *base_args(work, out), "--amp-dtype", "bfloat16", "--opts", "AMP_ENABLE", "True",
            "TRAIN.EPOCHS", "3", "TRAIN.CUDA_GRAPHS", "True", "DATA.IMG_SIZE", "64", "DATA.BATCH_SIZE", "2"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT, env=gpu_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (run_dir(out) / "log_rank0.txt").read_text()
    assert "replayed from a CUDA graph" in log
    records = metrics(run_dir(out))
    assert len(records) == 3
    assert all(np.isfinite([r["train_loss"], r["val_loss"], r["ema_loss"]]).all() for r in records)
    ckpt = load(run_dir(out) / "last.pth")
    assert isinstance(ckpt["optimizer"]["param_groups"][0]["lr"], float)


# ---------------------------------------------------------------- official checkpoint format
def test_official_format_checkpoint_evaluates_model_and_ema(app, work):
    """The authors' layout, with a pickled yacs CfgNode and their key spelling `max_accuray_ema`."""
    import defmamba
    from yacs.config import CfgNode

    torch.manual_seed(1)
    model = defmamba.DefMamba(dims=16, depths=(1, 1, 1, 1), num_classes=3, d_state=4)
    torch.manual_seed(2)
    ema = defmamba.DefMamba(dims=16, depths=(1, 1, 1, 1), num_classes=3, d_state=4)
    official_cfg = CfgNode({"MODEL": CfgNode({"TYPE": "vssm", "NAME": "defm_tiny"}), "TRAIN": CfgNode({"EPOCHS": 300})})
    path = work / "official_tiny.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(),
                "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
                "lr_scheduler": {"t_initial": 300, "warmup_t": 20}, "max_accuracy": 80.1, "epoch": 299,
                "max_accuray_ema": 80.3, "config": official_cfg}, path)
    out = work / "out_official"
    status, _ = call(app, base_args(work, out) + ["--resume", path, "--eval"])
    assert status == 0
    result = json.loads((run_dir(out) / "eval.json").read_text())
    for key, net in (("model", model), ("model_ema", ema)):
        acc1, loss = reference_eval(net.state_dict(), work / "data")
        assert result[key]["acc1"] == pytest.approx(acc1) and result[key]["loss"] == pytest.approx(loss, rel=1e-4)
    assert result["model"]["loss"] != pytest.approx(result["model_ema"]["loss"])    # the right weights each time


# ---------------------------------------------------------------- bad input
def _broken_copy(work: Path, name: str) -> Path:
    dst = work / name
    if not dst.exists():
        shutil.copytree(work / "data", dst)
    return dst


def test_bad_inputs_fail_with_a_clear_message(app, work, reference_run, capsys, tmp_path):
    import defmamba

    out = tmp_path / "out"
    typo = tmp_path / "typo.yaml"
    typo.write_text(TINY_CFG.replace("  EPOCHS: 4", "  EPOCH: 4"))
    empty = _broken_copy(work, "data_empty_class")
    (empty / "train" / "zebra").mkdir(exist_ok=True)
    (empty / "val" / "zebra").mkdir(exist_ok=True)
    corrupt = _broken_copy(work, "data_corrupt")
    bad_jpeg = corrupt / "train" / "dog" / "dog_1.JPEG"
    bad_jpeg.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    no_val = tmp_path / "no_val"
    shutil.copytree(work / "data" / "train", no_val / "train")
    no_classes = tmp_path / "no_classes"
    (no_classes / "train").mkdir(parents=True)
    (no_classes / "val").mkdir()
    other_size = tmp_path / "small_model.pth"
    torch.save({"model": defmamba.DefMamba(dims=24, depths=(1, 1, 1, 1), num_classes=3, d_state=4).state_dict()},
               other_size)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((reference_run / "last.pth").read_bytes()[:5000])
    data = ["--data-path", work / "data"]
    cases = [
        (["--cfg", tmp_path / "missing.yaml"], "config file not found"),
        (["--cfg", typo] + data, "unknown config key TRAIN.EPOCH; did you mean TRAIN.EPOCHS"),
        (["--cfg", work / "tiny.yaml"] + data + ["--opts", "TRAIN.EPOCHS", "four"], "wrong value type"),
        (["--cfg", work / "tiny.yaml", "--data-path", tmp_path / "nowhere"], "data path not found"),
        (["--cfg", work / "tiny.yaml", "--data-path", no_val], f"split folder not found: {no_val / 'val'}"),
        (["--cfg", work / "tiny.yaml", "--data-path", no_classes], f"no class folders in {no_classes / 'val'}"),
        (["--cfg", work / "tiny.yaml", "--data-path", empty, "--opts", "MODEL.NUM_CLASSES", "4"],
         f"class folder {empty / 'train' / 'zebra'} holds no images"),
        (["--cfg", work / "tiny.yaml", "--data-path", corrupt, "--opts", "DATA.NUM_WORKERS", "1"],
         f"cannot read image {bad_jpeg}"),
        (["--cfg", work / "tiny.yaml"] + data + ["--resume", other_size, "--eval"], "does not fit DefMamba"),
        (["--cfg", work / "tiny.yaml"] + data + ["--resume", truncated, "--eval"], str(truncated)),
        (["--cfg", work / "tiny.yaml"] + data + ["--batch-size", "64"], "larger than the 12 training images"),
        (["--cfg", work / "tiny.yaml"] + data + ["--eval"], "--eval needs weights"),
        (["--cfg", work / "tiny.yaml"] + data + ["--opts", "TRAIN.CUDA_GRAPHS", "True"],
         "TRAIN.CUDA_GRAPHS replays the training step on a GPU; this run has device cpu"),
        (["--cfg", work / "tiny.yaml"] + data + ["--opts", "TRAIN.CUDA_GRAPHS", "True", "TRAIN.ACCUMULATION_STEPS", "2"],
         "set TRAIN.ACCUMULATION_STEPS 1"),
    ]
    for argv, message in cases:
        status, err = call(app, argv + ["--output", out], capsys)
        assert status == 2, (argv, err)
        assert "error: " in err and message in err, (argv, err)
        assert "Traceback" not in err, err


def test_command_line_reports_errors_with_nonzero_exit(work):
    proc = subprocess.run([PY, str(APP / "main.py"), "--cfg", str(work / "tiny.yaml"), "--opts", "TRAIN.EPOHCS", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert proc.returncode == 2
    assert "error: in --opts: unknown config key TRAIN.EPOHCS; did you mean TRAIN.EPOCHS" in proc.stderr
