"""tools/mm_log_summary.py on run directories laid out as mmengine and tools/device/dense_tasks.sh
write them: medians after warm-up, peak memory, losses, test metrics, error rows."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tool_helpers import load_tool

tool = load_tool("mm_log_summary")


def _write_log(work_dir: Path, timestamp: str, records: list[dict], training: bool) -> None:
    folder = work_dir / timestamp / ("vis_data" if training else "")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{timestamp}.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    if training:  # mmengine writes the same records to scalars.json
        (folder / "scalars.json").write_text((folder / f"{timestamp}.json").read_text())


def _train_records(rng: random.Random, iters: int, interval: int = 10) -> list[dict]:
    return [dict(lr=1e-4, data_time=rng.uniform(0.01, 0.1), loss=rng.uniform(0.5, 3), loss_cls=rng.uniform(0, 1),
                 time=rng.uniform(0.2, 0.6), iter=i, memory=rng.randrange(1000, 30000), step=i)
            for i in range(interval, iters + 1, interval)]


def _median(values: list[float]) -> float:
    assert len(values) % 2 == 1
    return sorted(values)[len(values) // 2]


def test_run_summary_from_mmengine_logs(tmp_path):
    rng = random.Random(7)
    run = tmp_path / "det-defmamba-s"
    _write_log(run / "train", "20260101_000000", _train_records(rng, 50), training=True)  # an older attempt
    records = _train_records(rng, 110)
    _write_log(run / "train", "20260102_000000", records, training=True)
    metrics = {"coco/bbox_mAP": rng.random(), "coco/segm_mAP": rng.random(), "coco/bbox_mAP_50": rng.random()}
    _write_log(run / "test", "20260102_010000", [dict(metrics, data_time=0.01, time=0.1, step=110)], training=False)

    summary = tool.summarise_run(run, warmup=20)
    steady = [r for r in records if r["iter"] > 20]
    train = summary["train"]
    assert summary["status"] == "ok" and train["iters"] == 110 and train["steady_records"] == 9
    assert train["time_s"] == pytest.approx(_median([r["time"] for r in steady]))
    assert train["data_time_s"] == pytest.approx(_median([r["data_time"] for r in steady]))
    times = sorted(r["time"] for r in steady)  # 9 values: the quartiles are the 3rd and the 7th
    assert (train["time_q1_s"], train["time_q3_s"]) == pytest.approx((times[2], times[6]))
    assert train["peak_memory_gib"] == pytest.approx(max(r["memory"] for r in records) / 1024)  # warm-up counts
    assert (train["first_loss"], train["last_loss"]) == (records[0]["loss"], records[-1]["loss"])
    assert summary["metrics"] == {"test": metrics}


def test_table_and_json_with_an_error_row_and_a_cpu_run(tmp_path, capsys):
    rng = random.Random(3)
    seg = tmp_path / "seg-defmamba-s"
    cpu_records = [{k: v for k, v in r.items() if k != "memory"} for r in _train_records(rng, 30)]
    _write_log(seg / "train", "20260102_000000", cpu_records, training=True)
    for test, miou in (("test", 41.5), ("test-tta", 43.25)):
        _write_log(seg / test, "20260102_010000", [dict(aAcc=90.0, mIoU=miou, mAcc=50.0, step=30)], training=False)
    broken = tmp_path / "seg-swin-s"
    (broken / "train").mkdir(parents=True)
    (broken / "error.txt").write_text("train failed (exit 1); last lines of train.log:\nCUDA out of memory\n")

    runs = tool.main([str(seg), str(broken), "--warmup", "20", "--json", str(tmp_path / "s.json"),
                      "--markdown", str(tmp_path / "s.md")])
    table = (tmp_path / "s.md").read_text()
    assert table == capsys.readouterr().out
    header, _, ok_row, error_row = table.splitlines()
    assert "mIoU (test)" in header and "mIoU (test-tta)" in header and "peak GiB" in header
    assert "41.500" in ok_row and "43.250" in ok_row and ok_row.endswith("| ok |")
    assert "| — |" in ok_row  # no memory column values on CPU
    assert error_row.startswith("| seg-swin-s |") and "error: train failed (exit 1)" in error_row
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["runs"] == runs and saved["warmup"] == 20
    assert saved["runs"][0]["train"]["peak_memory_gib"] is None and saved["runs"][1]["train"] is None


def test_missing_run_directory_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tool.main([str(tmp_path / "nope")])
    assert "not a run directory" in capsys.readouterr().err


def _write_test_text_log(work_dir: Path, timestamp: str, times: list[tuple[float, float]]) -> None:
    """A test work dir's text log as mmengine writes it with logger interval 1 and window size 1:
    one progress line per image, then the metrics line (whose time is the mean, not a progress line)."""
    folder = work_dir / timestamp
    folder.mkdir(parents=True, exist_ok=True)
    n = len(times)
    lines = [f"2026/12/04 16:58:54 - mmengine - INFO - Iter(test) [{i:>{len(str(n))}}/{n}]    eta: 0:00:0{i % 10}  "
             f"time: {t:.4f}  data_time: {d:.4f}  memory: 812  " for i, (t, d) in enumerate(times, 1)]
    lines.append(f"2026/12/04 16:58:55 - mmengine - INFO - Iter(test) [{n}/{n}]    aAcc: 90.0000  mIoU: 41.5000  "
                 f"data_time: 9.0000  time: 9.0000")
    (folder / f"{timestamp}.log").write_text("\n".join(lines) + "\n")


def test_test_time_per_image_is_the_median_after_warm_up(tmp_path):
    rng = random.Random(11)
    run = tmp_path / "det-swin-s"
    _write_log(run / "train", "20260102_000000", _train_records(rng, 30), training=True)
    _write_test_text_log(run / "test", "20260101_000000", [(5.0, 5.0)] * 12)  # an older attempt
    times = [(3.0, 2.0)] * 5 + [(round(rng.uniform(0.04, 0.09), 4), round(rng.uniform(0.001, 0.01), 4))
                                for _ in range(15)]
    _write_test_text_log(run / "test", "20260102_010000", times)
    _write_log(run / "test", "20260102_010000", [{"coco/bbox_mAP": 0.25, "time": 0.8, "step": 30}], training=False)

    summary = tool.summarise_run(run, warmup=20, test_warmup=5)
    steady = times[5:]
    assert summary["test_times"]["test"] == dict(images=15, time_s=pytest.approx(_median([t for t, _ in steady])),
                                                 data_time_s=pytest.approx(_median([d for _, d in steady])))
    table = tool.markdown_table([summary])
    header, _, row = table.splitlines()
    assert "s/img (test)" in header.split(" | ")
    assert f"{_median([t for t, _ in steady]):.4f}" in row.split(" | ")
    assert tool.summarise_run(run, warmup=20, test_warmup=20)["test_times"] == {}  # nothing after the warm-up


def test_a_run_cut_off_before_its_first_logged_iteration_is_incomplete(tmp_path):
    run = tmp_path / "seg-swin-t"
    (run / "train" / "20260102_000000").mkdir(parents=True)  # the work dir exists, no record yet
    summary = tool.summarise_run(run, warmup=20)
    assert summary["status"] == "incomplete" and summary["train"] is None
    assert tool.markdown_table([summary]).splitlines()[-1].endswith("| incomplete |")


def test_the_table_shows_the_median_and_quartiles_of_single_iterations(tmp_path):
    """One record per iteration, as dense_tasks.sh logs them: 30 steady iterations of which three
    are slow; the median and quartiles ignore them, and the table shows all three numbers."""
    run = tmp_path / "det-swin-s"
    records = [dict(lr=1e-4, data_time=0.02, loss=1.0, time=0.3 + 0.001 * i, iter=i, memory=2048, step=i)
               for i in range(1, 51)]
    for slow in (30, 40, 50):
        records[slow - 1]["time"] = 2.0
    _write_log(run / "train", "20260102_000000", records, training=True)
    train = tool.summarise_run(run, warmup=20)["train"]
    steady = sorted(r["time"] for r in records[20:])
    assert train["steady_records"] == 30
    assert train["time_s"] == pytest.approx((steady[14] + steady[15]) / 2)
    assert train["time_q1_s"] < train["time_s"] < train["time_q3_s"] < 0.4
    row = tool.markdown_table([tool.summarise_run(run, warmup=20)]).splitlines()[2]
    assert f"| {train['time_s']:.3f} ({train['time_q1_s']:.3f}–{train['time_q3_s']:.3f}) |" in row
