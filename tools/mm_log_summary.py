"""Summarise mmengine runs: iteration time and data time (medians after warm-up), peak GPU memory,
the loss at the start and the end, the test metrics and the test time per image, as JSON and a
markdown table.

  python tools/mm_log_summary.py RUN_DIR... [--warmup 20] [--test-warmup 5] [--json FILE] [--markdown FILE]

A run directory (as tools/device/dense_tasks.sh writes them) holds ``train/``, the training work dir,
any number of test work dirs (``test/``, ``test-tta/`` ...), and ``error.txt`` when a step failed.
mmengine logs one JSON record per logged iteration to ``<timestamp>/vis_data/<timestamp>.json`` of a
training work dir (``time``/``data_time`` averaged over the logging window, ``memory`` the peak MiB
since the previous record, on GPU only; dense_tasks.sh logs every iteration, so that the medians
and quartiles are over single iterations) and the metrics of a test to ``<timestamp>/<timestamp>.json``;
the newest timestamp is read. Test times come from the text log ``<timestamp>/<timestamp>.log`` of a test
work dir, one line per image when the test ran with ``default_hooks.logger.interval=1
log_processor.window_size=1`` (as dense_tasks.sh runs it; the test batch is one image).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["read_records", "train_stats", "evaluation_metrics", "test_times", "summarise_run", "markdown_table",
           "main"]

BOOKKEEPING = {"time", "data_time", "step", "iter", "epoch", "memory", "lr", "base_lr"}
TABLE_METRICS = {"coco/bbox_mAP": "box mAP", "coco/segm_mAP": "mask mAP", "mIoU": "mIoU"}
# a progress line of the test loop: "Iter(test) [12/50]    eta: 0:00:03  time: 0.0612  data_time: 0.0021 ..."
_TEST_LINE = re.compile(r"\((?:test)\)\s*\[\s*(\d+)/(\d+)\]\s+eta:.*?\btime: ([0-9.]+)\s+data_time: ([0-9.]+)")


def read_records(work_dir: Path) -> list[dict]:
    """The JSON log records of the newest run in an mmengine work dir ([] when there is none)."""
    runs = sorted(p for p in work_dir.glob("*") if p.is_dir() and any(p.rglob(f"{p.name}.json")))
    if not runs:
        return []
    log = next(runs[-1].rglob(f"{runs[-1].name}.json"))
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    """The first and third quartiles (both the value itself for one value)."""
    if len(values) == 1:
        return values[0], values[0]
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return first, third


def train_stats(records: Sequence[dict], warmup: int) -> Optional[dict]:
    """Medians of time and data_time over the records after ``warmup`` iterations with the quartiles
    of time (how much the step time moves), the peak memory (GiB) over all records, the first and
    last loss; None without training records."""
    train = [r for r in records if "loss" in r and "iter" in r]
    if not train:
        return None
    steady = [r for r in train if r["iter"] > warmup]
    memory = [r["memory"] for r in train if "memory" in r]
    quartiles = _quartiles([r["time"] for r in steady]) if steady else (None, None)
    return dict(
        iters=train[-1]["iter"],
        steady_records=len(steady),
        time_s=statistics.median(r["time"] for r in steady) if steady else None,
        time_q1_s=quartiles[0],
        time_q3_s=quartiles[1],
        data_time_s=statistics.median(r["data_time"] for r in steady) if steady else None,
        peak_memory_gib=max(memory) / 1024 if memory else None,
        first_loss=train[0]["loss"],
        last_loss=train[-1]["loss"],
    )


def evaluation_metrics(records: Sequence[dict]) -> dict:
    """The metrics of the last record that has any (keys other than time, step and the like)."""
    for record in reversed(records):
        metrics = {k: v for k, v in record.items() if k not in BOOKKEEPING and "loss" not in k}
        if metrics:
            return metrics
    return {}


def test_times(work_dir: Path, warmup: int) -> Optional[dict]:
    """Median time and data time per test iteration after ``warmup`` iterations, from the newest
    text log of a test work dir; None when it logged no iteration after the warm-up."""
    logs = sorted(work_dir.glob("*/*.log"))
    if not logs:
        return None
    steady = []
    for line in logs[-1].read_text(errors="replace").splitlines():
        match = _TEST_LINE.search(line)
        if match and int(match.group(1)) > warmup:
            steady.append((float(match.group(3)), float(match.group(4))))
    if not steady:
        return None
    return dict(images=len(steady), time_s=statistics.median(t for t, _ in steady),
                data_time_s=statistics.median(d for _, d in steady))


def summarise_run(run_dir: Path, warmup: int, test_warmup: int = 5) -> dict:
    """One run directory as a dict: name, status, error, train, and per test dir the metrics and the
    test times (:func:`test_times`). The status is 'error' when a step failed (error.txt), 'incomplete'
    when training logged nothing (a run cut off before its first logged iteration), else 'ok'."""
    error = run_dir / "error.txt"
    train = train_stats(read_records(run_dir / "train"), warmup)
    status = "error" if error.is_file() else "incomplete" if train is None else "ok"
    summary = dict(name=run_dir.name, status=status, error=error.read_text().strip() if error.is_file() else None,
                   train=train, metrics={}, test_times={})
    for test_dir in sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("test")):
        metrics = evaluation_metrics(read_records(test_dir))
        if metrics:
            summary["metrics"][test_dir.name] = metrics
        times = test_times(test_dir, test_warmup)
        if times:
            summary["test_times"][test_dir.name] = times
    return summary


def _number(value: Optional[float], digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _time_cell(train: dict) -> str:
    """The median iteration time, its quartiles after it in parentheses."""
    if train.get("time_s") is None:
        return "—"
    return f"{train['time_s']:.3f} ({train['time_q1_s']:.3f}–{train['time_q3_s']:.3f})"


def markdown_table(runs: Sequence[dict]) -> str:
    """One row per run: training measurements (s/iter: the median, its quartiles in parentheses),
    then the headline metric of each test and the test time per image."""
    columns = sorted({(test, key) for run in runs for test, metrics in run["metrics"].items()
                      for key in metrics if key in TABLE_METRICS})
    timed = sorted({test for run in runs for test in run.get("test_times", {})})
    header = ["run", "iters", "s/iter", "data s/iter", "peak GiB", "loss first → last",
              *[f"{TABLE_METRICS[key]} ({test})" for test, key in columns], *[f"s/img ({test})" for test in timed],
              "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        train = run["train"] or {}
        loss = (f"{train['first_loss']:.3f} → {train['last_loss']:.3f}" if train else "—")
        status = ("error: " + run["error"].splitlines()[0].replace("|", "\\|") if run["status"] == "error"
                  else run["status"])
        cells = [run["name"], str(train.get("iters", "—")), _time_cell(train),
                 _number(train.get("data_time_s"), 3), _number(train.get("peak_memory_gib"), 1), loss,
                 *[_number(run["metrics"].get(test, {}).get(key), 3) for test, key in columns],
                 *[_number(run.get("test_times", {}).get(test, {}).get("time_s"), 4) for test in timed], status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--warmup", type=int, default=20, help="iterations left out of the medians (default 20)")
    parser.add_argument("--test-warmup", type=int, default=5,
                        help="test iterations (images) left out of the test-time medians (default 5)")
    parser.add_argument("--json", type=Path, help="write the summary as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.runs if not p.is_dir()]
    if missing:
        parser.error("not a run directory: " + ", ".join(missing))
    runs = [summarise_run(run, args.warmup, args.test_warmup) for run in args.runs]
    table = markdown_table(runs)
    if args.json:
        args.json.write_text(json.dumps(dict(warmup=args.warmup, test_warmup=args.test_warmup, runs=runs), indent=2)
                             + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    print(table, end="")
    return runs


if __name__ == "__main__":
    main(sys.argv[1:])
