"""Check the OpenMMLab stack that tools/install_mm.sh installed (its last step).

Always: mmengine, mmcv, mmdet and mmseg import, and mmcv's compiled ops run (RoIAlign and nms on
CPU tensors). With --cuda (CUDA ops were wanted: a GPU was visible at install time, or
FORCE_CUDA=1): mmcv's ops must have been compiled with CUDA, and where a GPU is visible, RoIAlign
and nms must run on CUDA tensors and agree with their CPU results. A failed check exits with
status 1 and says why and what to do.

Usage: python tools/check_mm.py [--cuda]
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Optional, Sequence

import torch

REBUILD = "Rebuild with `FORCE_CUDA=1 bash tools/install_mm.sh --force-build`"


class StackCheckError(RuntimeError):
    """The installed stack lacks what was asked of it."""


def compiled_cuda_version() -> Optional[str]:
    """The CUDA version mmcv's ops were compiled with ("12.4"), or None for a CPU-only build
    (mmcv then answers "not available")."""
    from mmcv.ops import get_compiling_cuda_version

    version = str(get_compiling_cuda_version())
    return version if re.fullmatch(r"\d+\.\d+(\.\d+)?", version) else None


def run_ops(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """RoIAlign and nms of mmcv on fixed random inputs on ``device``; the results on the CPU."""
    from mmcv.ops import RoIAlign, nms

    generator = torch.Generator().manual_seed(0)
    features = torch.rand(2, 4, 16, 20, generator=generator)
    corners = torch.rand(6, 2, 2, generator=generator) * torch.tensor([19.0, 15.0])
    boxes = torch.cat((corners.min(dim=1).values, corners.max(dim=1).values + 1.0), dim=1)  # x1, y1, x2, y2
    rois = torch.cat((torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])[:, None], boxes), dim=1)
    scores = torch.rand(6, generator=generator)
    aligned = RoIAlign((3, 3), spatial_scale=1.0, sampling_ratio=2, aligned=True)(features.to(device), rois.to(device))
    _, keep = nms(boxes.to(device), scores.to(device), iou_threshold=0.3)
    return aligned.cpu(), keep.cpu()


def check_stack(want_cuda: bool) -> str:
    """Run the checks; returns a one-line summary or raises :class:`StackCheckError`."""
    try:
        import mmcv
        import mmdet
        import mmengine
        import mmseg
    except ImportError as err:
        raise StackCheckError(f"the OpenMMLab stack does not import ({err}); run `bash tools/install_mm.sh`") from err
    summary = (f"mmengine {mmengine.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}, "
               f"mmseg {mmseg.__version__}")
    try:
        cpu_aligned, cpu_keep = run_ops("cpu")
    except (ImportError, RuntimeError) as err:
        raise StackCheckError(f"mmcv {mmcv.__version__}'s compiled ops do not run ({err}); rebuild them with "
                              "`bash tools/install_mm.sh --force-build`") from err
    if not want_cuda:
        return f"{summary}: ok (CPU ops)"
    cuda = compiled_cuda_version()
    if cuda is None:
        from mmcv.ops import get_compiling_cuda_version

        raise StackCheckError(f"CUDA ops were wanted, but mmcv {mmcv.__version__} was compiled without CUDA "
                              f"(mmcv.ops.get_compiling_cuda_version() says {get_compiling_cuda_version()!r}); "
                              f"Mask R-CNN would fail on a GPU. {REBUILD}")
    if not torch.cuda.is_available():
        return f"{summary}: ok (ops compiled with CUDA {cuda}; no GPU visible, CUDA ops not run)"
    capability = "{}.{}".format(*torch.cuda.get_device_capability())
    try:
        gpu_aligned, gpu_keep = run_ops("cuda")
    except RuntimeError as err:
        raise StackCheckError(f"mmcv's CUDA ops (CUDA {cuda}) fail on this GPU (compute capability {capability}): "
                              f"{err}. Is {capability} in TORCH_CUDA_ARCH_LIST? {REBUILD}") from err
    if not torch.equal(gpu_keep, cpu_keep) or not torch.allclose(gpu_aligned, cpu_aligned, rtol=1e-4, atol=1e-5):
        raise StackCheckError(f"mmcv's CUDA ops disagree with its CPU ops (nms kept {gpu_keep.tolist()} on the GPU, "
                              f"{cpu_keep.tolist()} on the CPU; RoIAlign differs by up to "
                              f"{(gpu_aligned - cpu_aligned).abs().max().item():.2e}). {REBUILD}")
    return f"{summary}: ok (CUDA {cuda} ops run on the GPU, compute capability {capability})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="CUDA ops were wanted: require them (and run them on a GPU)")
    args = parser.parse_args(argv)
    try:
        print(check_stack(want_cuda=args.cuda))
    except StackCheckError as err:
        print(f"check_mm: FAILED: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
