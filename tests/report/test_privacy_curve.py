"""The privacy-utility curve's points, table and figure (fedft/report/privacy_curve.py) and the
``--epsilons`` sweep's arguments (simulations/sweeps.py)."""

from __future__ import annotations

import pytest

from fedft.config import ConfigError, load_config
from fedft.report.privacy_curve import curve_markdown, curve_point, plot_curve, relative_to_no_dp
from simulations.sweeps import epsilon_config, parse_epsilons, run_dir_name


def _summary(exact_match: float, loss: float, epsilon: float | None) -> dict:
    privacy = {"record_level_max_epsilon": epsilon} if epsilon is not None else None
    return {"final": {"eval_exact_match": exact_match, "eval_loss": loss,
                      "eval_exact_match_by_task": {"date": exact_match, "json": exact_match / 2}},
            "privacy": privacy, "base": {"eval_loss": 5.6}}


def test_points_table_and_figure(tmp_path):
    points = [curve_point(8.0, _summary(0.5, 0.4, 7.99), sigma=0.55), curve_point(None, _summary(0.8, 0.1, None)),
              curve_point(1.0, _summary(0.1, 1.5, 0.99), sigma=1.7)]
    assert points[1]["epsilon"] is None and points[0]["epsilon"] == 7.99 and points[0]["base_eval_loss"] == 5.6
    assert relative_to_no_dp(points) == {8.0: pytest.approx(0.625), 1.0: pytest.approx(0.125)}
    table = curve_markdown(points).splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["1 / 0.99", "8 / 7.99", "no DP"]  # by epsilon
    assert table[3].split("|")[2:7] == [" 0.550 ", " 50.0% ", " 0.62 ", " 0.400 ", " 50 "]
    assert plot_curve(points, tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert relative_to_no_dp([points[0]]) == {}  # no run without DP: no shares


def test_epsilon_arguments_and_configs(tiny_config_path):
    assert parse_epsilons("1, 2,16,off") == [1.0, 2.0, 16.0, None]
    for bad in ("a", "0", "-1", "8,8", "off,OFF", ""):
        with pytest.raises(ConfigError, match="--epsilons"):
            parse_epsilons(bad)
    cfg = load_config(tiny_config_path, ["privacy.dp_sgd_target_epsilon=3", "privacy.user_level=true"])
    private, plain = epsilon_config(cfg, 8.0), epsilon_config(cfg, None)
    assert private.privacy.record_level and private.privacy.dp_sgd_target_epsilon == 8.0
    assert private.privacy.user_level  # the sweep changes the record level only
    assert not plain.privacy.record_level and not plain.privacy.user_level  # off: no DP at all
    assert plain.train == cfg.train and plain.lora == cfg.lora
    assert (run_dir_name(8.0), run_dir_name(0.5), run_dir_name(None)) == ("epsilon-8", "epsilon-0.5", "no-dp")
    baseline = load_config(tiny_config_path, ["strategy.name=centralized"])
    with pytest.raises(ConfigError, match="--epsilons 8: privacy.record_level = True is not allowed"):
        epsilon_config(baseline, 8.0)  # a baseline trains without DP: refused, not silently run without it
