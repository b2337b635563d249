"""Run files: metrics.jsonl rows, curves, and the side-by-side comparison of runs."""

from __future__ import annotations

import pytest

from fedft.report.compare import comparison_markdown, comparison_rows, plot_comparison
from fedft.run.recorder import RunRecorder
from fedft.rundir import atomic_write_json, load_metrics


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
    assert "| fed (fed) | **75.0%** | 75% | 75% | 5 | - | - | - | 12 |" in table
    plot_comparison(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_comparison_names_the_aggregation_and_shows_its_costs(tmp_path):
    atomic_write_json(tmp_path / "svd" / "summary.json", {
        "strategy": "fedavg", "aggregation": "svd", "server_optimizer": "none", "wire_dtype": "float16",
        "config": {"lora": {"client_ranks": [4, 16]}}, "base": _metrics(0.0, 0.0, 0.0),
        "final": _metrics(0.5, 0.5, 0.5), "bytes_up_total": 1_000_000, "bytes_down_total": 1_000_000,
        "mean_bytes_up_per_client": 640_000, "mean_aggregation_error": 0.25,
        "mean_svd_discarded_energy": 0.125, "wall_seconds": 3.0})
    table = comparison_markdown(comparison_rows([tmp_path / "svd"]))
    assert "| fedavg/svd ranks 4,16 float16 (svd) | **50.0%** | 50% | 50% | 2 | 640 | 0.250 | 0.125 | 3 |" in table


def test_comparison_of_a_missing_run_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="is .* a finished fedft run"):
        comparison_rows([tmp_path / "nothing"])


def test_runs_that_differ_only_in_their_seed_share_one_row_with_mean_and_std(tmp_path):
    from fedft.report.seeds import mean_std, seed_statistics, seeds_markdown

    config = {"lora": {"r": 4}, "strategy": {"name": "fedavg"}}
    for seed, em in ((0, 0.5), (1, 0.7), (2, 0.9)):
        atomic_write_json(tmp_path / f"seed-{seed}" / "summary.json", {
            "strategy": "fedavg", "config": {**config, "seed": seed}, "base": _metrics(0.0, 0.0, 0.0),
            "final": _metrics(em, em, 1.0 - em), "bytes_up_total": 1e6, "bytes_down_total": 1e6,
            "wall_seconds": 10 + seed})
    atomic_write_json(tmp_path / "other" / "summary.json", {
        "strategy": "fedavg", "config": {**config, "seed": 0, "lora": {"r": 8}}, "base": _metrics(0.0, 0.0, 0.0),
        "final": _metrics(0.6, 0.6, 0.6), "bytes_up_total": 1e6, "bytes_down_total": 1e6, "wall_seconds": 5})
    runs = [tmp_path / f"seed-{s}" for s in range(3)] + [tmp_path / "other"]
    rows = comparison_rows(runs)
    assert [r["run"] for r in rows] == ["base model", "fedavg, 3 seeds (seed-0, seed-1, seed-2)", "fedavg (other)"]
    assert rows[1]["exact_match"] == pytest.approx(0.7) and rows[1]["exact_match_std"] == pytest.approx(0.2)
    assert rows[1]["seconds"] == pytest.approx(11)
    assert "| fedavg, 3 seeds (seed-0, seed-1, seed-2) | **70.0 ± 20.0%** | 70 ± 20% |" in comparison_markdown(rows)
    assert mean_std([1.0]) == (1.0, 0.0)
    from fedft.rundir import load_summary

    stats = seed_statistics([load_summary(r) for r in runs[:3]])
    assert stats["seeds"] == [0, 1, 2] and stats["exact_match"]["min"] == 0.5
    assert "| mean ± std | **70.0 ± 20.0%** |" in seeds_markdown(stats)
    plot_comparison(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0
