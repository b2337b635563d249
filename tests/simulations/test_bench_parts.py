"""The small benchmarks print their figures (tiny sizes here; the figures themselves come from idle runs)."""

from __future__ import annotations

import re

from simulations import bench_data, bench_dp


def test_data_start_up_prints_the_split_the_slices_and_the_old_cost(tmp_path, capsys):
    result = bench_data.measure(2_000, 20, tmp_path)
    assert result["smallest_partition"] > 0 and result["read_and_split_s"] > 0
    text = "\n".join(bench_data.lines(result))
    assert re.search(r"one read \+ split of the training file: \d+\.\d s", text)
    assert re.search(r"about \d+ min per process \(20 x \d+\.\d s\)", text)


def test_dp_step_ratio_prints_both_step_times(tiny_config_path):
    result = bench_dp.measure(tiny_config_path, batch=4, steps=2, repeats=1)
    assert result["dp_sgd_step_s"] > 0 and result["non_dp_step_s"] > 0
    assert re.fullmatch(r"batch 4: DP-SGD step / non-DP step = \d+\.\d\dx  \(\d+ ms vs \d+ ms, .*\)",
                        bench_dp.line(result))
