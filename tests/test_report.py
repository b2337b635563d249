"""Run files: metrics.jsonl rows, curves, and the side-by-side comparison of runs."""

from __future__ import annotations

import pytest

from fedft.checkpoint import atomic_write_json
from fedft.report import (RunRecorder, comparison_markdown, comparison_rows, load_metrics,
                          plot_comparison)


def _metrics(em, date, units):
    return {"eval_loss": 1.0, "eval_exact_match": em,
            "eval_exact_match_by_task": {"date": date, "units": units}}


def test_recorder_rewrites_metrics_and_plots(tmp_path):
    recorder = RunRecorder(tmp_path)
    recorder.add_round({"round": 0, "train_loss": None, **_metrics(0.0, 0.0, 0.0), "seconds": 1})
    recorder.add_round({"round": 1, "train_loss": 2.0, **_metrics(0.5, 0.6, 0.4), "seconds": 1})
    assert [r["round"] for r in load_metrics(tmp_path)] == [0, 1]
    path = recorder.plot("t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comparison_table_and_chart(tmp_path):
    for name, em in (("fed", 0.75), ("central", 0.9)):
        atomic_write_json(tmp_path / name / "summary.json", {
            "strategy": name, "base": _metrics(0.0, 0.0, 0.0), "final": _metrics(em, em, em),
            "bytes_up_total": 2_000_000, "bytes_down_total": 3_000_000, "wall_seconds": 12.0})
    rows = comparison_rows([tmp_path / "fed", tmp_path / "central"])
    assert [r["run"] for r in rows] == ["base model", "fed (fed)", "central (central)"]
    table = comparison_markdown(rows)
    assert "| fed (fed) | **75.0%** | 75% | 75% | 5 | 12 |" in table
    plot_comparison(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_comparison_of_a_missing_run_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="is .* a finished fedft run"):
        comparison_rows([tmp_path / "nothing"])
