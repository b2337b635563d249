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


def test_record_conversions_print_fedft_against_flower_and_a_rounds_total(tiny_config_path):
    from simulations import bench_records

    result = bench_records.measure(tiny_config_path, repeats=3)
    assert result["tensors"] > 0 and all(result[k] > 0 for k in result if k.endswith("_ms"))
    text = "\n".join(bench_records.lines(result))
    assert re.search(r"^to a record: fedft / Flower = \d+\.\d\dx  \(\d+\.\d\d ms vs \d+\.\d\d ms\)$", text, re.M)
    assert re.search(r"^back to tensors: fedft / Flower = \d+\.\d\dx", text, re.M)
    total = re.search(r"^a round's conversions: (\d+\.\d) ms now .* vs (\d+\.\d) ms with Flower's", text, re.M)
    flower = result["flower_to_record_ms"] + result["flower_from_record_ms"]
    assert total and float(total.group(2)) == round(4 * flower, 1)
