"""Train and evaluate DefMamba image classifiers: the command line behind ``classification/main.py``.

    python classification/main.py --cfg configs/classification/defmamba_tiny_224.yaml \
        --batch-size 128 --data-path /path/to/imagenet --output output
    torchrun --nproc_per_node 8 classification/main.py --cfg ... --data-path ...
    python classification/main.py --cfg ... --data-path ... --resume ckpt.pth --eval
    python classification/main.py --cfg ... --throughput
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import AMP_DTYPES, ConfigError, get_config
from .data import DataError, build_loaders
from .data.verify import verify_images
from ..benchmark import measure_throughput
from ..checkpoint import CheckpointError, safe_load
from ..regional_compile import compile_token_mixers
from .engine import AmpSettings, train_one_epoch, validate
from .errors import RunFolderError
from .modeling import build_model, load_checkpoint_weights, load_pretrained
from .records import METRICS_NAME, RunRecords
from .resume_check import prepare_training_folder
from .run_folder import check_free_space, mode_folder, open_run_folder, save_config
from .train_step import CudaGraphError, CudaGraphTrainStep, TrainStep
from .utils.checkpoint import find_resume_checkpoint, remove_stale_temporaries
from .utils.distributed import DistInfo, barrier, cleanup, init_distributed, is_distributed
from .utils.ema import ModelEma
from .utils.lr_scheduler import REFERENCE_BATCH, build_scheduler, scaled_learning_rates
from .utils.optimizer import build_optimizer

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class UsageError(ValueError):
    """The command line asks for something that cannot be done."""


def _str2bool(value: str) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if value.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DefMamba image classification: training, evaluation and "
                                                 "throughput (see classification/README.md)")
    parser.add_argument("--cfg", type=str, metavar="FILE", help="path to a YAML config file")
    parser.add_argument("--opts", nargs="+", default=None, metavar="KEY VALUE",
                        help="override config keys, e.g. --opts TRAIN.EPOCHS 100 DATA.NUM_WORKERS 4")
    parser.add_argument("--batch-size", type=int, help="batch size per process")
    parser.add_argument("--data-path", type=str, help="dataset root with train/ and val/ class folders")
    parser.add_argument("--pretrained", type=str, help="start from these weights (model only)")
    parser.add_argument("--resume", type=str, help="checkpoint to continue training from, or to evaluate with --eval")
    parser.add_argument("--accumulation-steps", type=int, help="gradient accumulation steps")
    parser.add_argument("--use-checkpoint", action="store_true", help="activation checkpointing to save memory")
    parser.add_argument("--disable_amp", action="store_true", help="train and evaluate in float32")
    parser.add_argument("--amp-dtype", type=str, choices=AMP_DTYPES, help="autocast dtype (default float16)")
    parser.add_argument("--output", type=str, metavar="PATH",
                        help="root of the output folder: <output>/<MODEL.NAME>/<tag>")
    parser.add_argument("--tag", type=str, help="experiment tag (default 'default')")
    parser.add_argument("--eval", action="store_true", help="evaluate only")
    parser.add_argument("--throughput", action="store_true", help="measure inference images/s only")
    parser.add_argument("--model_ema", type=_str2bool, nargs="?", const=True, default=None,
                        help="keep an EMA of the weights (true/false)")
    parser.add_argument("--model_ema_decay", type=float, help="EMA decay")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--compile", action="store_true", help="torch.compile: for training each block's token mixer "
                        "(regional compilation), for --eval / --throughput the whole model")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="allow checkpoints holding arbitrary Python objects (only for files you trust)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by torch.distributed.launch; the LOCAL_RANK environment variable wins")
    return parser.parse_args(argv)


def seed_everything(seed: int) -> None:
    seed = seed % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of one epoch on one rank: training randomness depends on (seed, epoch, rank) only,
    so a resumed run repeats the uninterrupted one exactly."""
    return (seed * 1_000_003 + epoch * 7919 + rank) % 2 ** 32


def count_params_and_flops(model: nn.Module, img_size: int) -> tuple[int, float | None]:
    """Parameters and FLOPs (None when fvcore, which counts them, is not installed)."""
    from ..flops import count_flops, count_params

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # tracing warnings of the counter, not of the model
            flops, _ = count_flops(model, input_size=(3, img_size, img_size))
    except ImportError:
        flops = None
    return count_params(model), flops


def _tensorboard(output_dir: str, logger):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("TensorBoard logging is off: install it with `pip install tensorboard` to get scalars in %s",
                    os.path.join(output_dir, "tensorboard"))
        return None
    return SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"))


def build_criterion(config, mixup_active: bool) -> nn.Module:
    """The authors' training loss: soft-target cross-entropy on the mixed labels while Mixup/CutMix is
    on (its targets carry the label smoothing), else label-smoothing cross-entropy (MODEL.LABEL_SMOOTHING),
    else plain cross-entropy."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def _checkpoint_state(config, epoch, model, model_ema, optimizer, lr_scheduler, scaler, max_acc, max_acc_ema) -> dict:
    """The official checkpoint layout (including its key spelling ``max_accuray_ema``) plus the
    AMP scaler; the config is stored as YAML text so the file loads with ``weights_only=True``."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "max_accuracy": max_acc,
        "epoch": epoch,
        "config": config.dump(),
    }
    if model_ema is not None:
        state["model_ema"] = model_ema.state_dict()
        state["max_accuray_ema"] = max_acc_ema
    return state


def _read_checkpoint(path: str, allow_pickle: bool) -> dict:
    try:
        checkpoint = safe_load(path, allow_pickle=allow_pickle)
    except OSError as err:   # e.g. a truncated zip archive
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or corrupt ({err})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict of weights")
    return checkpoint


def _setup_model(config, info: DistInfo, logger) -> nn.Module:
    seed_everything(config.SEED)
    model = build_model(config).to(info.device)
    if info.is_main:
        n_params, flops = count_params_and_flops(model, config.DATA.IMG_SIZE)
        logger.info(f"model: {config.MODEL.ARCH} dims {model.dims} depths {list(model.depths)}, "
                    f"{n_params / 1e6:.2f} M parameters, "
                    + (f"{flops / 1e9:.3f} GFLOPs at {config.DATA.IMG_SIZE}²" if flops is not None
                       else "FLOPs not counted (install fvcore to count them)"))
    return model


def _throughput(config, model: nn.Module, amp: AmpSettings, device: torch.device, logger) -> None:
    result = measure_throughput(model, config.DATA.BATCH_SIZE, config.DATA.IMG_SIZE, mode="infer",
                                amp_dtype=amp.dtype if amp.enabled else None, device=device)
    logger.info(f"throughput: {result['images_per_s']:.1f} images/s (batch {result['batch_size']}, "
                f"{config.DATA.IMG_SIZE}², {result['amp_dtype'] or 'float32'}, {device}; median of "
                f"{len(result['window_images_per_s'])} windows)"
                + (f", peak memory {result['peak_memory_gib']:.2f} GiB" if result["peak_memory_gib"] else ""))


def _find_weights(config, output_dir: str, logger) -> str:
    """The checkpoint to resume from or evaluate: --resume; else, with TRAIN.AUTO_RESUME, the
    output folder's latest (also ahead of --pretrained when training, so an interrupted
    fine-tuning run continues; --eval --pretrained evaluates what it names). "" if none."""
    resume = config.MODEL.RESUME
    if not resume and config.TRAIN.AUTO_RESUME and not (config.EVAL_MODE and config.MODEL.PRETRAINED):
        resume = find_resume_checkpoint(output_dir) or ""
        if resume:
            logger.info(f"auto-resume: continuing from {resume}"
                        + (f" (instead of the pretrained weights {config.MODEL.PRETRAINED})"
                           if config.MODEL.PRETRAINED else ""))
    if config.EVAL_MODE and not resume and not config.MODEL.PRETRAINED:
        raise UsageError("--eval needs weights to evaluate: pass --resume CHECKPOINT (or --pretrained WEIGHTS)")
    return resume


def _evaluate(config, data, model: nn.Module, model_ema, amp: AmpSettings, info: DistInfo, output_dir: str,
              source: str, logger) -> None:
    results = {"model": validate(data.loader_val, model, amp, info.device, logger, "model", config.PRINT_FREQ)}
    if model_ema is not None:
        results["model_ema"] = validate(data.loader_val, model_ema.module, amp, info.device, logger, "EMA",
                                        config.PRINT_FREQ)
    for name, res in results.items():
        logger.info(f"evaluation of {name}: top-1 {res['acc1']:.3f}%, top-5 {res['acc5']:.3f}% on {res['count']} images")
    if info.is_main:
        with open(os.path.join(output_dir, "eval.json"), "w", encoding="utf-8") as f:
            json.dump({"checkpoint": source, **results}, f, indent=2)


@dataclass
class Progress:
    """Where training stands: the next epoch to train and the best top-1 so far (model, EMA)."""
    next_epoch: int
    max_acc: float = 0.0
    max_acc_ema: float = 0.0

    def record(self, val: dict, val_ema: dict | None) -> tuple[bool, bool]:
        """Account for one epoch's validation; returns (new best of the model, new best of the EMA)."""
        is_best = val["acc1"] > self.max_acc
        self.max_acc = max(self.max_acc, val["acc1"])
        is_best_ema = val_ema is not None and val_ema["acc1"] > self.max_acc_ema
        if val_ema is not None:
            self.max_acc_ema = max(self.max_acc_ema, val_ema["acc1"])
        return is_best, is_best_ema


def _check_training_setup(config, data, info: DistInfo) -> None:
    if config.TRAIN.ACCUMULATION_STEPS > len(data.loader_train):
        raise UsageError(f"TRAIN.ACCUMULATION_STEPS ({config.TRAIN.ACCUMULATION_STEPS}) is larger than the "
                         f"{len(data.loader_train)} batches of an epoch; lower --accumulation-steps")
    for key, enabled, what in (("TRAIN.CUDA_GRAPHS", config.TRAIN.CUDA_GRAPHS, "the training step"),
                               ("TRAIN.GRAPHED_TRAINING", config.TRAIN.GRAPHED_TRAINING,
                                "the model's forward and backward")):
        if enabled and info.device.type != "cuda":
            raise UsageError(f"{key} replays {what} on a GPU; this run has device {info.device}: turn the graphs off")


def _resume(config, checkpoint, resume: str, optimizer, scaler, amp: AmpSettings, logger) -> Progress:
    """The progress to start from: the checkpoint's when it holds a training state (optimizer
    and GradScaler restored here), else TRAIN.START_EPOCH. The learning rate needs no restoring:
    the schedule is a function of the step index."""
    if checkpoint is None or "optimizer" not in checkpoint or "epoch" not in checkpoint:
        return Progress(next_epoch=config.TRAIN.START_EPOCH)
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"the optimizer state in {resume} does not fit this model/optimizer ({err}); "
                              "start from its weights with --pretrained instead") from None
    if checkpoint.get("scaler") and amp.uses_scaler:
        scaler.load_state_dict(checkpoint["scaler"])
    progress = Progress(next_epoch=int(checkpoint["epoch"]) + 1,
                        max_acc=float(checkpoint.get("max_accuracy", 0.0)),
                        max_acc_ema=float(checkpoint.get("max_accuray_ema", checkpoint.get("max_accuracy_ema", 0.0))))
    logger.info(f"resuming at epoch {progress.next_epoch} (best top-1 so far {progress.max_acc:.3f}%)")
    return progress


def _build_train_step(config, model: nn.Module, run_model: nn.Module, model_ema, optimizer, scaler,
                      criterion: nn.Module, amp: AmpSettings, info: DistInfo, logger):
    # With graphs, DDP is built on the stream its step is warmed up and recorded on.
    graph_stream = torch.cuda.Stream(info.device) if config.TRAIN.CUDA_GRAPHS else None
    train_model = run_model
    if is_distributed():     # under a launcher, as the authors' loop: DDP also with one process
        with torch.cuda.stream(graph_stream):    # no-op without graphs (None)
            # Eager steps keep each gradient as a view of DDP's all-reduce bucket: without that, DDP
            # also copies the reduced buckets back into the gradients, a kernel launch per parameter
            # (348 per step for DefMamba-S). A recorded step launches none of them, and keeps the
            # layout its GPU test verified.
            train_model = DistributedDataParallel(
                run_model, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
                broadcast_buffers=False, gradient_as_bucket_view=not config.TRAIN.CUDA_GRAPHS)
    train_step = TrainStep(train_model, criterion, optimizer, scaler, amp, clip_grad=config.TRAIN.CLIP_GRAD,
                           accumulation=config.TRAIN.ACCUMULATION_STEPS, model_ema=model_ema, ema_source=model,
                           backward_on_calling_thread=config.TRAIN.BACKWARD_ON_CALLING_THREAD)
    if config.TRAIN.CUDA_GRAPHS:
        train_step = CudaGraphTrainStep(train_step, stream=graph_stream)
        logger.info(f"training steps are replayed from a CUDA graph after {train_step.warmup} eager warm-up steps")
    return train_step


@dataclass(frozen=True)
class EpochResult:
    """One epoch's training statistics (``train_one_epoch``) and validation results (``validate``)."""
    epoch: int
    train: dict
    val: dict
    val_ema: dict | None
    is_best: bool
    is_best_ema: bool

    def metrics(self) -> dict:
        """The epoch's line of metrics.jsonl."""
        record = {"epoch": self.epoch, "train_loss": self.train["loss"], "train_grad_norm": self.train["grad_norm"],
                  "lr": self.train["lr"], "train_images_per_s": self.train["images_per_s"],
                  "val_acc1": self.val["acc1"], "val_acc5": self.val["acc5"], "val_loss": self.val["loss"]}
        if self.val_ema is not None:
            record.update(ema_acc1=self.val_ema["acc1"], ema_acc5=self.val_ema["acc5"], ema_loss=self.val_ema["loss"])
        return record


def _save_and_log(config, result: EpochResult, progress: Progress, model: nn.Module, model_ema, train_step,
                  lr_scheduler, records: RunRecords, tb_writer, logger) -> None:
    """Rank 0 after each epoch: the checkpoints and the line of metrics.jsonl, in the crash-safe order
    of :mod:`.records`, and the epoch's TensorBoard scalars."""
    epoch = result.epoch
    state = _checkpoint_state(config, epoch, model, model_ema, train_step.optimizer, lr_scheduler, train_step.scaler,
                              progress.max_acc, progress.max_acc_ema)
    last_epoch = epoch == config.TRAIN.EPOCHS - 1
    record = result.metrics()
    written = records.save_epoch(state, epoch, record, keep=config.SAVE_KEEP, is_best=result.is_best,
                                 is_best_ema=result.is_best_ema,
                                 epoch_file=(epoch + 1) % config.SAVE_FREQ == 0 or last_epoch)
    logger.info("saved " + ", ".join(os.path.basename(p) for p in written) + f" in {records.output_dir}")
    if tb_writer is not None:
        for key, value in record.items():
            if key != "epoch":
                tb_writer.add_scalar(f"epoch/{key}", value, epoch)
        tb_writer.flush()


def _run_epochs(config, data, progress: Progress, train_step, model: nn.Module, run_model: nn.Module, model_ema,
                lr_scheduler, amp: AmpSettings, info: DistInfo, records: RunRecords, tb_writer, logger) -> None:
    """Train, validate, save and log every epoch from ``progress.next_epoch`` to TRAIN.EPOCHS."""
    device = info.device
    for epoch in range(progress.next_epoch, config.TRAIN.EPOCHS):
        seed_everything(epoch_seed(config.SEED, epoch, info.rank))
        data.sampler_train.set_epoch(epoch)
        data.loader_train.generator.manual_seed(epoch_seed(config.SEED, epoch, info.rank))
        stats = train_one_epoch(config, train_step, data.loader_train, epoch, data.mixup_fn, lr_scheduler,
                                device, logger, tb_writer)
        val = validate(data.loader_val, run_model, amp, device, logger, "model", config.PRINT_FREQ)
        val_ema = validate(data.loader_val, model_ema.module, amp, device, logger, "EMA", config.PRINT_FREQ) \
            if model_ema is not None else None
        result = EpochResult(epoch, stats, val, val_ema, *progress.record(val, val_ema))
        progress.next_epoch = epoch + 1
        logger.info(f"epoch {epoch}: top-1 {val['acc1']:.3f}% (best {progress.max_acc:.3f}%)"
                    + (f", EMA top-1 {val_ema['acc1']:.3f}% (best {progress.max_acc_ema:.3f}%)" if val_ema else ""))
        if info.is_main:
            _save_and_log(config, result, progress, model, model_ema, train_step, lr_scheduler, records,
                          tb_writer, logger)
        barrier()


def _log_summary(progress: Progress, with_ema: bool, elapsed: float, output_dir: str, tensorboard: bool,
                 logger) -> None:
    logger.info(f"training finished in {datetime.timedelta(seconds=int(elapsed))}: best top-1 {progress.max_acc:.3f}%"
                + (f", best EMA top-1 {progress.max_acc_ema:.3f}%" if with_ema else ""))
    saved = [n for n in ("last.pth", "best.pth", "best_ema.pth") if os.path.exists(os.path.join(output_dir, n))]
    logger.info(f"checkpoints in {output_dir}: {', '.join(saved) or 'none'}; per-epoch metrics: "
                f"{os.path.join(output_dir, METRICS_NAME)}; logs: {os.path.join(output_dir, 'log_rank0.txt')}"
                + (f"; TensorBoard: {os.path.join(output_dir, 'tensorboard')}" if tensorboard else ""))


def _train(config, data, model: nn.Module, run_model: nn.Module, model_ema, checkpoint, resume: str,
           amp: AmpSettings, info: DistInfo, output_dir: str, logger) -> None:
    _check_training_setup(config, data, info)
    steps_per_epoch = len(data.loader_train) // config.TRAIN.ACCUMULATION_STEPS
    global_batch = config.DATA.BATCH_SIZE * info.world_size * config.TRAIN.ACCUMULATION_STEPS
    lrs = scaled_learning_rates(config, global_batch)
    optimizer = build_optimizer(config, model, lrs.base)
    lr_scheduler = build_scheduler(config, optimizer, steps_per_epoch, lrs)
    logger.info(f"global batch {global_batch}: peak learning rate {lrs.base:.3e} "
                f"(TRAIN.BASE_LR {config.TRAIN.BASE_LR} × {global_batch}/{REFERENCE_BATCH}), "
                f"{steps_per_epoch} steps per epoch")
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp.uses_scaler)
    progress = _resume(config, checkpoint, resume, optimizer, scaler, amp, logger)
    criterion = build_criterion(config, mixup_active=data.mixup_fn is not None)
    train_step = _build_train_step(config, model, run_model, model_ema, optimizer, scaler, criterion, amp, info,
                                   logger)
    tb_writer = _tensorboard(output_dir, logger) if info.is_main else None
    records = RunRecords(output_dir, checkpoint)
    if info.is_main:
        records.keep_metrics_before(progress.next_epoch)
    start_time = time.time()
    try:
        _run_epochs(config, data, progress, train_step, model, run_model, model_ema, lr_scheduler, amp, info,
                    records, tb_writer, logger)
    finally:
        if tb_writer is not None:
            tb_writer.close()
    _log_summary(progress, model_ema is not None, time.time() - start_time, output_dir, tb_writer is not None, logger)


def run(args: argparse.Namespace) -> int:
    """Train, evaluate or measure throughput as ``args`` and the config say."""
    config = get_config(args)
    info: DistInfo = init_distributed(args.local_rank)
    run_dir = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    output_dir = mode_folder(run_dir, config)      # the run folder, or its eval/ or throughput/ sub-folder
    with open_run_folder(output_dir, info) as logger:
        return _run(config, args, info, run_dir, output_dir, logger)


def _run(config, args: argparse.Namespace, info: DistInfo, run_dir: str, output_dir: str, logger) -> int:
    logger.info(f"processes: {info.world_size}, this is rank {info.rank} on {info.device}; output in {output_dir}")
    amp = AmpSettings(enabled=config.AMP_ENABLE, dtype=_DTYPES[config.AMP_DTYPE])
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest conv kernels
    model = _setup_model(config, info, logger)
    if config.THROUGHPUT_MODE:
        if info.is_main:
            save_config(config, output_dir, logger)
        _throughput(config, torch.compile(model) if config.COMPILE else model, amp, info.device, logger)
        return 0

    if info.is_main and not config.EVAL_MODE and remove_stale_temporaries(output_dir):
        logger.info("removed temporary files of an interrupted checkpoint save in %s", output_dir)
    resume = _find_weights(config, run_dir, logger)
    checkpoint = _read_checkpoint(resume, args.unsafe_load) if resume else None
    if not config.EVAL_MODE:
        if prepare_training_folder(config, checkpoint, resume, output_dir, info, logger):
            return 0            # already finished
        check_free_space(output_dir, model, with_ema=config.MODEL_EMA)
    if info.is_main:
        save_config(config, output_dir, logger)
    data = build_loaders(config, info.rank, info.world_size, need_train=not config.EVAL_MODE,
                         pin_memory=info.device.type == "cuda")
    logger.info(f"data: {config.DATA.DATASET}, {data.num_classes} classes, "
                + (f"{len(data.dataset_train)} training / " if data.dataset_train is not None else "")
                + f"{len(data.dataset_val)} validation images")
    verify_images([data.dataset_train, data.dataset_val], full=config.DATA.VERIFY_IMAGES,
                  workers=config.DATA.NUM_WORKERS, rank=info.rank, world_size=info.world_size, logger=logger)

    if resume:
        load_checkpoint_weights(model, checkpoint, resume, key="model")
        logger.info(f"loaded model weights from {resume} ['model']")
    elif config.MODEL.PRETRAINED:
        load_pretrained(model, config.MODEL.PRETRAINED, logger, allow_pickle=args.unsafe_load)
    model_ema = None
    has_ema_weights = checkpoint is not None and "model_ema" in checkpoint
    if config.MODEL_EMA or (config.EVAL_MODE and has_ema_weights):
        model_ema = ModelEma(model, config.MODEL_EMA_DECAY)
        if has_ema_weights:
            load_checkpoint_weights(model_ema.module, checkpoint, resume, key="model_ema")
            logger.info(f"loaded EMA weights from {resume} ['model_ema']")
        elif checkpoint is not None:
            logger.info("the checkpoint has no EMA weights; the EMA starts from the model weights")

    run_model = model
    if config.COMPILE and config.EVAL_MODE:
        run_model = torch.compile(model)
    elif config.COMPILE:
        # Training compiles each block's token mixer in place (regional compilation): the whole
        # model's training graph fails an Inductor assertion on the GPU (tests/test_compile.py),
        # the regions pass the gradient check against eager mode. After the EMA copy was made, so
        # that it keeps its own eager modules.
        count = compile_token_mixers(model)
        logger.info(f"--compile: the token mixers (DSSM) of {count} blocks are compiled (regional compilation)")
    if config.TRAIN.GRAPHED_TRAINING and not config.EVAL_MODE:
        # After the EMA copy was made: the EMA only evaluates, eagerly.
        model.set_graphed_training()
        logger.info("graphed training: the model's forward and backward are replayed from CUDA graphs, recorded "
                    "once per input shape; the rest of each step runs eagerly")
    if config.EVAL_MODE:
        _evaluate(config, data, run_model, model_ema, amp, info, output_dir, resume or config.MODEL.PRETRAINED, logger)
    else:
        _train(config, data, model, run_model, model_ema, checkpoint, resume, amp, info, output_dir, logger)
    return 0


def _clean_message(err: BaseException) -> str:
    """The message of ``err`` without the traceback a DataLoader worker adds when re-raising it."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    if isinstance(err, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]
    return text


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for unusable input, with the reason)."""
    args = parse_args(argv)
    try:
        return run(args)
    except (ConfigError, DataError, CheckpointError, UsageError, RunFolderError, FloatingPointError,
            CudaGraphError) as err:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}error: {_clean_message(err)}", file=sys.stderr, flush=True)
        return 2
    finally:
        cleanup()

