"""Unit tests of the classification application's parts (config, schedule, optimizer groups,
EMA, checkpoint files, digits split, throughput measurement). CPU, a few seconds."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from graph_helpers import assert_trained_alike, assert_trained_identically, run_steps
from torch import nn

from defmamba.train import config as app_config
from defmamba.train import engine as app_engine
from defmamba.train import main as app_main
from defmamba.train import modeling
from defmamba.train import train_step as app_train_step
from defmamba.train.data import digits, synthetic
from defmamba.train.utils import checkpoint as run_checkpoint
from defmamba.train.utils import ema as app_ema
from defmamba.train.utils import lr_scheduler
from defmamba.train.utils import optimizer as optimizer_groups

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- config
PAPER_VARIANTS = {"tiny": (48, [2, 2, 5, 2], 0.2), "small": (96, [2, 2, 6, 2], 0.2), "base": (96, [2, 3, 16, 2], 0.4)}


@pytest.fixture(scope="module")
def paper_models() -> dict:
    """(config, model) of defmamba_{tiny,small,base}_224.yaml, built once for the tests below."""
    built = {}
    for name in PAPER_VARIANTS:
        cfg = app_config.get_config(cfg_file=str(ROOT / f"configs/classification/defmamba_{name}_224.yaml"))
        built[name] = (cfg, modeling.build_model(cfg))
    return built


def test_config_files_load_with_the_paper_recipe(paper_models):
    for name, (dims, depths, dpr) in PAPER_VARIANTS.items():
        cfg, model = paper_models[name]
        assert cfg.MODEL.ARCH == f"defmamba_{name}" and cfg.MODEL.NAME == f"defmamba_{name}_224"
        last_block = model.layers[-1].blocks[-1]
        assert (model.dims[0], list(model.depths), last_block.drop_path.drop_prob) == (dims, depths, pytest.approx(dpr))
        assert (last_block.op.A_logs.shape[-1], last_block.mlp.fc1.out_features) == (16, 4 * model.dims[-1])
        assert (cfg.TRAIN.EPOCHS, cfg.TRAIN.WARMUP_EPOCHS, cfg.TRAIN.BASE_LR) == (300, 20, 5e-4)
        assert (cfg.TRAIN.WARMUP_LR, cfg.TRAIN.MIN_LR, cfg.TRAIN.WEIGHT_DECAY, cfg.TRAIN.CLIP_GRAD) == (5e-7, 5e-6, 0.05, 5.0)
        assert (cfg.AUG.MIXUP, cfg.AUG.CUTMIX, cfg.AUG.REPROB, cfg.AUG.AUTO_AUGMENT) == (0.8, 1.0, 0.25, "rand-m9-mstd0.5-inc1")
        assert (cfg.MODEL.LABEL_SMOOTHING, cfg.MODEL_EMA_DECAY, cfg.DATA.IMG_SIZE, cfg.TEST.CROP_PCT) == (0.1, 0.9999, 224, 0.875)
        assert cfg.DATA.INTERPOLATION == "bicubic" and cfg.TRAIN.OPTIMIZER.NAME == "adamw"
        assert not cfg.TRAIN.NO_DECAY_SSM_PARAMS


def test_variant_files_name_the_architecture_and_inherit_the_recipe():
    """Each variant file holds its names and the base file; widths, depths and the recipe live elsewhere."""
    import yaml

    for name in PAPER_VARIANTS:
        raw = yaml.safe_load((ROOT / f"configs/classification/defmamba_{name}_224.yaml").read_text())
        assert raw == {"BASE": ["_base_imagenet.yaml"],
                       "MODEL": {"NAME": f"defmamba_{name}_224", "ARCH": f"defmamba_{name}"}}


def test_custom_architecture_overrides_the_named_variant():
    cfg = app_config.get_config(opts=["MODEL.ARCH", "defmamba_small", "MODEL.DEFMAMBA.DIMS", "16",
                                      "MODEL.DEFMAMBA.DEPTHS", "[1, 1, 2, 1]", "MODEL.DEFMAMBA.D_STATE", "4",
                                      "MODEL.DEFMAMBA.MLP_RATIO", "2.0", "MODEL.DROP_PATH_RATE", "0.3",
                                      "MODEL.NUM_CLASSES", "7"])
    model = modeling.build_model(cfg)
    assert (model.dims, model.depths, model.num_classes) == ([16, 32, 64, 128], (1, 1, 2, 1), 7)
    block = model.layers[-1].blocks[-1]
    assert (block.op.A_logs.shape[-1], block.mlp.fc1.out_features, block.drop_path.drop_prob) == (4, 256, pytest.approx(0.3))
    with pytest.raises(app_config.ConfigError, match="MODEL.ARCH = 'defmamba_huge' is not one of"):
        app_config.get_config(opts=["MODEL.ARCH", "defmamba_huge"])
    with pytest.raises(app_config.ConfigError, match="MODEL.DEFMAMBA.DEPTHS must be a list of 4 stage depths"):
        app_config.get_config(opts=["MODEL.DEFMAMBA.DEPTHS", "[2, 2]"])
    with pytest.raises(app_config.ConfigError, match=r"MODEL.DROP_PATH_RATE must be a number in \[0, 1\)"):
        app_config.get_config(opts=["MODEL.DROP_PATH_RATE", "1.5"])


def test_config_rejects_unknown_keys_wrong_types_and_bad_values(tmp_path):
    cfgmod = app_config
    with pytest.raises(cfgmod.ConfigError, match="unknown config key TRAIN.EPOCH; did you mean TRAIN.EPOCHS"):
        cfgmod.get_config(opts=["TRAIN.EPOCH", "3"])
    with pytest.raises(cfgmod.ConfigError, match="wrong value type.*TRAIN.EPOCHS"):
        cfgmod.get_config(opts=["TRAIN.EPOCHS", "ten"])
    with pytest.raises(cfgmod.ConfigError, match="DATA.DATASET = 'cifar' is not one of"):
        cfgmod.get_config(opts=["DATA.DATASET", "cifar"])
    with pytest.raises(cfgmod.ConfigError, match="KEY VALUE pairs"):
        cfgmod.get_config(opts=["SEED"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  DEFMAMBA:\n    DIM: 48\n")
    with pytest.raises(cfgmod.ConfigError, match=r"bad.yaml: unknown config key MODEL.DEFMAMBA.DIM; did you mean MODEL.DEFMAMBA.DIMS"):
        cfgmod.get_config(cfg_file=str(bad))
    with pytest.raises(cfgmod.ConfigError, match="config file not found: .*nope.yaml"):
        cfgmod.get_config(cfg_file=str(tmp_path / "nope.yaml"))
    for opts, message in ([["TRAIN.BASE_LR", "-5e-4"], "TRAIN.BASE_LR must be positive, got -0.0005"],
                          [["MODEL_EMA_DECAY", "1.5"], r"MODEL_EMA_DECAY \(--model_ema_decay\) must be in \[0, 1\]"],
                          [["TRAIN.EPOCHS", "10", "TRAIN.START_EPOCH", "10"], "TRAIN.START_EPOCH \\(10\\) must be in"],
                          [["DATA.NUM_WORKERS", "-1"], "DATA.NUM_WORKERS must be at least 0, got -1"],
                          [["TRAIN.GRAPHED_TRAINING", "True", "TRAIN.CUDA_GRAPHS", "True"],
                           r"TRAIN.GRAPHED_TRAINING cannot be combined with TRAIN.CUDA_GRAPHS \(the whole step"],
                          [["TRAIN.GRAPHED_TRAINING", "True", "COMPILE", "True"],
                           "TRAIN.GRAPHED_TRAINING cannot be combined with --compile; choose one"],
                          [["TRAIN.GRAPHED_TRAINING", "True", "TRAIN.USE_CHECKPOINT", "True"],
                           "TRAIN.GRAPHED_TRAINING cannot be combined with TRAIN.USE_CHECKPOINT"]):
        with pytest.raises(cfgmod.ConfigError, match=message):
            cfgmod.get_config(opts=opts)


def test_config_inheritance_and_integer_for_float(tmp_path):
    cfgmod = app_config
    (tmp_path / "base.yaml").write_text("TRAIN:\n  EPOCHS: 7\n  WARMUP_EPOCHS: 1\n  WEIGHT_DECAY: 0\n")
    (tmp_path / "child.yaml").write_text("BASE: ['base.yaml']\nTRAIN:\n  BASE_LR: 1\n")
    cfg = cfgmod.get_config(cfg_file=str(tmp_path / "child.yaml"), opts=["TRAIN.MIN_LR", "0"])
    assert cfg.TRAIN.EPOCHS == 7 and cfg.TRAIN.WEIGHT_DECAY == 0.0 and cfg.TRAIN.BASE_LR == 1.0
    assert isinstance(cfg.TRAIN.MIN_LR, float) and cfg.TRAIN.MIN_LR == 0.0


def test_command_line_flags_map_onto_the_config():
    main = app_main
    args = main.parse_args(["--batch-size", "3", "--data-path", "/d", "--accumulation-steps", "2", "--use-checkpoint",
                            "--disable_amp", "--amp-dtype", "bfloat16", "--output", "/o", "--tag", "t", "--eval",
                            "--model_ema", "false", "--model_ema_decay", "0.5", "--seed", "9", "--local-rank", "1",
                            "--opts", "TRAIN.EPOCHS", "2", "TRAIN.WARMUP_EPOCHS", "1"])
    cfg = app_config.get_config(args)
    assert (cfg.DATA.BATCH_SIZE, cfg.DATA.DATA_PATH, cfg.TRAIN.ACCUMULATION_STEPS) == (3, "/d", 2)
    assert cfg.TRAIN.USE_CHECKPOINT and not cfg.AMP_ENABLE and cfg.AMP_DTYPE == "bfloat16" and cfg.EVAL_MODE
    assert (cfg.OUTPUT, cfg.TAG, cfg.MODEL_EMA, cfg.MODEL_EMA_DECAY, cfg.SEED, cfg.TRAIN.EPOCHS) == ("/o", "t", False, 0.5, 9, 2)
    assert main.parse_args(["--local_rank=3"]).local_rank == 3
    assert main.parse_args(["--model_ema"]).model_ema is True


# ---------------------------------------------------------------- schedule, optimizer, loss, EMA
def test_lr_schedule_is_the_closed_form_warmup_and_cosine():
    """300 epochs with 20 of warm-up at global batch 1024: the learning rate of step t is
    warm-up linear from WARMUP_LR to BASE_LR, then a cosine down to MIN_LR, all × 1024/512."""
    import math

    cfg = app_config.get_config(cfg_file=str(ROOT / "configs/classification/defmamba_small_224.yaml"))
    steps_per_epoch, scale = 1251, 1024 / 512
    base, warmup_lr, min_lr = (scale * v for v in (cfg.TRAIN.BASE_LR, cfg.TRAIN.WARMUP_LR, cfg.TRAIN.MIN_LR))
    warmup, total = 20 * steps_per_epoch, 300 * steps_per_epoch

    def closed_form(t: int) -> float:
        if t < warmup:
            return warmup_lr + (base - warmup_lr) * t / warmup
        return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))

    lrs = lr_scheduler.scaled_learning_rates(cfg, global_batch=1024)
    assert (lrs.base, lrs.warmup, lrs.min) == pytest.approx((base, warmup_lr, min_lr), rel=1e-15)
    model = nn.Linear(3, 2)
    opt = optimizer_groups.build_optimizer(cfg, model, lrs.base)
    sched = lr_scheduler.build_scheduler(cfg, opt, steps_per_epoch, lrs)
    steps = [0, 1, 617, warmup - 1, warmup, warmup + 1, (warmup + total) // 2, total - 2 * steps_per_epoch + 5,
             total - 1, total, total + 7]
    for t in steps:
        sched.step_update(t)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([closed_form(min(t, total))] * 2, rel=1e-12), t
    assert closed_form(warmup) == pytest.approx(base) and closed_form(total) == pytest.approx(min_lr)
    with pytest.raises(ValueError, match="is not the scheduled peak"):
        lr_scheduler.build_scheduler(cfg, optimizer_groups.build_optimizer(cfg, model, 3e-3), steps_per_epoch, lrs)


def test_step_schedule_decays_from_step_zero_after_the_warmup():
    cfg = app_config.get_config(opts=["TRAIN.LR_SCHEDULER.NAME", "step", "TRAIN.WARMUP_EPOCHS", "2",
                                      "TRAIN.LR_SCHEDULER.DECAY_EPOCHS", "3", "TRAIN.LR_SCHEDULER.DECAY_RATE", "0.5"])
    lrs = lr_scheduler.scaled_learning_rates(cfg, global_batch=512)
    opt = optimizer_groups.build_optimizer(cfg, nn.Linear(3, 2), lrs.base)
    sched = lr_scheduler.build_scheduler(cfg, opt, steps_per_epoch=10, lrs=lrs)
    for t, expected in ((0, lrs.warmup), (10, (lrs.warmup + lrs.base) / 2), (20, lrs.base), (29, lrs.base),
                        (30, lrs.base / 2), (65, lrs.base / 4), (90, lrs.base / 8)):
        sched.step_update(t)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12), t


def _groups_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[float, list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups}


def test_optimizer_groups_are_the_authors(paper_models):
    """The decay / no-decay names of T, S and B equal those of the authors' code (tests/fixtures)."""
    import json

    reference = json.loads((ROOT / "tests/fixtures/recipe_param_groups.json").read_text())["classification"]
    for name in PAPER_VARIANTS:
        cfg, model = paper_models[name]
        groups = _groups_by_name(model, optimizer_groups.build_optimizer(cfg, model, lr=1e-3))
        assert groups == {0.05: reference[name]["decay"], 0.0: reference[name]["no_decay"]}, name


def test_no_decay_ssm_params_option_also_exempts_the_ssm_parameters(paper_models):
    import json

    reference = json.loads((ROOT / "tests/fixtures/recipe_param_groups.json").read_text())["classification"]["small"]
    cfg, model = paper_models["small"]
    cfg = cfg.clone()
    cfg.defrost()
    cfg.TRAIN.NO_DECAY_SSM_PARAMS = True
    groups = _groups_by_name(model, optimizer_groups.build_optimizer(cfg, model, lr=1e-3))
    moved = sorted(set(reference["decay"]) - set(groups[0.05]))
    assert groups[0.0] == sorted(reference["no_decay"] + moved)
    assert {n.rsplit(".", 1)[-1] for n in moved} == {"A_logs", "dt_projs_bias", "rpe_table"}
    assert len(moved) == 3 * sum(model.depths)
    params = dict(model.named_parameters())
    assert sum(params[n].numel() for n in moved) == 441_600     # DefMamba-S


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_adamw_is_fused_on_the_gpu_only(device):
    config = app_config.get_config()
    optimizer = optimizer_groups.build_optimizer(config, nn.Linear(3, 2).to(device), lr=2e-4)
    assert optimizer.defaults["fused"] is (True if device == "cuda" else None)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [config.TRAIN.WEIGHT_DECAY, 0.0]
    assert [g["lr"] for g in optimizer.param_groups] == [2e-4, 2e-4]


def test_training_loss_is_soft_target_with_mixup_and_label_smoothing_without():
    """The recipe mixes labels (Mixup 0.8, CutMix 1.0), so it trains with soft-target cross-entropy
    on the mixed, smoothed targets; with Mixup and CutMix off the targets are class indices and the
    loss is label-smoothing cross-entropy, or plain cross-entropy without smoothing."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from defmamba.train.data.build import build_mixup

    torch.manual_seed(0)
    logits, targets = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 3, 1, 4, 2, 3])
    log_p = logits.log_softmax(-1)
    recipe = app_config.get_config(cfg_file=str(ROOT / "configs/classification/defmamba_tiny_224.yaml"))
    mixup = build_mixup(recipe, 5)
    criterion = app_main.build_criterion(recipe, mixup_active=mixup is not None)
    assert isinstance(criterion, SoftTargetCrossEntropy)
    soft = torch.softmax(torch.randn(6, 5, dtype=torch.float64), -1)
    assert criterion(logits, soft).item() == pytest.approx(-(soft * log_p).sum(-1).mean().item(), rel=1e-12)
    cutmix_only = app_config.get_config(opts=["AUG.MIXUP", "0.0"])
    assert isinstance(app_main.build_criterion(cutmix_only, build_mixup(cutmix_only, 5) is not None),
                      SoftTargetCrossEntropy)

    plain = app_config.get_config(opts=["AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0"])
    assert build_mixup(plain, 5) is None
    criterion = app_main.build_criterion(plain, mixup_active=False)
    assert isinstance(criterion, LabelSmoothingCrossEntropy)
    eps = plain.MODEL.LABEL_SMOOTHING
    expected = ((1 - eps) * -log_p.gather(1, targets[:, None])[:, 0] - eps * log_p.mean(-1)).mean()
    assert criterion(logits, targets).item() == pytest.approx(expected.item(), rel=1e-12)
    no_smoothing = app_config.get_config(opts=["AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0", "MODEL.LABEL_SMOOTHING", "0.0"])
    assert type(app_main.build_criterion(no_smoothing, mixup_active=False)) is nn.CrossEntropyLoss


def test_ema_update_is_the_exponential_average():
    model = nn.Linear(3, 2)
    ema = app_ema.ModelEma(model, decay=0.75)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    expected = 0.75 * before["weight"] + 0.25 * model.weight
    torch.testing.assert_close(ema.state_dict()["weight"], expected)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_averages_float_state_copies_integer_buffers_and_follows_moved_tensors():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight  # one tensor under two names: averaged once
            self.norm = nn.BatchNorm1d(4)
            self.register_buffer("scratch", torch.zeros(3), persistent=False)

    torch.manual_seed(0)
    model = Tied()
    ema = app_ema.ModelEma(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.norm.running_mean = torch.randn(4)  # a new buffer object, as .to() makes
    model.norm.num_batches_tracked.fill_(7)
    model.scratch.fill_(5.0)
    ema.update(model)
    current, after = model.state_dict(), ema.state_dict()
    for key, value in current.items():
        if value.is_floating_point():
            torch.testing.assert_close(after[key], 0.9 * before[key] + 0.1 * value, rtol=1e-6, atol=1e-6,
                                       msg=lambda m, key=key: f"{key}: {m}")
    assert after["norm.num_batches_tracked"].item() == 7
    assert ema.module.scratch.abs().sum() == 0  # not state: left alone
    with pytest.raises(ValueError, match="build ModelEma from this model"):
        ema.update(nn.Linear(4, 4))


# ---------------------------------------------------------------- training loop
class _ScriptedLoss(nn.Module):
    """A linear model whose loss at given iterations is replaced by a chosen value."""

    def __init__(self, replace: dict[int, float]):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.replace, self.calls, self.seen = replace, 0, []

    def forward(self, outputs, targets):
        loss = nn.functional.cross_entropy(outputs, targets)
        if self.calls in self.replace:
            loss = loss * 0 + self.replace[self.calls]
        self.seen.append(loss.item())
        self.calls += 1
        return loss


class _NoSchedule:
    def step_update(self, step: int) -> None:
        pass


def _run_epoch(replace: dict[int, float], batches: int = 12, print_freq: int = 10):
    import logging

    config = app_config.get_config(opts=["PRINT_FREQ", str(print_freq), "DATA.BATCH_SIZE", "4"])
    engine = app_engine
    torch.manual_seed(0)
    model, criterion = nn.Linear(3, 2), _ScriptedLoss(replace)
    loader = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(batches)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = app_train_step.TrainStep(model, criterion, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                       engine.AmpSettings(False, torch.float32), clip_grad=1.0)
    stats = engine.train_one_epoch(config, step, loader, 0, None, _NoSchedule(), torch.device("cpu"),
                                   logging.getLogger("test"))
    return stats, criterion.seen


def test_training_loop_reads_losses_back_in_batches_and_keeps_their_mean():
    stats, seen = _run_epoch({})
    assert len(seen) == 12
    assert stats["loss"] == pytest.approx(sum(seen) / len(seen), rel=1e-6)
    assert stats["grad_norm"] > 0 and stats["images_per_s"] > 0


def test_a_non_finite_loss_stops_training_naming_its_iteration():
    # Iteration 3 is read back at the check after iteration 9 (PRINT_FREQ 10): the error still
    # names iteration 3, not the iteration where it was noticed.
    with pytest.raises(FloatingPointError, match="training loss is nan at epoch 0 iteration 3; lower TRAIN.BASE_LR"):
        _run_epoch({3: float("nan")})
    with pytest.raises(FloatingPointError, match="loss is inf at epoch 0 iteration 11"):
        _run_epoch({11: float("inf")})


def _assert_same_training(device: str, amp_dtype, eager: tuple, graphed: tuple, max_step_change: float) -> None:
    """Eager and graphed (losses, gradient norms, model, EMA) of the same steps: equal bit for bit on
    the CPU (emulated graphs); on the GPU within atomic-order noise of the sampling backward
    (measured: one of 2592 entries 1.1e-4 apart)."""
    (eager_losses, eager_norms, eager_model, eager_ema), (losses, norms, model, ema) = eager, graphed
    if device == "cpu":
        assert (losses, norms) == (eager_losses, eager_norms)
        assert_trained_identically(eager_model.state_dict().items(), model.state_dict().values())
        assert_trained_identically(eager_ema.state_dict().items(), ema.state_dict().values())
        return
    tol = 1e-4 if amp_dtype is None else 3e-3
    assert losses == pytest.approx(eager_losses, rel=tol)
    assert norms == pytest.approx(eager_norms, rel=tol)
    assert_trained_alike(eager_model.state_dict().items(), model.state_dict().values(), max_step_change=max_step_change)
    assert_trained_alike(eager_ema.state_dict().items(), ema.state_dict().values(), max_step_change=max_step_change)


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16, torch.float16])
def test_train_step_with_graphed_training_follows_the_eager_steps(graph_device, amp_dtype):
    """TRAIN.GRAPHED_TRAINING's step: the model's forward and backward replayed inside the eager
    TrainStep, with two micro-batches per update (accumulation), clipping, the GradScaler and an
    EMA: the losses, gradient norms, weights and EMA of the eager steps (on the CPU, with emulated
    graphs, bit for bit)."""
    import copy

    import defmamba

    ts, engine, ema_module = app_train_step, app_engine, app_ema
    torch.manual_seed(0)
    model = defmamba.DefMamba(dims=32, depths=(1, 1, 1, 1), num_classes=5, drop_path_rate=0.0).to(graph_device)
    twin = copy.deepcopy(model)
    twin.set_graphed_training()
    amp = engine.AmpSettings(amp_dtype is not None, amp_dtype or torch.float32)
    batches = [(torch.randn(2, 3, 64, 96, device=graph_device), torch.randint(0, 5, (2,), device=graph_device))
               for _ in range(8)]

    def train(net):
        optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, fused=True)
        scaler = torch.amp.GradScaler(graph_device, enabled=amp_dtype == torch.float16)
        ema = ema_module.ModelEma(net, 0.8)
        step = ts.TrainStep(net, nn.CrossEntropyLoss(), optimizer, scaler, amp, clip_grad=1.0, accumulation=2,
                            model_ema=ema)
        losses, norms = [], []
        for i, (images, targets) in enumerate(batches):
            loss, norm = step(images, targets, update=i % 2 == 1)
            losses.append(loss.item())
            norms += [norm.item()] if norm is not None else []
        return losses, norms, ema

    eager_losses, eager_norms, eager_ema = train(model)
    graphed_losses, graphed_norms, graphed_ema = train(twin)
    assert twin.__dict__["_graphed_training"].signatures == 1
    _assert_same_training(graph_device, amp_dtype, (eager_losses, eager_norms, model, eager_ema),
                          (graphed_losses, graphed_norms, twin, graphed_ema), max_step_change=3 * 2e-3)


def test_cuda_graph_train_step_refuses_what_it_cannot_replay():
    ts, engine = app_train_step, app_engine
    model = nn.Linear(3, 2)
    amp = engine.AmpSettings(False, torch.float32)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    plain = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="capturable=True"):
        ts.CudaGraphTrainStep(ts.TrainStep(model, nn.CrossEntropyLoss(), plain, scaler, amp))
    capturable = torch.optim.AdamW(model.parameters(), capturable=True)
    with pytest.raises(ValueError, match="TRAIN.ACCUMULATION_STEPS 1"):
        ts.CudaGraphTrainStep(ts.TrainStep(model, nn.CrossEntropyLoss(), capturable, scaler, amp, accumulation=2))
    graphed = ts.CudaGraphTrainStep(ts.TrainStep(model, nn.CrossEntropyLoss(), capturable, scaler, amp))
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors"):
        graphed(torch.randn(2, 3), torch.tensor([0, 1]))


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16, torch.float16])
def test_cuda_graph_train_step_follows_the_eager_steps(graph_device, amp_dtype):
    """Seven steps with a new batch and a new learning rate each: 3 eager warm-up steps, then the
    recording and 4 replays give the losses, gradient norms, weights and EMA of 7 eager steps (on
    the CPU, with emulated graphs, bit for bit)."""
    import copy

    import defmamba

    ts, engine, ema_module = app_train_step, app_engine, app_ema
    torch.manual_seed(0)
    model = defmamba.DefMamba(dims=32, depths=(1, 1, 1, 1), num_classes=5, drop_path_rate=0.0).to(graph_device)
    twin = copy.deepcopy(model)
    amp = engine.AmpSettings(amp_dtype is not None, amp_dtype or torch.float32)
    batches = [(torch.randn(2, 3, 64, 96, device=graph_device), torch.randint(0, 5, (2,), device=graph_device))
               for _ in range(7)]
    # float32 values: the recorded AdamW reads each from a float32 tensor, the eager one as a float
    lrs = [torch.tensor(2e-3 * 0.6 ** i).item() for i in range(7)]

    def train(net, graphed):
        optimizer = torch.optim.AdamW(net.parameters(), lr=lrs[0], fused=True, capturable=True)
        scaler = torch.amp.GradScaler(graph_device, enabled=amp_dtype == torch.float16)
        ema = ema_module.ModelEma(net, 0.8)
        step = ts.TrainStep(net, nn.CrossEntropyLoss(), optimizer, scaler, amp, clip_grad=1.0, model_ema=ema)
        if graphed:
            step = ts.CudaGraphTrainStep(step, warmup=3)
        losses, norms = run_steps(step, optimizer, batches, lrs)
        if graphed and graph_device == "cpu":
            assert step.graph.replays == len(batches) - 3
        return losses, norms, ema

    eager_losses, eager_norms, eager_ema = train(model, graphed=False)
    graphed_losses, graphed_norms, graphed_ema = train(twin, graphed=True)
    _assert_same_training(graph_device, amp_dtype, (eager_losses, eager_norms, model, eager_ema),
                          (graphed_losses, graphed_norms, twin, graphed_ema), max_step_change=3 * lrs[0])


def test_cuda_graph_train_step_skips_an_overflowing_fp16_step_as_eager_does(graph_device):
    """fp16: a batch that overflows in a replayed step makes the recorded GradScaler skip the update
    and halve the scale, on the device and without the host, exactly as the eager step does; the
    steps after it train normally with the halved scale."""
    import copy

    import defmamba

    ts, engine, ema_module = app_train_step, app_engine, app_ema
    torch.manual_seed(0)
    model = defmamba.DefMamba(dims=32, depths=(1, 1, 1, 1), num_classes=5, drop_path_rate=0.0).to(graph_device)
    twin = copy.deepcopy(model)
    amp = engine.AmpSettings(True, torch.float16)
    batches = [(torch.randn(2, 3, 64, 96, device=graph_device), torch.randint(0, 5, (2,), device=graph_device))
               for _ in range(8)]
    overflow_at = 5  # after the 3 eager steps and the recording: a replay
    batches[overflow_at] = (batches[overflow_at][0] * 1e6, batches[overflow_at][1])  # inf in fp16

    def train(net, graphed):
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True, capturable=True)
        # a scale far below fp16's overflow for these gradients: only the scaled batch overflows
        scaler = torch.amp.GradScaler(graph_device, init_scale=2.0 ** 8)
        step = ts.TrainStep(net, nn.CrossEntropyLoss(), optimizer, scaler, amp, clip_grad=1.0,
                            model_ema=ema_module.ModelEma(net, 0.8))
        if graphed:
            step = ts.CudaGraphTrainStep(step, warmup=3)
        scales, weights = [], []
        for images, targets in batches:
            step(images, targets)
            scales.append(scaler.get_scale())
            weights.append(net.classifier.head.weight.detach().clone())
        return scales, weights

    eager_scales, eager_weights = train(model, graphed=False)
    graphed_scales, graphed_weights = train(twin, graphed=True)
    # the premise: eager skipped exactly that step and halved the scale, and trained on after it
    assert eager_scales == [2.0 ** 8] * overflow_at + [2.0 ** 7] * (len(batches) - overflow_at), eager_scales
    assert torch.equal(eager_weights[overflow_at], eager_weights[overflow_at - 1])
    assert not torch.equal(eager_weights[-1], eager_weights[overflow_at])
    assert graphed_scales == eager_scales
    assert torch.equal(graphed_weights[overflow_at], graphed_weights[overflow_at - 1])
    for a, b in zip(eager_weights, graphed_weights):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
    assert all(torch.isfinite(w).all() for w in graphed_weights)


# ---------------------------------------------------------------- checkpoint files
def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    ck = run_checkpoint
    path = str(tmp_path / "last.pth")
    ck.atomic_save({"epoch": 1}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert ck.remove_stale_temporaries(str(tmp_path)) == [path + ".tmp"]


def test_checkpoint_retention_and_resume_lookup(tmp_path):
    ck = run_checkpoint
    out = str(tmp_path)
    assert ck.find_resume_checkpoint(out) is None
    for epoch in range(5):
        written = ck.save_checkpoint(out, {"epoch": epoch}, epoch, epoch_file=epoch % 2 == 0, keep=2,
                                     is_best=epoch == 1, is_best_ema=epoch == 3)
        assert os.path.join(out, "last.pth") in written
    assert [e for e, _ in ck.epoch_checkpoints(out)] == [2, 4]
    assert torch.load(os.path.join(out, "best.pth"), weights_only=True)["epoch"] == 1
    assert torch.load(os.path.join(out, "best_ema.pth"), weights_only=True)["epoch"] == 3
    assert ck.find_resume_checkpoint(out) == os.path.join(out, "last.pth")
    os.remove(os.path.join(out, "last.pth"))
    assert ck.find_resume_checkpoint(out) == os.path.join(out, "ckpt_epoch_4.pth")


# ---------------------------------------------------------------- data
def test_digits_split_is_fixed_disjoint_and_stratified():
    from sklearn.datasets import load_digits

    labels = load_digits().target
    train_idx = digits._split_indices(labels, "train")
    val_idx = digits._split_indices(labels, "val")
    assert len(train_idx) + len(val_idx) == len(labels) and not set(train_idx) & set(val_idx)
    assert (digits._split_indices(labels, "val") == val_idx).all()
    for cls in range(10):
        share = (labels[val_idx] == cls).sum() / (labels == cls).sum()
        assert abs(share - digits.VAL_FRACTION) < 0.02
    val = digits.DigitsDataset("val", 40)
    image, target = val[0]
    assert image.size == (40, 40) and image.mode == "RGB" and target == labels[val_idx[0]]


@pytest.mark.parametrize("crop_pct,size", [(0.875, 32), (0.875, 57), (1.0, 33)])
def test_evaluation_transform_resizes_crops_and_normalises_as_before(crop_pct, size):
    """timm's evaluation transform = the authors' (short side to floor(size / crop_pct), bicubic,
    centre crop; crop_pct 1: resize to size × size), on non-square images of both orientations."""
    import math

    import numpy as np
    from PIL import Image
    from torchvision import transforms as T

    from defmamba.train.data.build import build_transform

    cfg = app_config.get_config(opts=["DATA.IMG_SIZE", str(size), "TEST.CROP_PCT", str(crop_pct)])
    bicubic = T.InterpolationMode.BICUBIC
    resize = [T.Resize(math.floor(size / crop_pct), interpolation=bicubic), T.CenterCrop(size)] if crop_pct < 1 \
        else [T.Resize((size, size), interpolation=bicubic)]
    reference = T.Compose(resize + [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    rng = np.random.default_rng(size)
    for height, width in ((45, 70), (101, 58)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        out = build_transform(False, cfg)(image)
        assert out.shape == (3, size, size)
        assert torch.equal(out, reference(image))


def test_synthetic_images_are_deterministic_and_carry_their_label():
    Synthetic = synthetic.SyntheticDataset
    train, again = Synthetic("train", 50, 33, 7), Synthetic("train", 50, 33, 7)
    val = Synthetic("val", 5, 33, 7)
    image, label = train[12]
    assert image.shape == (3, 33, 33) and image.dtype == torch.float32 and label == 12 % 7
    assert torch.equal(image, again[12][0]) and not torch.equal(image, train[19][0])
    assert not torch.equal(val[0][0], train[0][0])
    # Same-class images share a pattern: the class mean stands out of the unit noise.
    same = torch.stack([train[i][0] for i in range(3, 50, 7)]).mean(0)
    other = torch.stack([train[i][0] for i in range(4, 50, 7)]).mean(0)
    assert (same - other).abs().mean() > 0.2


# ---------------------------------------------------------------- throughput
@pytest.mark.parametrize("mode,amp_dtype", [("infer", None), ("train", torch.bfloat16)])
def test_measure_throughput_on_cpu(mode, amp_dtype):
    from defmamba.benchmark import measure_throughput

    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    before = model[3].weight.detach().clone()
    result = measure_throughput(model, batch_size=4, image_size=(20, 28), mode=mode, amp_dtype=amp_dtype,
                                warmup=1, repeats=3, iters_per_window=2, device="cpu")
    assert len(result["window_images_per_s"]) == 3
    assert result["images_per_s"] == sorted(result["window_images_per_s"])[1] > 0
    assert result["ms_per_iter"] == pytest.approx(1000 * 4 / result["images_per_s"])
    assert result["image_size"] == [20, 28] and result["peak_memory_gib"] is None
    assert result["amp_dtype"] == (None if amp_dtype is None else "bfloat16")
    assert torch.equal(before, model[3].weight) == (mode == "infer")    # training steps change the weights
    with pytest.raises(ValueError, match="mode must be"):
        measure_throughput(model, 2, 16, mode="fast")


def test_randaugment_posterize_at_full_magnitude_does_not_crash():
    """rand-m9-mstd0.5-inc1 reaches magnitude 10 = keep 0 bits, which recent Pillow refuses."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    image = Image.new("RGB", (8, 6), (200, 100, 50))
    black = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(image)
    assert black.size == (8, 6) and black.getextrema() == ((0, 0), (0, 0), (0, 0))
    kept = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)(image)   # 2 bits kept
    assert kept.getpixel((0, 0)) == (192, 64, 0)


def test_load_pretrained_keeps_a_new_head_for_another_class_count(tmp_path):
    import logging

    import defmamba

    source = defmamba.DefMamba(dims=16, depths=(1, 1, 1, 1), num_classes=3, d_state=4)
    torch.save({"model": source.state_dict()}, tmp_path / "src.pth")
    target = defmamba.DefMamba(dims=16, depths=(1, 1, 1, 1), num_classes=5, d_state=4)
    head_before = target.classifier.head.weight.detach().clone()
    modeling.load_pretrained(target, str(tmp_path / "src.pth"), logging.getLogger("test"))
    src, dst = source.state_dict(), target.state_dict()
    for key in src:
        if not key.startswith("classifier.head."):
            assert torch.equal(src[key], dst[key]), key
    assert torch.equal(target.classifier.head.weight, head_before)
    wrong_width = defmamba.DefMamba(dims=24, depths=(1, 1, 1, 1), num_classes=3, d_state=4)
    with pytest.raises(Exception, match="does not fit"):
        modeling.load_pretrained(wrong_width, str(tmp_path / "src.pth"), logging.getLogger("test"))


def test_parameters_are_counted_and_flops_skipped_without_fvcore(monkeypatch):
    """A machine without fvcore (the optional FLOP counter) trains; it only logs no FLOPs."""
    import sys

    import defmamba

    model = defmamba.DefMamba(dims=16, depths=(1, 1, 1, 1), num_classes=3, d_state=4)
    monkeypatch.setitem(sys.modules, "fvcore", None)      # makes `import fvcore...` fail
    monkeypatch.setitem(sys.modules, "fvcore.nn", None)
    n_params, flops = app_main.count_params_and_flops(model, 32)
    assert flops is None and n_params == sum(p.numel() for p in model.parameters())


def test_the_app_without_the_train_extra_names_the_install_command():
    import subprocess
    import sys

    code = ("import sys; sys.modules['yacs'] = None\n"
            "import importlib.util as u; real = u.find_spec\n"
            "u.find_spec = lambda name, *a: None if name == 'yacs' else real(name, *a)\n"
            "import defmamba.train.main")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "needs yacs" in proc.stderr and "pip install 'defmamba[train]'" in proc.stderr


# ---------------------------------------------------------------- data: links, bit depth, checks before training
def _tiny_split(root: Path, classes=("cat", "dog"), per_class: int = 2) -> Path:
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (40 * c, 10 * i, 0)).save(root / name / f"{i}.png")
    return root


def test_a_symbolic_link_loop_is_refused_naming_the_link(tmp_path):
    from defmamba.train.data import DataError
    from defmamba.train.data.folder import ImageFolderDataset

    split = _tiny_split(tmp_path / "train")
    for link, target in ((split / "cat" / "up", ".."), (split / "dog" / "self", ".")):
        link.symlink_to(target)
        with pytest.raises(DataError, match=f"symbolic link {link} points to .*contains it.*remove the link"):
            ImageFolderDataset(str(split), ["cat", "dog"])
        link.unlink()
    assert len(ImageFolderDataset(str(split), ["cat", "dog"])) == 4


def test_an_image_reached_twice_through_links_is_refused(tmp_path):
    from defmamba.train.data import DataError
    from defmamba.train.data.folder import ImageFolderDataset

    split = _tiny_split(tmp_path / "train")
    cases = [(split / "dog" / "alias", "../cat", "folder .*cat is reached twice.*under two labels \\(cat and dog\\)"),
             (split / "dog" / "x.png", "../cat/0.png", "image .*cat/0.png is also reached as .*dog/x.png"),
             (split / "cat" / "x.png", "../dog/1.png", "image .*dog/1.png is also reached as .*cat/x.png"),
             (split / "cat" / "gone.png", "nothing.png", "symbolic link to .*nothing.png, which does not exist")]
    for link, target, message in cases:
        link.symlink_to(target)
        with pytest.raises(DataError, match=message):
            ImageFolderDataset(str(split), ["cat", "dog"])
        link.unlink()
    # links are followed where they add images once: a class folder elsewhere, linked in
    outside = _tiny_split(tmp_path / "elsewhere", classes=("extra",), per_class=3)
    (split / "cat" / "more").symlink_to(outside / "extra")
    dataset = ImageFolderDataset(str(split), ["cat", "dog"])
    assert [target for _, target in dataset.samples] == [0] * 5 + [1] * 2
    assert str(split / "cat" / "more" / "2.png") in [path for path, _ in dataset.samples]


def test_high_bit_depth_grey_images_are_scaled_to_8_bits(tmp_path):
    import numpy as np
    from PIL import Image

    from defmamba.train.data import DataError
    from defmamba.train.data.decode import load_rgb

    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    for suffix in ("png", "tif"):
        path = tmp_path / f"deep.{suffix}"
        Image.fromarray(values).save(path)
        assert Image.open(path).mode.startswith("I;16")
        rgb = np.asarray(load_rgb(str(path)))
        assert rgb.shape == (20, 30, 3) and (rgb == expected[..., None]).all()
        assert (rgb == 255).mean() < 0.01       # Pillow's own convert("RGB") makes nearly all of them 255
    floats = tmp_path / "float.tif"
    Image.fromarray(rng.random((8, 8)).astype(np.float32)).save(floats)
    with pytest.raises(DataError, match=f"image {floats} has 32-bit floating-point pixels .*convert it"):
        load_rgb(str(floats))
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=f"cannot read image {garbage}: .*delete or replace the file"):
        load_rgb(str(garbage))


def test_the_quick_check_opens_the_first_and_last_image_of_every_class(tmp_path):
    from defmamba.train.data.folder import ImageFolderDataset
    from defmamba.train.data.verify import images_to_check

    split = _tiny_split(tmp_path / "train", classes=("a", "b", "c"), per_class=4)
    (split / "b" / "1.png").unlink()
    (split / "b" / "2.png").unlink()
    (split / "b" / "3.png").unlink()        # a class of one image: checked once
    dataset = ImageFolderDataset(str(split), ["a", "b", "c"])
    names = [os.path.relpath(p, split) for p in images_to_check(dataset, full=False)]
    assert names == ["a/0.png", "a/3.png", "b/0.png", "c/0.png", "c/3.png"]
    assert len(images_to_check(dataset, full=True)) == 9


@pytest.mark.parametrize("workers", [0, 2])
def test_verify_images_lists_every_unreadable_file(tmp_path, workers):
    import logging

    from defmamba.train.data import DataError
    from defmamba.train.data.folder import ImageFolderDataset
    from defmamba.train.data.verify import verify_images

    split = _tiny_split(tmp_path / "train", per_class=5)
    bad = [split / "cat" / "2.png", split / "dog" / "3.png"]
    for path in bad:
        path.write_bytes(b"broken")
    dataset = ImageFolderDataset(str(split), ["cat", "dog"])
    log = logging.getLogger("test")
    verify_images([dataset, None], full=False, workers=workers, rank=0, world_size=1, logger=log)   # misses them
    with pytest.raises(DataError) as err:
        verify_images([dataset], full=True, workers=workers, rank=0, world_size=1, logger=log)
    message = str(err.value)
    assert message.startswith("2 images cannot be read (checked before training: every image)")
    assert all(f"cannot read image {path}" in message for path in bad) and "delete or replace" in message


# ---------------------------------------------------------------- run folder: lock, space, records, resume
_HOLD_LOCK = ("import sys; from defmamba.train.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
              "print('locked', flush=True); sys.stdin.read()")


def test_run_lock_is_exclusive_names_its_holder_and_is_taken_over_when_the_holder_is_gone(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    from defmamba.train.errors import RunFolderError
    from defmamba.train.run_lock import LOCK_NAME, RunLock

    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"in use by another run \\(process {holder.pid} on host "
                                                 f"{socket.gethostname()}, started .*--tag NAME"):
            RunLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid     # left behind by the kill
    lock = RunLock(str(tmp_path)).acquire()
    assert lock.previous is not None and lock.previous.pid == holder.pid
    with pytest.raises(RunFolderError, match=f"process {os.getpid()} on host"):
        RunLock(str(tmp_path)).acquire()            # a second lock from this process too
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    # a lock file from another host is not taken over: whether its process runs cannot be checked
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "another-host", "started": "", "command": ""}))
    with pytest.raises(RunFolderError, match=f"process 1 on host another-host.*delete {tmp_path / LOCK_NAME}"):
        RunLock(str(tmp_path)).acquire()


def test_run_lock_without_flock_goes_by_the_recorded_pid(tmp_path, monkeypatch):
    import json
    import socket
    import subprocess
    import sys

    from defmamba.train import run_lock
    from defmamba.train.errors import RunFolderError

    monkeypatch.setattr(run_lock, "_try_flock", lambda fd: None)    # a filesystem without flock
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        path = tmp_path / run_lock.LOCK_NAME
        path.write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname()}))
        with pytest.raises(RunFolderError, match=f"process {alive.pid}"):
            run_lock.RunLock(str(tmp_path)).acquire()
        path.write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname()}))
        lock = run_lock.RunLock(str(tmp_path)).acquire()
        assert lock.previous.pid == dead_pid
        lock.release()
    finally:
        alive.kill()
        alive.wait()


def test_experiment_keys_are_those_that_change_what_is_trained():
    from defmamba.train.resume_check import experiment_differences, is_experiment_key

    counted = ["DATA.DATASET", "DATA.DATA_PATH", "DATA.IMG_SIZE", "DATA.BATCH_SIZE", "MODEL.NUM_CLASSES",
               "MODEL.DEFMAMBA.DIMS", "MODEL.PRETRAINED", "TRAIN.BASE_LR", "TRAIN.EPOCHS", "TRAIN.OPTIMIZER.NAME",
               "TRAIN.LR_SCHEDULER.NAME", "TRAIN.ACCUMULATION_STEPS", "AUG.MIXUP", "TEST.CROP_PCT", "MODEL_EMA",
               "MODEL_EMA_DECAY", "SEED"]
    ignored = ["PRINT_FREQ", "OUTPUT", "TAG", "DATA.NUM_WORKERS", "DATA.PIN_MEMORY", "DATA.VERIFY_IMAGES",
               "SAVE_FREQ", "SAVE_KEEP", "AMP_ENABLE", "AMP_DTYPE", "COMPILE", "EVAL_MODE", "THROUGHPUT_MODE",
               "MODEL.RESUME", "TRAIN.AUTO_RESUME", "TRAIN.START_EPOCH", "TRAIN.USE_CHECKPOINT", "TRAIN.CUDA_GRAPHS",
               "TRAIN.GRAPHED_TRAINING", "TRAIN.BACKWARD_ON_CALLING_THREAD"]
    assert all(is_experiment_key(k) for k in counted) and not any(is_experiment_key(k) for k in ignored)
    stored = app_config.get_config(opts=["TRAIN.BASE_LR", "0.02", "DATA.DATA_PATH", "/data/a", "PRINT_FREQ", "5"])
    new = app_config.get_config(opts=["TRAIN.BASE_LR", "0.01", "DATA.DATA_PATH", "/data/a/", "PRINT_FREQ", "50",
                                      "AUG.MIXUP", "0.0"])
    assert experiment_differences(stored.dump(), new) == ["TRAIN.BASE_LR: 0.02 in the checkpoint, 0.01 now",
                                                         "AUG.MIXUP: 0.8 in the checkpoint, 0.0 now"]
    older = {k: v for k, v in stored.items() if k != "SEED"}          # a config written before SEED existed
    assert experiment_differences(dict(older), stored) == []
    assert experiment_differences("{not: [yaml", new) is None


def test_check_free_space_refuses_a_folder_without_room_for_checkpoints(tmp_path, monkeypatch):
    import collections
    import shutil

    from defmamba.train import run_folder
    from defmamba.train.errors import RunFolderError

    model = nn.Linear(1000, 1000)                                     # 1,001,000 float32 parameters
    size = run_folder.checkpoint_bytes(model, with_ema=True)
    assert size == 4 * 1_001_000 * 4                                  # weights, EMA, two moments
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 12, 0, run_folder.SPACE_FACTOR * size - 1))
    with pytest.raises(RunFolderError, match=f"not enough free space for checkpoints in {tmp_path}: .* free, but a "
                                             "checkpoint of this model takes about 15.3 MiB"):
        run_folder.check_free_space(str(tmp_path), model, with_ema=True)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 12, 0, run_folder.SPACE_FACTOR * size))
    run_folder.check_free_space(str(tmp_path), model, with_ema=True)


@pytest.mark.parametrize("failure", ["full disk", "permission"])
def test_a_failed_save_says_why_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, failure):
    import collections
    import errno
    import shutil

    from defmamba.train import records as run_records
    from defmamba.train.errors import RunFolderError

    out = str(tmp_path)
    records = run_records.RunRecords(out)
    state = {"model": {"w": torch.zeros(1000)}, "epoch": 0}
    records.save_epoch(dict(state), 0, {"epoch": 0, "val_acc1": 10.0}, is_best=True, is_best_ema=False,
                       epoch_file=False, keep=1)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        if failure == "permission":
            raise PermissionError(errno.EACCES, "Permission denied")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 576 vs 470")

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9, 100))
    with pytest.raises(RunFolderError) as err:
        records.save_epoch({**state, "epoch": 1}, 1, {"epoch": 1, "val_acc1": 20.0}, is_best=True,
                           is_best_ema=False, epoch_file=False, keep=1)
    monkeypatch.setattr(torch, "save", real_save)
    message = str(err.value)
    reason = f"the disk is full (100 B free in {tmp_path}, about 3.9 KiB needed)" if failure == "full disk" \
        else "permission denied"                      # 3.9 KiB: the 1000 float32 weights of the state
    assert message.startswith(f"could not write {tmp_path / 'last.pth'}: {reason}. ")
    assert f"{tmp_path / 'last.pth'} (epoch 0) is complete and intact" in message
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 0
    assert not list(tmp_path.glob("*.tmp"))
    assert run_records.read_metrics(str(tmp_path / "metrics.jsonl")) == [{"epoch": 0, "val_acc1": 10.0}]


def test_metrics_file_is_replaced_atomically_and_skips_a_half_written_row(tmp_path, monkeypatch):
    from defmamba.train import records as run_records

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0, "a": 1}\n{"epoch": 1, "a": 2}\n{"epoch": 2, "a"')   # killed mid-row
    assert run_records.read_metrics(str(path)) == [{"epoch": 0, "a": 1}, {"epoch": 1, "a": 2}]
    records = run_records.RunRecords(str(tmp_path))

    def killed_after_half(path_, text):
        with open(path_ + ".tmp", "w") as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt                         # stands for the kill

    monkeypatch.setattr(run_checkpoint, "atomic_write_text", killed_after_half)
    with pytest.raises(KeyboardInterrupt):
        records.keep_metrics_before(1)
    assert path.read_text().startswith('{"epoch": 0, "a": 1}\n{"epoch": 1, "a": 2}\n')    # intact
    monkeypatch.undo()
    records.keep_metrics_before(1)
    assert path.read_text() == '{"epoch": 0, "a": 1}\n'
    mtime = path.stat().st_mtime_ns
    records.keep_metrics_before(1)                      # nothing to change: not rewritten
    assert path.stat().st_mtime_ns == mtime


def test_images_per_second_leave_out_a_graph_warm_up(caplog):
    """A step still warming up for its CUDA graph (DDP: 11 eager steps, then the recording) keeps
    those batches out of the epoch's images/s figure, as the first 10 of an eager run are."""
    import logging

    class _WarmingStep:
        steps_before_replay = 12

        def __init__(self, step):
            self.step, self.model, self.optimizer, self.scaler = step, step.model, step.optimizer, step.scaler

        def __call__(self, samples, targets, update=True):
            return self.step(samples, targets, update)

    config = app_config.get_config(opts=["PRINT_FREQ", "10", "DATA.BATCH_SIZE", "4"])
    model = nn.Linear(3, 2)
    step = app_train_step.TrainStep(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1),
                                    torch.amp.GradScaler("cpu", enabled=False),
                                    app_engine.AmpSettings(False, torch.float32))
    loader = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(100)]
    with caplog.at_level(logging.INFO, logger="test"):
        app_engine.train_one_epoch(config, _WarmingStep(step), loader, 0, None, _NoSchedule(), torch.device("cpu"),
                                   logging.getLogger("test"))
        app_engine.train_one_epoch(config, step, loader, 1, None, _NoSchedule(), torch.device("cpu"),
                                   logging.getLogger("test"))
    summaries = [r.message for r in caplog.records if "images/s" in r.message]
    assert "after the first 12 batches" in summaries[0] and "after the first 10 batches" in summaries[1]
    # A short epoch times its last four fifths, but never a graph's warm-up; one that is all warm-up
    # is timed whole and says so.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="test"):
        for epoch, batches in enumerate((50, 12, 30)):
            app_engine.train_one_epoch(config, _WarmingStep(step) if epoch < 2 else step, loader[:batches], epoch,
                                       None, _NoSchedule(), torch.device("cpu"), logging.getLogger("test"))
    summaries = [r.message for r in caplog.records if "images/s" in r.message]
    assert "after the first 12 batches" in summaries[0]
    assert "(the whole epoch, a CUDA graph's warm-up included)" in summaries[1]
    assert "after the first 6 batches" in summaries[2]
    # A CUDA-graph step counts its eager warm-up and the recording.
    capturable = app_train_step.TrainStep(model, nn.CrossEntropyLoss(),
                                          torch.optim.AdamW(model.parameters(), capturable=True),
                                          torch.amp.GradScaler("cpu", enabled=False),
                                          app_engine.AmpSettings(False, torch.float32))
    assert app_train_step.CudaGraphTrainStep(capturable, warmup=3).steps_before_replay == 4


class _RecordBackwardThreading(torch.autograd.Function):
    """Identity whose backward records whether autograd's device threads were on for it."""
    seen: list[bool] = []

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _RecordBackwardThreading.seen.append(torch._C._is_multithreading_enabled())
        return grad


class _ProbedLinear(nn.Linear):
    def forward(self, x):
        return super().forward(_RecordBackwardThreading.apply(x.requires_grad_()))


@pytest.mark.parametrize("on_calling_thread", [True, False])
def test_train_step_runs_its_backward_on_the_calling_thread_as_configured(on_calling_thread):
    config = app_config.get_config(opts=["TRAIN.BACKWARD_ON_CALLING_THREAD", str(on_calling_thread)])
    assert app_config.get_config().TRAIN.BACKWARD_ON_CALLING_THREAD  # the default
    model = _ProbedLinear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = app_engine.AmpSettings(False, torch.float32)
    step = app_main._build_train_step(config, model, model, None, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                      nn.CrossEntropyLoss(), amp, None, None)
    _RecordBackwardThreading.seen = []
    step(torch.randn(4, 3), torch.randint(0, 2, (4,)))
    step(torch.randn(4, 3), torch.randint(0, 2, (4,)))
    assert _RecordBackwardThreading.seen == [not on_calling_thread] * 2
    assert torch._C._is_multithreading_enabled()  # the caller's setting is restored after each backward


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_barrier_names_the_gpu_of_this_process_under_nccl(monkeypatch, backend):
    """Under NCCL the barrier runs on this process's GPU, named (PyTorch warns when it has to guess
    it from the current device); gloo's takes no device."""
    from defmamba.train.utils import distributed

    calls = []
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: backend)
    monkeypatch.setattr(distributed.torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(distributed.dist, "barrier", lambda **kwargs: calls.append(kwargs))
    distributed.barrier()
    assert calls == [{"device_ids": [3]} if backend == "nccl" else {}]
