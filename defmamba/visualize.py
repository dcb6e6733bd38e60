"""See the deformable scan: capture what each ``DS`` layer did for one image and draw it.

:func:`capture_scans` runs a model once with forward hooks on its deformable layers and keeps,
for the first image of the batch, the sampling points, the scan order and the path positions.
:func:`plot_scan` draws one captured layer over the input image as a 2×2 figure:

(a) the sampling offsets, as arrows from each token's reference point to where it samples;
(b) the raster order next to the learned order, each drawn as a path coloured first → last;
(c) how far each token moved in the sequence, |sequence position − raster position|.

Coordinates: the layer's points are in ``grid_sample`` units (``align_corners=True``), where −1
and +1 are the centres of the first and last feature cells. A feature index u (0 … w−1) maps
to the image pixel (u + 0.5)·W/w, the centre of the image patch the cell summarises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .models.deformable import DeformableLayer, DeformableOutput, reference_points
from .ops.permute import invert_permutation

__all__ = ["ScanRecord", "capture_scans", "plot_scan", "scan_figure_name"]

MAX_ARROWS_PER_AXIS = 28  # denser grids show one arrow per k×k tokens so the arrows stay readable
MAX_PATH_TOKENS = 1024  # longer scan paths are too dense to follow; their order is shown by colour only


@dataclass
class ScanRecord:
    """What one deformable layer did for one image (all tensors on the CPU, float64/int64).

    ``sample_points``: (h, w, 2) sampling positions (x, y) in grid units; ``reference_points``:
    the same without offsets; ``order``: (L,) token index at each sequence position; ``path``:
    (L,) predicted path position of each token.
    """

    stage: int
    block: int
    height: int
    width: int
    sample_points: torch.Tensor
    reference_points: torch.Tensor
    order: torch.Tensor
    path: torch.Tensor

    @property
    def sequence_position(self) -> torch.Tensor:
        """(h, w) position of every token in the learned sequence."""
        return invert_permutation(self.order[None])[0].view(self.height, self.width)

    @property
    def sequence_shift(self) -> torch.Tensor:
        """(h, w) |sequence position − raster position| of every token, in tokens."""
        raster = torch.arange(self.height * self.width).view(self.height, self.width)
        return (self.sequence_position - raster).abs()


def _deformable_layers(model: nn.Module) -> dict[tuple[int, int], DeformableLayer]:
    """(stage, block) → the block's deformable layer, found by the model's module names."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, DeformableLayer):
            parts = name.split(".")
            if len(parts) < 4 or parts[0] != "layers" or parts[2] != "blocks":
                raise ValueError(f"deformable layer at unexpected place {name!r}; expected layers.<stage>.blocks.<block>...")
            layers[(int(parts[1]), int(parts[3]))] = module
    if not layers:
        raise ValueError(f"{type(model).__name__} has no deformable (DS) layers to visualise")
    return layers


def capture_scans(model: nn.Module, image: torch.Tensor,
                  blocks: Optional[Sequence[tuple[int, int]]] = None) -> list[ScanRecord]:
    """Run ``model`` on ``image`` (B, 3, H, W) without gradients and record its deformable layers.

    Args:
        model: a DefMamba classifier or backbone (any module whose deformable layers live at
            ``layers.<stage>.blocks.<block>``).
        image: the normalised input batch; only the first image is recorded.
        blocks: the (stage, block) pairs to record; all of them when None.

    Returns:
        One :class:`ScanRecord` per recorded layer, in (stage, block) order.
    """
    available = _deformable_layers(model)
    wanted = sorted(available) if blocks is None else list(blocks)
    missing = [key for key in wanted if key not in available]
    if missing:
        depths = {}
        for stage, block in available:
            depths[stage] = max(depths.get(stage, 0), block + 1)
        raise ValueError(f"no deformable layer at (stage, block) {missing}; the model has stages with depths "
                         f"{[depths[s] for s in sorted(depths)]} (blocks are numbered from 0)")
    records: dict[tuple[int, int], ScanRecord] = {}

    def make_hook(key: tuple[int, int]):
        def hook(module: nn.Module, inputs: tuple, output: DeformableOutput) -> None:
            _, _, h, w = inputs[0].shape
            points = output.sample_points[0].detach().double().cpu()
            reference = reference_points(h, w, points)
            records[key] = ScanRecord(key[0], key[1], h, w, points, reference,
                                      output.order[0].detach().cpu(), output.path[0].detach().double().cpu())
        return hook

    handles = [available[key].register_forward_hook(make_hook(key)) for key in wanted]
    try:
        with torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    return [records[key] for key in wanted]


def scan_figure_name(prefix: str, record: ScanRecord) -> str:
    """File name of the figure of one record: ``<prefix>_stage<i>_block<j>.png``."""
    return f"{prefix}_stage{record.stage}_block{record.block}.png"


def _to_pixels(grid: np.ndarray, size: int, image_size: int) -> np.ndarray:
    """Grid units (align_corners=True over ``size`` cells) → image pixel coordinates."""
    index = (grid + 1) / 2 * (size - 1) if size > 1 else np.zeros_like(grid)
    return (index + 0.5) * image_size / size


def _token_centres(record: ScanRecord, image_shape: tuple[int, int]) -> np.ndarray:
    """(L, 2) image-pixel (x, y) centres of the tokens' patches, in raster order."""
    height, width = image_shape
    ys, xs = np.meshgrid(np.arange(record.height), np.arange(record.width), indexing="ij")
    return np.stack(((xs.ravel() + 0.5) * width / record.width, (ys.ravel() + 0.5) * height / record.height), axis=1)


def _show_image(ax, image: np.ndarray, dim: bool = True) -> None:
    ax.imshow(image, alpha=0.55 if dim else 1.0)
    ax.set_xlim(0, image.shape[1])
    ax.set_ylim(image.shape[0], 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _colorbar(fig, mappable, ax, label: str) -> None:
    bar = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label(label)


def _plot_offsets(fig, ax, image: np.ndarray, record: ScanRecord) -> None:
    """(a) Arrows from reference points to sampling points, exaggerated to a readable length."""
    height, width = image.shape[:2]
    ref = record.reference_points.numpy()
    pts = record.sample_points.numpy()
    ref_x, ref_y = _to_pixels(ref[..., 0], record.width, width), _to_pixels(ref[..., 1], record.height, height)
    pts_x, pts_y = _to_pixels(pts[..., 0], record.width, width), _to_pixels(pts[..., 1], record.height, height)
    dx, dy = pts_x - ref_x, pts_y - ref_y
    cell = min(width / record.width, height / record.height)
    magnitude = np.hypot(dx / (width / record.width), dy / (height / record.height))  # in feature cells
    step = max(1, int(np.ceil(max(record.height, record.width) / MAX_ARROWS_PER_AXIS)))
    keep = (slice(None, None, step), slice(None, None, step))
    longest = max(float(np.hypot(dx, dy)[keep].max()), 1e-12)
    gain = 0.9 * cell * step / longest  # the longest shown arrow spans ~0.9 of the spacing between arrows
    _show_image(ax, image)
    arrows = ax.quiver(ref_x[keep], ref_y[keep], dx[keep] * gain, dy[keep] * gain, magnitude[keep],
                       cmap="plasma", angles="xy", scale_units="xy", scale=1, width=0.004, headwidth=3.5,
                       headlength=4, clim=(0, max(float(magnitude.max()), 1e-6)))
    shown = "every token" if step == 1 else f"one per {step}×{step} tokens"
    ax.set_title(f"(a) sampling offsets (arrows ×{gain:.1f}, {shown})")
    _colorbar(fig, arrows, ax, "offset length (feature cells)")


def _plot_path(fig, ax, image: np.ndarray, record: ScanRecord, order: np.ndarray, title: str) -> None:
    """(b) Every token coloured by its place in the sequence; on grids of up to ``MAX_PATH_TOKENS``
    tokens also the path joining the tokens' centres in sequence order, in the same colours."""
    from matplotlib.collections import LineCollection

    height, width = image.shape[:2]
    length = len(order)
    position = np.empty(length, dtype=np.int64)
    position[order] = np.arange(length)
    _show_image(ax, image)
    draw_path = length <= MAX_PATH_TOKENS
    ranks = ax.imshow(position.reshape(record.height, record.width), cmap="turbo", alpha=0.35 if draw_path else 0.6,
                      extent=(0, width, height, 0), interpolation="nearest", vmin=0, vmax=length - 1)
    centres = _token_centres(record, image.shape[:2])[order]
    if draw_path:
        segments = np.stack((centres[:-1], centres[1:]), axis=1)
        lines = LineCollection(segments, cmap="turbo", linewidths=float(np.clip(60 / max(record.height, record.width), 0.8, 2.5)))
        lines.set_array(np.arange(length - 1) + 0.5)
        lines.set_clim(0, length - 1)
        ax.add_collection(lines)
        ranks = lines  # the colour bar shows the lines' full-strength colours
    else:
        title += f"\n(token colours only: the path is drawn up to {MAX_PATH_TOKENS} tokens)"
    ax.scatter(*centres[0], s=70, marker="o", c="white", edgecolors="black", zorder=3, label="first token")
    ax.scatter(*centres[-1], s=90, marker="X", c="white", edgecolors="black", zorder=3, label="last token")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=9, frameon=False)
    ax.set_title(title)
    _colorbar(fig, ranks, ax, "sequence position (first → last)")


def _plot_shift(fig, ax, image: np.ndarray, record: ScanRecord) -> None:
    """(c) Heat map of |sequence position − raster position| over the image."""
    height, width = image.shape[:2]
    shift = record.sequence_shift.numpy()
    _show_image(ax, image)
    heat = ax.imshow(shift, cmap="magma", alpha=0.65, extent=(0, width, height, 0), interpolation="nearest",
                     vmin=0, vmax=max(int(shift.max()), 1))
    length = record.height * record.width
    ax.set_title(f"(c) token displacement in the sequence (mean {shift.mean():.1f} of {length})")
    _colorbar(fig, heat, ax, "|sequence pos. − raster pos.| (tokens)")


def plot_scan(image: np.ndarray, record: ScanRecord, title: str = ""):
    """Draw one record over ``image`` (H, W, 3 floats in [0, 1]); returns the matplotlib figure.

    The caller saves it (``fig.savefig``) and closes it (``matplotlib.pyplot.close(fig)``).
    """
    import matplotlib.pyplot as plt

    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    fig, axes = plt.subplots(2, 2, figsize=(13, 12 * image.shape[0] / image.shape[1] + 1.2), layout="constrained")
    length = record.height * record.width
    _plot_offsets(fig, axes[0, 0], image, record)
    _plot_shift(fig, axes[0, 1], image, record)
    _plot_path(fig, axes[1, 0], image, record, np.arange(length), "(b) raster scan order (for comparison)")
    _plot_path(fig, axes[1, 1], image, record, record.order.numpy(), "(b) learned deformable scan order")
    heading = f"stage {record.stage}, block {record.block}: {record.height}×{record.width} tokens"
    fig.suptitle(f"{title} — {heading}" if title else heading, fontsize=15)
    return fig
