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
# The checkout's library first on the path: the app runs from this tree whether or not it is installed.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
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


@pytest.fixture
def no_flops(app, monkeypatch):
    """Skip counting FLOPs at start-up (a trace of the model): tests of messages do not need them."""
    monkeypatch.setattr(app, "count_params_and_flops", lambda model, size: (sum(p.numel() for p in model.parameters()), None))


def base_args(work: Path, out: Path) -> list[str]:
    return ["--cfg", str(work / "tiny.yaml"), "--data-path", str(work / "data"), "--output", str(out)]


def run_dir(out: Path, tag: str = "default") -> Path:
    """The training run's folder; --eval and --throughput write to its eval/ and throughput/ sub-folders."""
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


KILL_AT_WRAPPER = """\
import os, signal, sys
from defmamba.train import records
from defmamba.train.utils import checkpoint as run_files

def kill_at(module, name, nth, when=lambda *args: True, before=lambda *args: None):
    \"\"\"SIGKILL this process at the nth call of module.name for which when(*args) holds.\"\"\"
    original, calls = getattr(module, name), [0]
    def wrapped(*args, **kwargs):
        if when(*args):
            calls[0] += 1
            if calls[0] == nth:
                before(*args)
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    setattr(module, name, wrapped)

def write_half(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text[: len(text) // 2])

{patch}
from defmamba.train import main
sys.exit(main.main(sys.argv[1:]))
"""
KILL_BEFORE_BEST_LINK = 'kill_at(run_files, "_atomic_copy", {nth}, when=lambda src, dst: os.path.basename(dst) == "best.pth")'
KILL_BEFORE_METRICS_APPEND = 'kill_at(records, "_append_metrics_row", {nth})'
KILL_IN_METRICS_REWRITE = ('kill_at(run_files, "atomic_write_text", {nth}, when=lambda path, text: '
                           'path.endswith("metrics.jsonl"), before=write_half)')
TIMING = "train_images_per_s"   # wall-clock speed: the only field of a record that may differ between runs


def run_killed(work: Path, out: Path, name: str, patch: str) -> subprocess.CompletedProcess:
    """Train into ``out`` in a new process that SIGKILLs itself where ``patch`` says."""
    script = work / f"{name}.py"
    script.write_text(KILL_AT_WRAPPER.format(patch=patch))
    return subprocess.run([PY, str(script), *base_args(work, out)], capture_output=True, text=True, timeout=600,
                          env=ENV)


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != TIMING} for r in records]


def best_epochs(records: list[dict]) -> list[int]:
    """The epochs at which the validation top-1 improved (those that wrote best.pth)."""
    best, epochs = 0.0, []
    for record in records:
        if record["val_acc1"] > best:
            best = record["val_acc1"]
            epochs.append(record["epoch"])
    return epochs


def assert_same_records(out: Path, ref: Path) -> None:
    """``out`` ended as ``ref``: the same checkpoint files holding the same epochs, weights, EMA,
    optimizer state and schedule, the same metrics rows, and nothing half-written."""
    assert without_timing(metrics(out)) == without_timing(metrics(ref))
    names = sorted(p.name for p in ref.glob("*.pth"))
    assert sorted(p.name for p in out.glob("*.pth")) == names
    for name in names:
        mine, theirs = load(out / name), load(ref / name)
        assert mine["epoch"] == theirs["epoch"], name
        for key in ("model", "model_ema"):
            assert mine[key].keys() == theirs[key].keys()
            assert all(torch.equal(mine[key][k], theirs[key][k]) for k in theirs[key]), f"{name} {key}"
    last, ref_last = load(out / "last.pth"), load(ref / "last.pth")
    for pid, state in ref_last["optimizer"]["state"].items():
        assert all(torch.equal(last["optimizer"]["state"][pid][k], v) for k, v in state.items()), f"optimizer {pid}"
    assert last["lr_scheduler"] == ref_last["lr_scheduler"]
    assert without_timing([last["run_records"]["metrics"]]) == without_timing([ref_last["run_records"]["metrics"]])
    assert {k: v for k, v in last["run_records"].items() if k != "metrics"} == \
        {k: v for k, v in ref_last["run_records"].items() if k != "metrics"}
    assert not list(out.glob("*.tmp"))


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
    result = json.loads((run_dir(out) / "eval" / "eval.json").read_text())
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
    result = json.loads((run_dir(out) / "eval" / "eval.json").read_text())
    acc1, loss = reference_eval(load(reference_run / "best.pth")["model"], work / "data")
    assert set(result) == {"checkpoint", "model"}
    assert result["model"]["acc1"] == pytest.approx(acc1) and result["model"]["loss"] == pytest.approx(loss, rel=1e-4)


def test_throughput_mode(app, work):
    out = work / "out_tp"
    status, _ = call(app, base_args(work, out) + ["--throughput", "--batch-size", "1"])
    assert status == 0
    log = (run_dir(out) / "throughput" / "log_rank0.txt").read_text()
    assert "throughput:" in log and "images/s (batch 1, 32²" in log
    assert not (run_dir(out) / "last.pth").exists()
    assert "THROUGHPUT_MODE: true" in (run_dir(out) / "throughput" / "config.yaml").read_text()
    assert not (run_dir(out) / "config.yaml").exists()            # a training run's config is never replaced


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


def test_compile_for_training_compiles_the_token_mixers_in_place(app, work, monkeypatch):
    """--compile in training: every block's DSSM is compiled in place (regional compilation; here with
    AOT autograd without Inductor, to stay quick), after the EMA copy was made, so the EMA keeps
    eager modules of its own; checkpoint keys are unchanged and the run trains."""
    from defmamba.models.dssm import DSSM
    from defmamba.regional_compile import compile_token_mixers

    compiled = []

    def quick_compile(model):
        compiled.append(model)
        return compile_token_mixers(model, backend="aot_eager")

    monkeypatch.setattr(app, "compile_token_mixers", quick_compile)
    real_ema, emas = app.ModelEma, []

    def recording_ema(model, decay):
        emas.append(real_ema(model, decay))
        return emas[-1]

    monkeypatch.setattr(app, "ModelEma", recording_ema)
    out = work / "out_compile"
    status, _ = call(app, base_args(work, out) + ["--compile", "--opts", "TRAIN.EPOCHS", "1"])
    assert status == 0
    (model,) = compiled
    mixers = [m for m in model.modules() if isinstance(m, DSSM)]
    assert len(mixers) == 4 and all(m._compiled_call_impl is not None for m in mixers)
    (ema,) = emas
    assert all(m._compiled_call_impl is None for m in ema.module.modules() if isinstance(m, DSSM))
    log = (run_dir(out) / "log_rank0.txt").read_text()
    assert "the token mixers (DSSM) of 4 blocks are compiled (regional compilation)" in log
    (record,) = metrics(run_dir(out))
    assert np.isfinite([record["train_loss"], record["val_loss"], record["ema_loss"]]).all()
    ckpt = load(run_dir(out) / "last.pth")
    assert set(ckpt["model"]) == set(ckpt["model_ema"]) and not any("_orig_mod" in k for k in ckpt["model"])


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
    assert all(TIMING in r for r in metrics(out)) and all(TIMING in r for r in metrics(reference_run))
    assert without_timing(metrics(out)) == without_timing(metrics(reference_run))
    assert_same_records(out, reference_run)


def test_kill_between_last_and_best_checkpoint_is_repaired_on_resume(app, work, reference_run):
    """A kill after last.pth is saved but before best.pth is linked to it leaves best.pth at an older
    best (or missing); the resumed run restores it from last.pth and ends as the uninterrupted run."""
    bests = best_epochs(metrics(reference_run))
    assert bests, "the premise: some epoch improves the validation top-1"
    nth = min(2, len(bests))                       # the second best when there is one: best.pth then exists
    killed_epoch = bests[nth - 1]
    out = work / "out_kill_best"
    proc = run_killed(work, out, "kill_before_best_link", KILL_BEFORE_BEST_LINK.format(nth=nth))
    folder = run_dir(out)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load(folder / "last.pth")["epoch"] == killed_epoch
    assert not (folder / "best.pth").exists() or load(folder / "best.pth")["epoch"] != killed_epoch
    status, _ = call(app, base_args(work, out))
    assert status == 0
    assert f"restored best.pth (epoch {killed_epoch}) from last.pth" in (folder / "log_rank0.txt").read_text()
    assert_same_records(folder, reference_run)


def test_kills_at_the_metrics_append_and_in_the_metrics_rewrite_lose_no_row(app, work, reference_run):
    """Killed before appending epoch 1's row; the next start, restoring that row, killed half-way
    through rewriting metrics.jsonl; the third start ends as the uninterrupted run, one row per epoch."""
    out = work / "out_kill_metrics"
    folder = run_dir(out)
    proc = run_killed(work, out, "kill_before_metrics_append", KILL_BEFORE_METRICS_APPEND.format(nth=2))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load(folder / "last.pth")["epoch"] == 1 and [r["epoch"] for r in metrics(folder)] == [0]
    proc = run_killed(work, out, "kill_in_metrics_rewrite", KILL_IN_METRICS_REWRITE.format(nth=1))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (folder / "metrics.jsonl.tmp").is_file()                     # the half-written replacement ...
    assert [r["epoch"] for r in metrics(folder)] == [0]                 # ... and the history, intact
    status, _ = call(app, base_args(work, out))
    assert status == 0
    assert "restored the metrics row of epoch 1 from last.pth" in (folder / "log_rank0.txt").read_text()
    assert_same_records(folder, reference_run)


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
    result = json.loads((run_dir(out) / "eval" / "eval.json").read_text())
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
    assert proc.returncode == 0 and "peak memory" in (run_dir(out) / "throughput" / "log_rank0.txt").read_text()


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


@pytest.mark.cuda
def test_gpu_training_with_graphed_training_and_accumulation(work):
    """main.py with TRAIN.GRAPHED_TRAINING: the model's forward and backward recorded once and
    replayed, two micro-batches per update, the EMA evaluated eagerly; two epochs, finite losses."""
    out = work / "out_gpu_graphed_training"
    gpu_env = {k: v for k, v in ENV.items() if k != "CUDA_VISIBLE_DEVICES"}
    args = [PY, str(APP / "main.py"), *base_args(work, out), "--amp-dtype", "bfloat16", "--opts", "AMP_ENABLE", "True",
            "TRAIN.EPOCHS", "2", "TRAIN.GRAPHED_TRAINING", "True", "TRAIN.ACCUMULATION_STEPS", "2",
            "DATA.IMG_SIZE", "64", "DATA.BATCH_SIZE", "2"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT, env=gpu_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "graphed training: the model's forward and backward are replayed" in (run_dir(out) / "log_rank0.txt").read_text()
    records = metrics(run_dir(out))
    assert len(records) == 2
    assert all(np.isfinite([r["train_loss"], r["val_loss"], r["ema_loss"]]).all() for r in records)


@pytest.mark.cuda
@pytest.mark.parametrize("amp_dtype", ["float16", "bfloat16"])
def test_gpu_training_with_compile(work, amp_dtype):
    """main.py --compile on the GPU: the token mixers compiled with Inductor (regional compilation),
    two epochs under fp16 (the default, with its GradScaler) and bf16 autocast, finite losses, and
    the run's images/s reported. fp16 once failed while Dynamo traced the deformable layer's
    depthwise conv (a traced ``.to()`` of its input)."""
    out = work / f"out_gpu_compile_{amp_dtype}"
    gpu_env = {k: v for k, v in ENV.items() if k != "CUDA_VISIBLE_DEVICES"}
    args = [PY, str(APP / "main.py"), *base_args(work, out), "--compile", "--amp-dtype", amp_dtype, "--opts",
            "AMP_ENABLE", "True", "TRAIN.EPOCHS", "2", "DATA.IMG_SIZE", "64"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=ROOT, env=gpu_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (run_dir(out) / "log_rank0.txt").read_text()
    assert "on cuda:0" in log and "(regional compilation)" in log
    records = metrics(run_dir(out))
    assert len(records) == 2
    assert all(np.isfinite([r["train_loss"], r["val_loss"], r["ema_loss"]]).all() for r in records)


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
    result = json.loads((run_dir(out) / "eval" / "eval.json").read_text())
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


def _link(path: Path, target: str) -> Path:
    if not path.is_symlink():
        path.symlink_to(target)
    return path


class RunsCode:
    """What a malicious checkpoint holds: unpickling it would run a shell command."""

    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_bad_inputs_fail_with_a_clear_message(app, work, reference_run, capsys, tmp_path, no_flops):
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
    up_link = _link(_broken_copy(work, "data_up_loop") / "train" / "cat" / "up", "..")
    self_link = _link(_broken_copy(work, "data_self_loop") / "val" / "dog" / "self", ".")
    alias = _link(_broken_copy(work, "data_alias") / "train" / "dog" / "alias", "../cat")
    float_data = _broken_copy(work, "data_float")
    float_image = float_data / "val" / "fox" / "fox_0.tif"          # sorts first: opened by the quick check
    Image.fromarray(np.zeros((40, 48), np.float32)).save(float_image)
    (float_data / "val" / "fox" / "fox_0.JPEG").unlink(missing_ok=True)
    a_file = tmp_path / "imagenet.tar"
    a_file.write_text("an archive, not a folder")
    notes = tmp_path / "notes.pth"
    notes.write_text("epoch 3: loss 0.2\n")
    malicious = tmp_path / "malicious.pth"
    torch.save({"model": {}, "payload": RunsCode()}, malicious)
    weights_only = tmp_path / "plain_weights.pth"
    torch.save(load(reference_run / "last.pth")["model"], weights_only)
    model_only = tmp_path / "model_only.pth"
    torch.save({"model": load(reference_run / "last.pth")["model"]}, model_only)
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
        (["--cfg", work / "tiny.yaml"] + data + ["--opts", "TRAIN.GRAPHED_TRAINING", "True"],
         "TRAIN.GRAPHED_TRAINING replays the model's forward and backward on a GPU; this run has device cpu"),
        # datasets that would be silently wrong
        (["--cfg", work / "tiny.yaml", "--data-path", up_link.parents[2]], f"symbolic link {up_link} points to"),
        (["--cfg", work / "tiny.yaml", "--data-path", self_link.parents[2]], f"symbolic link {self_link} points to"),
        (["--cfg", work / "tiny.yaml", "--data-path", alias.parents[2]],
         f"is reached twice, as {alias.parent.parent / 'cat'} and as {alias}"),
        (["--cfg", work / "tiny.yaml", "--data-path", float_data], f"image {float_image} has 32-bit floating-point"),
        # paths that exist but are of the wrong kind, files that are not checkpoints
        (["--cfg", work / "tiny.yaml", "--data-path", a_file], f"data path {a_file} is a file, not a folder"),
        (["--cfg", work / "tiny.yaml"] + data + ["--resume", tmp_path, "--eval"],
         f"checkpoint path {tmp_path} is a folder, not a file"),
        (["--cfg", work / "tiny.yaml"] + data + ["--resume", notes, "--eval"],
         f"{notes} is not a PyTorch checkpoint: it is a text file"),
        (["--cfg", work / "tiny.yaml"] + data + ["--resume", notes], f"{notes} is not a PyTorch checkpoint"),
        (["--cfg", work / "tiny.yaml"] + data + ["--resume", malicious, "--eval"],
         f"checkpoint {malicious} refers to the Python object posix.system"),
        (["--cfg", work / "tiny.yaml"] + data + ["--resume", weights_only],
         f"{weights_only} holds only model weights, not a training checkpoint of this application; to start "
         f"from its weights, pass it with --pretrained {weights_only}"),
        (["--cfg", work / "tiny.yaml"] + data + ["--resume", model_only],      # would restart at epoch 0
         f"{model_only} holds model weights but no training state (optimizer and epoch) to continue, not a "
         f"training checkpoint of this application; to start from its weights, pass it with --pretrained {model_only}"),
        (["--cfg", work / "tiny.yaml"] + data + ["--resume", other_size, "--eval"],
         f"checkpoint {other_size} ['model'] does not fit DefMamba"),
        # values that used to end in a traceback, or in a run that trains nothing
        (["--cfg", work / "tiny.yaml"] + data + ["--opts", "TRAIN.BASE_LR", "-0.1"], "TRAIN.BASE_LR must be positive, got -0.1"),
        (["--cfg", work / "tiny.yaml"] + data + ["--model_ema_decay", "2"],
         "MODEL_EMA_DECAY (--model_ema_decay) must be in [0, 1], got 2.0"),
        (["--cfg", work / "tiny.yaml"] + data + ["--opts", "TRAIN.START_EPOCH", "4"],
         "TRAIN.START_EPOCH (4) must be in [0, TRAIN.EPOCHS=4): a run starting at or after its last epoch trains nothing"),
    ]
    for argv, message in cases:
        status, err = call(app, argv + ["--output", out], capsys)
        assert status == 2, (argv, err)
        assert "error: " in err and message in err, (argv, err)
        assert "Traceback" not in err, err
        assert "weights_only" not in err, err       # torch's advice to load untrusted files unsafely
    assert not (run_dir(out) / "last.pth").exists() and not (run_dir(out) / "metrics.jsonl").exists()


def test_unreadable_images_stop_the_run_before_its_first_step(app, work, capsys, tmp_path, no_flops):
    """The quick check finds a bad first or last image of a class (here in val/, found only after a
    whole epoch before); DATA.VERIFY_IMAGES True finds one anywhere, in worker processes."""
    last_in_val = _broken_copy(work, "data_bad_last_val")
    bad_val = last_in_val / "val" / "fox" / "fox_1.JPEG"
    bad_val.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    middle = _broken_copy(work, "data_corrupt")              # dog_1 of dog_0..dog_3: not first or last
    bad_train = middle / "train" / "dog" / "dog_1.JPEG"
    bad_train.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    cases = [(last_in_val, [], f"cannot read image {bad_val}"),
             (middle, ["--opts", "DATA.VERIFY_IMAGES", "True", "DATA.NUM_WORKERS", "2"], f"cannot read image {bad_train}")]
    for i, (data, opts, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        status, err = call(app, ["--cfg", work / "tiny.yaml", "--data-path", data, "--output", out] + opts, capsys)
        assert status == 2 and message in err, err
        log = (run_dir(out) / "log_rank0.txt").read_text()
        assert "Train:" not in log and not (run_dir(out) / "last.pth").exists()


def test_an_output_folder_that_cannot_hold_the_run_stops_it_at_once(app, work, capsys, monkeypatch, tmp_path,
                                                                   no_flops):
    import collections
    import errno

    data = ["--cfg", work / "tiny.yaml", "--data-path", work / "data"]
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    status, err = call(app, data + ["--output", a_file], capsys)
    assert status == 2 and f"error: cannot create output folder {a_file / 'tiny' / 'default'}: " in err, err
    if Path("/sys").is_dir():               # sysfs: no process, root included, may create folders there
        status, err = call(app, data + ["--output", "/sys/defmamba_out"], capsys)
        assert status == 2 and "error: cannot create output folder /sys/defmamba_out/tiny/default: " in err, err
    real_fsync = os.fsync

    def disk_full_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full_fsync)                # as NFS reports a full disk
    status, err = call(app, data + ["--output", tmp_path / "out_full"], capsys)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert status == 2 and f"error: cannot write in output folder {run_dir(tmp_path / 'out_full')}: the disk is full" in err
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 12, 10 ** 12, 2 ** 20))
    out = tmp_path / "out_small"
    status, err = call(app, data + ["--output", out], capsys)
    assert status == 2 and f"error: not enough free space for checkpoints in {run_dir(out)}: 1.0 MiB free" in err
    assert "Train:" not in (run_dir(out) / "log_rank0.txt").read_text()
    assert not (run_dir(out) / "config.yaml").exists()


def test_a_save_failing_mid_run_stops_with_the_reason_and_keeps_the_last_checkpoint(app, work, capsys, monkeypatch,
                                                                                   tmp_path):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    real_save, calls, full = torch.save, [0], [False]

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:                      # epoch 1's last.pth: as torch reports a full disk
            full[0] = True
            f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 8768 vs 8656")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 12, 0, 4096 if full[0] else 10 ** 11))
    out = tmp_path / "out"
    status, err = call(app, base_args(work, out) + ["--opts", "TRAIN.EPOCHS", "2", "TRAIN.WARMUP_EPOCHS", "0"], capsys)
    monkeypatch.undo()
    last = run_dir(out) / "last.pth"
    assert status == 2, err
    assert f"error: could not write {last}: the disk is full (4.0 KiB free in {run_dir(out)}, about " in err
    assert f"{last} (epoch 0) is complete and intact" in err and "start the same command again" in err
    assert load(last)["epoch"] == 0 and not list(run_dir(out).glob("*.tmp"))
    assert [r["epoch"] for r in metrics(run_dir(out))] == [0]


HOLD_LOCK = ("import sys; from defmamba.train.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
             "print('locked', flush=True); sys.stdin.read()")


def test_one_run_per_output_folder(app, work, capsys, tmp_path, no_flops):
    """A run started while another holds the folder stops at once, naming it; once that process
    is gone (killed, its lock file left behind), the next run takes the lock over and says so."""
    out = tmp_path / "out"
    folder = run_dir(out)
    folder.mkdir(parents=True)
    (folder / "last.pth.tmp").write_bytes(b"the holder's checkpoint being written")
    holder = subprocess.Popen([PY, "-c", HOLD_LOCK, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=ENV)
    argv = base_args(work, out) + ["--opts", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0"]
    try:
        assert holder.stdout.readline().strip() == "locked"
        status, err = call(app, argv, capsys)
        assert status == 2, err
        assert (f"error: output folder {folder} is in use by another run (process {holder.pid} on host "
                f"{socket.gethostname()}, started ") in err and "--tag NAME" in err
        assert sorted(p.name for p in folder.iterdir()) == ["last.pth.tmp", "run.lock"]   # nothing touched
    finally:
        holder.kill()
        holder.wait()
    status, _ = call(app, argv)
    assert status == 0
    log = (folder / "log_rank0.txt").read_text()
    assert (f"took over the lock of {folder} from process {holder.pid} on host {socket.gethostname()}" in log
            and "which is no longer running" in log)
    assert not (folder / "run.lock").exists() and not (folder / "last.pth.tmp").exists()


def test_a_finished_run_folder_is_never_reused_for_another_experiment(app, work, reference_run, capsys, tmp_path,
                                                                     no_flops):
    out = tmp_path / "out"
    folder = run_dir(out)
    shutil.copytree(reference_run, folder)

    def contents() -> dict:
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "log_rank0.txt"}

    before = contents()
    status, err = call(app, base_args(work, out) + ["--opts", "TRAIN.BASE_LR", "0.01"], capsys)
    assert status == 2, err
    assert (f"error: {folder} holds a run with other settings (its checkpoint {folder / 'last.pth'}, epoch 3)" in err
            and "TRAIN.BASE_LR: 0.02 in the checkpoint, 0.01 now" in err
            and "--tag NEW_TAG" in err and "--opts TRAIN.AUTO_RESUME False" in err)
    other_data = _broken_copy(work, "data_elsewhere")
    status, err = call(app, ["--cfg", work / "tiny.yaml", "--data-path", other_data, "--output", out], capsys)
    assert status == 2 and f"DATA.DATA_PATH: '{work / 'data'}' in the checkpoint, '{other_data}' now" in err
    # the same experiment, run differently (PRINT_FREQ, workers): finished, nothing to train
    status, _ = call(app, base_args(work, out) + ["--opts", "PRINT_FREQ", "5", "DATA.NUM_WORKERS", "1"])
    assert status == 0
    best = load(folder / "last.pth")["max_accuracy"]
    assert (f"this run is already finished: {folder / 'last.pth'} holds epoch 3, the last of TRAIN.EPOCHS 4; "
            f"best top-1 {best:.3f}%") in (folder / "log_rank0.txt").read_text()
    # evaluation writes to its own folder
    status, _ = call(app, base_args(work, out) + ["--eval"])
    assert status == 0
    assert contents() == before                        # config.yaml, checkpoints and metrics untouched
    assert "EVAL_MODE: true" in (folder / "eval" / "config.yaml").read_text()
    assert json.loads((folder / "eval" / "eval.json").read_text())["checkpoint"] == str(folder / "last.pth")


def test_command_line_reports_errors_with_nonzero_exit(work):
    proc = subprocess.run([PY, str(APP / "main.py"), "--cfg", str(work / "tiny.yaml"), "--opts", "TRAIN.EPOHCS", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert proc.returncode == 2
    assert "error: in --opts: unknown config key TRAIN.EPOHCS; did you mean TRAIN.EPOCHS" in proc.stderr
