"""Images/s and peak memory of DefMamba-T/S/B next to timm peers, in one run on one device.

    python tools/benchmark.py                              # T/S/B + ConvNeXt-T/S + Swin-T/S, batch 128, 224²
    python tools/benchmark.py --backend triton --compile [reduce-overhead] --json out.json
    python tools/benchmark.py --compile token-mixers --modes train_fp16   # main.py --compile's training
    python tools/benchmark.py --cuda-graphs --modes infer_fp16 train_bf16   # host launch cost taken out
    python tools/benchmark.py --host-cost --modes train_fp16 train_bf16 infer_fp16   # eager vs graphed, launches
    python tools/benchmark.py --graphed-training --modes train_fp16 train_bf16   # eager loop, model.set_graphed_training()
    python tools/benchmark.py --device cpu --models defmamba_tiny --peers convnext_tiny \
        --batch-size 2 --image-size 64 --modes infer_fp32 train_bf16 --warmup 1 --repeats 2 --iters 1

Modes: infer_fp32, infer_fp16, infer_bf16 (forward under inference_mode, autocast for the half
types) and train_fp16, train_bf16, train_fp32 (forward + cross-entropy + backward + AdamW step,
fused on the GPU as classification/main.py builds it; fp16 with a GradScaler; the backward on the
loop's own thread, as classification/main.py runs it, unless --autograd-device-thread). Every number is the median of --repeats timed windows of --iters
iterations after --warmup iterations (defmamba.benchmark.measure_throughput, the same function
as `classification/main.py --throughput`). With --cuda-graphs each step (in training: forward,
loss, backward and a fused, capturable AdamW step) is recorded once into a CUDA graph and
replayed, so the numbers show the GPU's own time without the host's Python and launch cost.
With --host-cost every model and mode is measured eager and graphed in the same run, and the
table adds kernel launches per eager step, the host's time to issue one step, the GPU's busy
time per step (profiler) and the eager/graphed ratio (defmamba.benchmark.host_cost).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
from typing import Optional

import torch

from benchmark_helpers import MODES

DEFAULT_MODELS = ["defmamba_tiny", "defmamba_small", "defmamba_base"]
DEFAULT_PEERS = ["convnext_tiny", "convnext_small", "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS, help="DefMamba variants")
    parser.add_argument("--peers", nargs="*", default=DEFAULT_PEERS, help="timm models measured in the same run")
    parser.add_argument("--modes", nargs="+", default=["infer_fp32", "infer_fp16", "infer_bf16", "train_fp16"],
                        choices=sorted(MODES))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "torch"],
                        help="selective-scan backend of the DefMamba models")
    parser.add_argument("--compile", nargs="?", const="default", default=None,
                        choices=["default", "reduce-overhead", "max-autotune", "token-mixers"],
                        help="torch.compile every model before measuring, in this mode (default: 'default'; "
                             "'reduce-overhead' replays CUDA graphs, for host-bound models); 'token-mixers' "
                             "compiles each DefMamba block's DSSM (regional, as main.py --compile trains) "
                             "and leaves the peers eager")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="record each step into one CUDA graph and time its replays (GPU; eager models)")
    parser.add_argument("--graphed-training", action="store_true",
                        help="train the DefMamba models with set_graphed_training(): the plain eager loop, the "
                             "model's forward and backward replayed from CUDA graphs (GPU; peers stay eager)")
    parser.add_argument("--host-cost", action="store_true",
                        help="measure each model eager and graphed, with launches, host ms and GPU ms per step (GPU)")
    parser.add_argument("--autograd-device-thread", action="store_true",
                        help="run every backward on autograd's per-device thread, PyTorch's default; without it the "
                             "loop runs each backward on its own thread (torch.autograd.set_multithreading_enabled("
                             "False)), as classification/main.py and the mm entry points train, for every model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=10, help="untimed iterations")
    parser.add_argument("--repeats", type=int, default=10, help="timed windows (the median is reported)")
    parser.add_argument("--iters", type=int, default=10, help="iterations per timed window")
    parser.add_argument("--json", type=str, default=None, help="write all results to this file")
    args = parser.parse_args(argv)
    if args.host_cost and (args.cuda_graphs or args.compile):
        parser.error("--host-cost measures the eager model and its CUDA graph itself; drop --cuda-graphs/--compile")
    if args.graphed_training and (args.cuda_graphs or args.compile):
        parser.error("--graphed-training replays the models' training forward and backward from CUDA graphs inside "
                     "the eager loop; drop --cuda-graphs/--compile")
    if args.cuda_graphs and args.compile == "reduce-overhead":
        parser.error("--cuda-graphs and --compile reduce-overhead both replay CUDA graphs; choose one")
    for problem in unknown_model_names(args.models, args.peers):  # before any model is measured
        parser.error(problem)
    return args


def unknown_model_names(models: list[str], peers: list[str]) -> list[str]:
    """A message for every name that cannot be built: --models must be DefMamba variants, --peers
    timm model names (with timm's close matches where there are some)."""
    import timm

    problems = [f"--models: unknown DefMamba variant {name!r}; choose from {DEFAULT_MODELS}"
                for name in models if name not in DEFAULT_MODELS]
    for name in peers:
        if name.startswith("defmamba") or not timm.is_model(name):
            close = timm.list_models(f"{name}*")[:5]
            hint = f"; did you mean one of {close}?" if close else " (timm.list_models() lists them)"
            problems.append(f"--peers: {name!r} is not a timm model name{hint}")
    return problems


def environment(device: torch.device) -> dict:
    """Card and software versions, printed with the table and stored in the JSON."""
    import timm

    import defmamba

    env = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
           "defmamba": defmamba.__version__, "device": str(device), "cpu": platform.processor() or platform.machine(),
           "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   driver_capability=f"{props.major}.{props.minor}")
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env


def build(name: str, image_size: int, backend: str) -> torch.nn.Module:
    import timm

    import defmamba

    if name.startswith("defmamba"):
        return defmamba.build_model(name, scan_backend=backend)
    kwargs = {"img_size": image_size} if name.startswith("swin") else {}
    return timm.create_model(name, pretrained=False, **kwargs)


def measure_one(name: str, mode: str, args: argparse.Namespace, device: torch.device) -> dict:
    from defmamba.benchmark import measure_throughput
    from defmamba.cuda_graphs import CudaGraphError

    kind, dtype = MODES[mode]
    model = build(name, args.image_size, args.backend).to(device)
    if args.compile:
        # A fresh compile per model and mode: otherwise the blocks' code, recompiled for every
        # model, dtype and stage shape in one process, reaches Dynamo's recompile limit and the
        # later measurements run uncompiled.
        torch._dynamo.reset()
        if args.compile != "token-mixers":
            model = torch.compile(model, mode=args.compile)
        elif name.startswith("defmamba"):
            from defmamba.regional_compile import compile_token_mixers

            compile_token_mixers(model)
    if args.graphed_training and kind == "train" and name.startswith("defmamba"):
        model.set_graphed_training()
    settings = dict(mode=kind, amp_dtype=dtype, warmup=args.warmup, repeats=args.repeats,
                    iters_per_window=args.iters, device=device)
    try:
        if not args.host_cost:
            return measure_throughput(model, args.batch_size, args.image_size, cuda_graphs=args.cuda_graphs, **settings)
        eager = measure_throughput(model, args.batch_size, args.image_size, with_host_cost=True, **settings)
        graphed = measure_throughput(model, args.batch_size, args.image_size, cuda_graphs=True, **settings)
        return {**eager, "graphed_images_per_s": graphed["images_per_s"],
                "graphed_peak_memory_gib": graphed["peak_memory_gib"],
                "eager_over_graphed": eager["images_per_s"] / graphed["images_per_s"]}
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    except CudaGraphError as err:  # one model that a graph cannot hold does not end the run
        print(f"  {name} {mode}: {err}", file=sys.stderr, flush=True)
        return {"error": "CUDA graph capture failed"}
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def table(results: dict, modes: list[str]) -> str:
    """Markdown table: images/s per mode, and the peak memory of each training mode (GPU)."""
    train_modes = [m for m in modes if m.startswith("train")]
    header = ["model"] + [f"{m} img/s" for m in modes] + [f"{m} peak GiB" for m in train_modes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, by_mode in results.items():
        cells = [name]
        for m in modes:
            r = by_mode.get(m, {})
            cells.append(r["error"] if "error" in r else f"{r['images_per_s']:.1f}")
        for m in train_modes:
            r = by_mode.get(m, {})
            peak = r.get("peak_memory_gib")
            cells.append("-" if peak is None else f"{peak:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def host_cost_table(results: dict, modes: list[str]) -> str:
    """Markdown table of --host-cost: eager and graphed images/s, their ratio, launches, host and GPU ms."""
    lines = ["| model | mode | eager img/s | graphed img/s | eager/graphed | launches/step | host ms/step "
             "| GPU ms/step |", "|---|---|---|---|---|---|---|---|"]
    for name, by_mode in results.items():
        for m in modes:
            r = by_mode.get(m, {})
            if "error" in r:
                lines.append(f"| {name} | {m} | {r['error']} | | | | | |")
                continue
            lines.append(f"| {name} | {m} | {r['images_per_s']:.1f} | {r['graphed_images_per_s']:.1f} | "
                         f"{r['eager_over_graphed']:.2f} | {r['launches_per_step']} | {r['host_ms_per_step']:.1f} | "
                         f"{r['gpu_ms_per_step']:.1f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible; pass --device cpu", file=sys.stderr)
        return 2
    if (args.cuda_graphs or args.host_cost or args.graphed_training) and device.type != "cuda":
        flag = "--cuda-graphs" if args.cuda_graphs else "--host-cost" if args.host_cost else "--graphed-training"
        print(f"error: {flag} needs a CUDA device, got --device {device}; drop {flag}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as in training: cuDNN autotunes the fixed-size convs
    env = environment(device)
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    print(f"batch {args.batch_size}, {args.image_size}², scan backend {args.backend}, compile {args.compile}, "
          f"CUDA graphs {'eager and graphed' if args.host_cost else 'on' if args.cuda_graphs else 'off'}"
          f"{', graphed training (DefMamba)' if args.graphed_training else ''}, "
          f"median of {args.repeats} windows × {args.iters} iterations after {args.warmup} warm-up", flush=True)
    print("every backward runs on " + ("autograd's device thread" if args.autograd_device_thread
                                       else "the calling thread (autograd's device threads off)"), flush=True)
    results: dict = {}
    with torch.autograd.set_multithreading_enabled(args.autograd_device_thread):
        for name in list(args.models) + list(args.peers):
            results[name] = {}
            for mode in args.modes:
                result = measure_one(name, mode, args, device)
                results[name][mode] = result
                shown = result.get("error") or f"{result['images_per_s']:.1f} img/s" + (
                    f", peak {result['peak_memory_gib']:.2f} GiB" if result.get("peak_memory_gib") else "")
                print(f"  {name:32s} {mode:11s} {shown}", flush=True)
    print()
    print(table(results, args.modes))
    if args.host_cost:
        print()
        print(host_cost_table(results, args.modes))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": env, "settings": {k: v for k, v in vars(args).items() if k != "json"},
                       "results": results}, f, indent=2)
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
