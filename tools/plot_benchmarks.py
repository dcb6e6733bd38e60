"""Images/s against peak memory, one panel per mode, from a ``tools/benchmark.py --json`` file.

    python tools/plot_benchmarks.py docs/results/models_h100_round7_cuda_graphs.json \
        --date 2026-11-27 --out docs/throughput_vs_memory.png
    python tools/plot_benchmarks.py graphs.json --modes train_fp16 infer_fp16 --out plot.png

Each panel is one mode of the run (train_fp16, infer_fp32, ...): x is the peak GPU memory of that
mode in GiB, y the median images/s, one labelled marker per model; DefMamba is drawn in red and
larger, each model family (DefMamba, Swin, ConvNeXt) joined by a thin line. A ``--host-cost`` run
holds each mode eager and graphed: it gets two panels per mode on the same scales. The title names
the card, the date, batch and image size, and whether the steps ran eager, replayed from CUDA
graphs or compiled; the footer names the JSON. Keys the tool does not know (launch counts, host
times, ...) are ignored, so newer benchmark files plot as well. Needs matplotlib.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NamedTuple, Optional

__all__ = ["BenchmarkFileError", "Point", "display_name", "load_run", "main", "plot_run", "points_by_mode"]

_FAMILIES = {"defmamba": "DefMamba", "convnext": "ConvNeXt", "swin": "Swin"}
_SIZES = {"tiny": "T", "small": "S", "base": "B", "large": "L"}
_COLOURS = {"DefMamba": "tab:red", "Swin": "tab:blue", "ConvNeXt": "tab:green"}


class BenchmarkFileError(ValueError):
    """The file is not a ``tools/benchmark.py --json`` result this tool can plot."""


class Point(NamedTuple):
    """One model in one mode: where its marker goes."""

    model: str
    peak_memory_gib: float
    images_per_s: float


# Where a result keeps its images/s and peak memory: the measurement itself, and in a --host-cost
# run also the graphed replay of the same step.
_EAGER_OR_ONLY = ("", "images_per_s", "peak_memory_gib")
_GRAPHED = (" graphed", "graphed_images_per_s", "graphed_peak_memory_gib")


def display_name(model: str) -> tuple[str, str]:
    """(family, label) of a benchmark model name: 'swin_tiny_patch4_window7_224' → ('Swin', 'Swin-T')."""
    parts = model.split("_")
    family = _FAMILIES.get(parts[0])
    if family is None or len(parts) < 2 or parts[1] not in _SIZES:
        return model, model
    return family, f"{family}-{_SIZES[parts[1]]}"


def load_run(path: Path) -> dict[str, Any]:
    """The parsed JSON of ``path``, checked to hold a ``results`` mapping of model → mode → result."""
    if not path.is_file():
        raise BenchmarkFileError(f"{path}: no such file; write one with `python tools/benchmark.py --json {path}`")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BenchmarkFileError(f"{path}: not valid JSON ({err}); expected the file `tools/benchmark.py --json` "
                                 f"writes") from err
    results = run.get("results") if isinstance(run, dict) else None
    if not isinstance(results, dict) or not results:
        raise BenchmarkFileError(f"{path}: no 'results' mapping of model → mode → measurement; this is not a "
                                 f"`tools/benchmark.py --json` file (or the run measured nothing)")
    for model, by_mode in results.items():
        if not isinstance(by_mode, dict):
            raise BenchmarkFileError(f"{path}: results[{model!r}] is {type(by_mode).__name__}, expected a mapping "
                                     f"of mode → measurement")
    return run


def points_by_mode(run: dict[str, Any], modes: Optional[list[str]] = None) -> dict[str, list[Point]]:
    """Markers per panel, in the run's mode order, keyed 'train_fp16' (or, for a --host-cost run,
    'train_fp16 eager' and 'train_fp16 graphed'). A panel without a single peak-memory figure (CPU
    runs record none) is left out, and so are failed measurements ({"error": ...})."""
    results: dict[str, dict] = run["results"]
    known = list(run.get("settings", {}).get("modes") or [])
    known += [mode for by_mode in results.values() for mode in by_mode if mode not in known]
    if modes:
        unknown = [mode for mode in modes if mode not in known]
        if unknown:
            raise BenchmarkFileError(f"modes {unknown} are not in this run; it has {known}")
        known = list(modes)
    both = bool(run.get("settings", {}).get("host_cost"))
    panels: dict[str, list[Point]] = {}
    for mode in known:
        for suffix, speed_key, peak_key in (_EAGER_OR_ONLY, _GRAPHED):
            points = []
            for model, by_mode in results.items():
                result = by_mode.get(mode)
                if not isinstance(result, dict) or "error" in result:
                    continue
                peak, speed = result.get(peak_key), result.get(speed_key)
                if peak is not None and speed is not None:
                    points.append(Point(model, float(peak), float(speed)))
            if points:
                panels[mode + (suffix or (" eager" if both else ""))] = points
    if not panels:
        raise BenchmarkFileError(f"no result of modes {known} has both images_per_s and peak_memory_gib; peak "
                                 f"memory is recorded on GPU runs only")
    return panels


def _how_it_ran(settings: dict[str, Any]) -> str:
    if settings.get("host_cost"):
        return "eager and CUDA graphs"
    if settings.get("cuda_graphs"):
        return "CUDA graphs"
    if settings.get("compile"):
        return f"torch.compile ({settings['compile']})"
    return "eager"


def _title(run: dict[str, Any], date: Optional[str]) -> str:
    env, settings = run.get("environment", {}), run.get("settings", {})
    card = env.get("gpu") or env.get("device") or "unknown device"
    date = date or run.get("date") or env.get("date")
    size = settings.get("image_size")
    shape = ", ".join(part for part in (
        f"batch {settings['batch_size']}" if settings.get("batch_size") else "",
        f"{size}²" if size else "", _how_it_ran(settings)) if part)
    head = f"{card}, {date}" if date else card
    return f"Throughput against peak memory: {head}\n{shape}"


def _draw_panel(ax, title: str, points: list[Point], x_max: float, y_max: float) -> None:
    families: dict[str, list[Point]] = {}
    for point in points:
        families.setdefault(display_name(point.model)[0], []).append(point)
    for family, members in families.items():
        ours = family == "DefMamba"
        colour = _COLOURS.get(family, "tab:gray")
        members = sorted(members, key=lambda p: p.peak_memory_gib)
        if len(members) > 1:
            ax.plot([p.peak_memory_gib for p in members], [p.images_per_s for p in members], color=colour,
                    linewidth=1.2 if ours else 0.8, alpha=0.6, zorder=1)
        ax.scatter([p.peak_memory_gib for p in members], [p.images_per_s for p in members], color=colour,
                   marker="*" if ours else "o", s=220 if ours else 60, edgecolors="black", linewidths=0.5,
                   zorder=3 if ours else 2)
    ax.set_title(title.replace("_", " "), fontsize=11)
    ax.set_xlabel("peak memory (GiB)")
    ax.set_ylabel("images/s")
    ax.set_xlim(left=0, right=x_max * 1.2)
    ax.set_ylim(bottom=0, top=y_max * 1.15)
    ax.grid(True, alpha=0.3)
    ax.text(0.02, 0.97, "better ↖", transform=ax.transAxes, fontsize=8, color="gray", va="top")


# Label positions tried in turn (offset in points, horizontal alignment) until one stays inside the
# panel and overlaps no other label and no marker.
_LABEL_SPOTS = (((7, 5), "left"), ((7, -13), "left"), ((-7, 5), "right"), ((-7, -13), "right"),
                ((0, 11), "center"), ((0, -19), "center"))


def _label_points(ax, points: list[Point], renderer) -> None:
    """Name every marker, DefMamba first, each label inside the panel where it covers no other label or marker."""
    marker_radius = 8 * ax.figure.dpi / 72
    markers = {point: ax.transData.transform((point.peak_memory_gib, point.images_per_s)) for point in points}
    frame = ax.get_window_extent(renderer)
    taken: list = []
    for point in sorted(points, key=lambda p: display_name(p.model)[0] != "DefMamba"):
        family, label = display_name(point.model)
        ours = family == "DefMamba"
        first = None
        for offset, align in _LABEL_SPOTS:
            text = ax.annotate(label, (point.peak_memory_gib, point.images_per_s), xytext=offset,
                               textcoords="offset points", ha=align, fontsize=9,
                               fontweight="bold" if ours else "normal",
                               color=_COLOURS.get(family, "black") if ours else "black")
            box = text.get_window_extent(renderer).expanded(1.05, 1.1)
            hits_marker = any(
                box.x0 - marker_radius < x < box.x1 + marker_radius and box.y0 - marker_radius < y < box.y1 + marker_radius
                for other, (x, y) in markers.items() if other is not point)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not hits_marker and not any(box.overlaps(other) for other in taken):
                taken.append(box)
                if first is not None:
                    first.remove()
                break
            if first is None:
                first = text
            else:
                text.remove()
        else:  # no free spot: keep the first one
            taken.append(first.get_window_extent(renderer))


def plot_run(run: dict[str, Any], modes: Optional[list[str]] = None, date: Optional[str] = None,
             source: Optional[str] = None):
    """The figure (one panel per mode with peak memory, two for a --host-cost run); the caller
    saves and closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = points_by_mode(run, modes)
    columns = min(2, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 4.6 * rows), squeeze=False)
    by_mode: dict[str, list[Point]] = {}  # the eager and graphed panels of a mode share their scales
    for title, points in panels.items():
        by_mode.setdefault(title.split(" ")[0], []).extend(points)
    for ax, (title, points) in zip(axes.flat, panels.items()):
        same_mode = by_mode[title.split(" ")[0]]
        _draw_panel(ax, title, points, x_max=max(p.peak_memory_gib for p in same_mode),
                    y_max=max(p.images_per_s for p in same_mode))
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(_title(run, date), fontsize=12)
    if source:
        fig.text(0.99, 0.005, f"data: {source}", ha="right", va="bottom", fontsize=8, color="gray")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    renderer = fig.canvas.get_renderer()
    for ax, points in zip(axes.flat, panels.values()):
        _label_points(ax, points, renderer)
    return fig


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="a file written by `tools/benchmark.py --json`")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--modes", nargs="+", default=None, help="panels to draw (default: every mode with memory)")
    parser.add_argument("--date", default=None, help="date of the run for the title (the JSON records none)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: matplotlib is not installed; `pip install matplotlib`", file=sys.stderr)
        return 2
    try:
        run = load_run(args.json)
        fig = plot_run(run, args.modes, args.date, source=args.json.as_posix())
    except BenchmarkFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import matplotlib.pyplot as plt

    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
