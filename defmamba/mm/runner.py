"""Train and test entry points shared by ``detection/`` and ``segmentation/``.

They follow the command lines of mmdet's and mmseg's ``tools/train.py`` and ``tools/test.py``
and add what those lack here:

* CPU distributed runs: mmengine's ``pytorch`` launcher calls ``torch.cuda.set_device`` and
  gives DDP ``device_ids``; without a GPU we start the gloo process group ourselves, wrap the
  model with ``device_ids=None`` and turn SyncBN layers of inherited configs into BN.
* Thread count: mmengine (and torchrun) set OMP/MKL threads to 1 per process; we keep the
  process's share of the cores unless the user set ``OMP_NUM_THREADS``.
* Safe checkpoint reading: mmengine 0.10.7 loads its own checkpoints with a bare ``torch.load``,
  which torch ≥ 2.6 refuses (``weights_only``); local checkpoints are read through
  :func:`defmamba.checkpoint.safe_load` instead (``--unsafe-load`` for trusted files with
  other classes; see :mod:`defmamba.mm.checkpoint`).

``count_task_flops`` gives the FLOPs of a detector or segmentor built from one of our configs.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import use_safe_checkpoint_loading

__all__ = ["train", "test", "count_task_flops", "build_task_model", "load_task_config"]


@dataclass(frozen=True)
class _Task:
    """What differs between the detection and the segmentation tools."""

    name: str            # "det" | "seg"
    package: str         # python package that must be installed
    scope: str           # mmengine default scope


TASKS = {
    "det": _Task(name="det", package="mmdet", scope="mmdet"),
    "seg": _Task(name="seg", package="mmseg", scope="mmseg"),
}


def _task(task: str) -> _Task:
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    spec = TASKS[task]
    try:
        __import__(spec.package)
    except ImportError as err:
        raise ImportError(f"{spec.package} is not installed; install the OpenMMLab stack with "
                          "`bash tools/install_mm.sh` (or `make mm`)") from err
    return spec


# ---------------------------------------------------------------- environment


def _cpu_share() -> int:
    """This process's share of the usable cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def configure_threads() -> int:
    """Keep OMP/MKL threads at this process's share of the cores unless the user chose a number.

    ``dist_train.sh``/``dist_test.sh`` export ``OMP_NUM_THREADS`` before torchrun (which would
    otherwise set it to 1); a plain ``python train.py`` gets it here, before mmengine's default
    of 1 can apply.
    """
    threads = int(os.environ.get("OMP_NUM_THREADS") or _cpu_share())
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    return threads


def init_cpu_distributed(launcher: str) -> bool:
    """Start the gloo process group for a CPU run under torchrun; returns True when it did.

    With a GPU, mmengine's own initialisation (NCCL) is used and nothing happens here.
    """
    if launcher == "none" or torch.cuda.is_available():
        return False
    if launcher != "pytorch":
        raise ValueError(f"--launcher {launcher} needs GPUs; on CPU use --launcher pytorch under torchrun "
                         "(dist_train.sh / dist_test.sh) or --launcher none")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("--launcher pytorch expects RANK/WORLD_SIZE from torchrun; start it through "
                           "dist_train.sh / dist_test.sh or use --launcher none")
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return True


def syncbn_to_bn(node: Any) -> Any:
    """Replace every ``type='SyncBN'`` norm config in a (nested) config by plain ``BN``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "type" and value == "SyncBN":
                node[key] = "BN"
            else:
                syncbn_to_bn(value)
    elif isinstance(node, (list, tuple)):
        for item in node:
            syncbn_to_bn(item)
    return node


def _set_ddp_wrapper(cfg: Any) -> None:
    """mmengine's DDP wrapper as it builds it without a ``model_wrapper_cfg`` (no buffer broadcast,
    the config's ``find_unused_parameters``), the gradients kept as views of DDP's all-reduce
    buckets: the reduced buckets are then not copied back, one kernel launch fewer per parameter
    and iteration. What the config's own ``model_wrapper_cfg`` sets is kept."""
    wrapper = dict(cfg.get("model_wrapper_cfg") or {})
    wrapper.setdefault("type", "MMDistributedDataParallel")
    wrapper.setdefault("broadcast_buffers", False)
    wrapper.setdefault("find_unused_parameters", cfg.get("find_unused_parameters", False))
    wrapper.setdefault("gradient_as_bucket_view", True)
    cfg.model_wrapper_cfg = wrapper


def _adapt_to_cpu_distributed(cfg: Any) -> None:
    """DDP (the wrapper of :func:`_set_ddp_wrapper`) without device ids, gloo, and BN instead of
    SyncBN (which needs CUDA)."""
    cfg.model_wrapper_cfg = {**(cfg.get("model_wrapper_cfg") or {}), "device_ids": None}
    env_cfg = dict(cfg.get("env_cfg") or {})
    env_cfg["dist_cfg"] = {**(env_cfg.get("dist_cfg") or {}), "backend": "gloo"}
    cfg.env_cfg = env_cfg
    syncbn_to_bn(cfg.model)
    cfg.pop("sync_bn", None)


# ---------------------------------------------------------------- configs and models


def load_task_config(task: str, config: str, cfg_options: Optional[dict] = None) -> Any:
    """Read one of our configs (``custom_imports`` registers the backbone) and apply overrides."""
    spec = _task(task)
    from mmengine.config import Config

    if not osp.isfile(config):
        raise FileNotFoundError(f"config {config!r} not found; see configs/{'detection' if task == 'det' else 'segmentation'}/")
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if cfg.get("default_scope") is None:
        cfg.default_scope = spec.scope
    return cfg


def build_task_model(task: str, cfg: Any) -> nn.Module:
    """Build the detector/segmentor of a loaded config (weights as initialised, no checkpoint read)."""
    spec = _task(task)
    from mmengine.registry import init_default_scope

    init_default_scope(cfg.get("default_scope", spec.scope))
    if spec.name == "det":
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    return MODELS.build(cfg.model)


# ---------------------------------------------------------------- command lines


def _common_args(parser: argparse.ArgumentParser) -> None:
    from mmengine.config import DictAction

    parser.add_argument("--work-dir", help="directory for logs and checkpoints (default ./work_dirs/<config name>)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default=None,
                        help="override config entries, e.g. model.backbone.drop_path_rate=0.3 "
                             "train_dataloader.batch_size=4")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                        help="job launcher (dist_*.sh pass pytorch)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--unsafe-load", action="store_true",
                        help="read checkpoints with full pickle (only for files you trust: it runs code from the file); "
                             "for the backbone's pretrained file use --cfg-options model.backbone.allow_pickle=True")


def _train_parser(task: str) -> argparse.ArgumentParser:
    kind = "detector" if task == "det" else "segmentor"
    parser = argparse.ArgumentParser(description=f"Train a DefMamba {kind}")
    parser.add_argument("config", help="config file, e.g. configs/"
                        + ("detection/mask-rcnn_defmamba-s_fpn_1x_coco.py" if task == "det"
                           else "segmentation/upernet_defmamba-s_8xb2-160k_ade20k-512x512.py"))
    parser.add_argument("--amp", action="store_true", help="mixed-precision training")
    parser.add_argument("--auto-scale-lr", action="store_true", help="scale the learning rate with the total batch size")
    parser.add_argument("--resume", nargs="?", type=str, const="auto",
                        help="resume from the latest checkpoint in the work dir, or from the given checkpoint")
    parser.add_argument("--autograd-device-thread", action="store_true",
                        help="run each backward on autograd's per-GPU thread (PyTorch's default) instead of the "
                             "training loop's own thread; the hand-over to that thread costs DefMamba much host time")
    _common_args(parser)
    return parser


def _test_parser(task: str) -> argparse.ArgumentParser:
    kind = "detector" if task == "det" else "segmentor"
    parser = argparse.ArgumentParser(description=f"Test (and evaluate) a DefMamba {kind}")
    parser.add_argument("config", help="config file the checkpoint was trained with")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("--out", help=("dump the predictions to this pickle file" if task == "det"
                                       else "directory to write the predicted label maps to"))
    parser.add_argument("--show-dir", help="directory to write images with drawn predictions to")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation (multi-scale + flip) as defined by the config's tta_pipeline/tta_model")
    _common_args(parser)
    return parser


def _prepare(task: str, args: argparse.Namespace) -> Any:
    """Shared set-up of both entry points; returns the config ready for the Runner."""
    configure_threads()
    use_safe_checkpoint_loading(allow_pickle=args.unsafe_load)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    cfg = load_task_config(task, args.config, args.cfg_options)
    cfg.launcher = args.launcher
    if args.launcher != "none":
        _set_ddp_wrapper(cfg)
    if init_cpu_distributed(args.launcher):
        _adapt_to_cpu_distributed(cfg)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    return cfg


def _run(cfg: Any, action: str) -> Any:
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    return getattr(runner, action)()


def train(task: str, argv: Optional[Sequence[str]] = None) -> None:
    """``detection/train.py`` / ``segmentation/train.py``."""
    _task(task)
    args = _train_parser(task).parse_args(argv)
    cfg = _prepare(task, args)
    if args.amp and cfg.optim_wrapper.get("type") != "AmpOptimWrapper":
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.loss_scale = "dynamic"
    if args.auto_scale_lr:
        if "auto_scale_lr" not in cfg or "base_batch_size" not in cfg.auto_scale_lr:
            raise ValueError("--auto-scale-lr needs auto_scale_lr=dict(base_batch_size=...) in the config")
        cfg.auto_scale_lr.enable = True
    if args.resume == "auto":
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    # The loop runs on this thread, so every backward of the run follows this (thread-local) setting.
    with torch.autograd.set_multithreading_enabled(args.autograd_device_thread):
        _run(cfg, "train")


def _enable_drawing(task: str, cfg: Any, show_dir: str) -> None:
    hooks = cfg.default_hooks
    if "visualization" not in hooks:
        raise ValueError("--show-dir needs a 'visualization' hook in default_hooks")
    hooks.visualization.draw = True
    if task == "det":
        hooks.visualization.test_out_dir = show_dir
    else:  # mmseg's hook draws every 50th image by default; --show-dir means all of them
        hooks.visualization.interval = 1
        cfg.visualizer.save_dir = show_dir


def test(task: str, argv: Optional[Sequence[str]] = None) -> dict:
    """``detection/test.py`` / ``segmentation/test.py``; returns the metrics."""
    _task(task)
    args = _test_parser(task).parse_args(argv)
    cfg = _prepare(task, args)
    cfg.load_from = args.checkpoint
    if args.show_dir:
        _enable_drawing(task, cfg, args.show_dir)
    if args.tta:
        if "tta_model" not in cfg or "tta_pipeline" not in cfg:
            raise ValueError(f"--tta needs tta_model and tta_pipeline in {args.config}")
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if args.out:
        if task == "det":
            if not args.out.endswith((".pkl", ".pickle")):
                raise ValueError(f"--out must be a .pkl file, got {args.out}")
            evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
            cfg.test_evaluator = [*evaluators, dict(type="DumpDetResults", out_file_path=args.out)]
        else:
            cfg.test_evaluator.output_dir = args.out
            cfg.test_evaluator.keep_results = True
    return _run(cfg, "test")


# ---------------------------------------------------------------- FLOPs


class _TensorForward(nn.Module):
    """``model._forward`` on an image tensor alone (what fvcore-style counters can trace).

    For a detector this runs backbone, neck, RPN proposals and the RoI heads on them, as
    mmdet's own FLOPs tool does; for a segmentor backbone, neck and decode head.
    """

    def __init__(self, model: nn.Module, task: str, height: int, width: int) -> None:
        super().__init__()
        self.model = model
        self.samples = None
        if task == "det":
            from mmdet.structures import DetDataSample

            sample = DetDataSample()
            sample.set_metainfo(dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width),
                                     batch_input_shape=(height, width), scale_factor=(1.0, 1.0)))
            self.samples = [sample]

    def forward(self, x: torch.Tensor) -> Any:
        return self.model._forward(x, self.samples)


def count_task_flops(task: str, config_path: str, input_shape: Sequence[int]) -> float:
    """FLOPs (multiply-adds counted as one, as fvcore and the paper do) of the detector
    (``task="det"``) or segmentor (``"seg"``) of a config for one image of ``input_shape``
    ((H, W) or (3, H, W); the paper uses 800×1280 for Mask R-CNN and 512×2048 for UperNet).
    """
    from ..flops import count_flops

    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 2:
        shape = (3, *shape)
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (H, W) or (C, H, W), got {tuple(input_shape)}")
    cfg = load_task_config(task, config_path)
    cfg.model.backbone.pop("init_cfg", None)
    cfg.model.backbone.pop("pretrained", None)
    syncbn_to_bn(cfg.model)
    model = build_task_model(task, cfg).eval()
    total, _ = count_flops(_TensorForward(model, task, shape[1], shape[2]), input_size=shape)
    return float(total)
