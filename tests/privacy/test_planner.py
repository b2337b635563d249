"""``fedft privacy plan``: epsilons equal to dp-accounting's own, calibration that meets its target,
and plain advice when the population cannot give useful noise."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fedft.privacy.accounting import record_sample_rate
from fedft.privacy.planner import format_plan, plan_record_level, plan_user_level
from simulations.commands import main


def _rdp(event, count, relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, delta=1e-5):
    acc = rdp.RdpAccountant(neighboring_relation=relation)
    acc.compose(event, count)
    return acc.get_epsilon(delta)


def test_record_level_plan_equals_dp_accounting_composed_by_hand():
    plan = plan_record_level(400, 8, 15, 20, 1e-5, noise_multiplier=1.0)
    assert plan.sample_rate == 1 / 50 == record_sample_rate(400, 8)
    step = dp_accounting.PoissonSampledDpEvent(1 / 50, dp_accounting.GaussianDpEvent(1.0))
    assert plan.epsilon_rdp == pytest.approx(_rdp(step, 15 * 20), rel=1e-9)
    assert plan.epsilon_per_round[4] == pytest.approx(_rdp(step, 15 * 5), rel=1e-9)
    acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(step, 300)
    assert plan.epsilon_pld == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert plan.noise_ratio == 1.0 / 8


def test_user_level_fixed_sampling_is_replace_one_with_half_the_noise_ratio():
    plan = plan_user_level(100, 8, 1e-5, sampled=10, sampling="fixed", noise_multiplier=1.2)
    event = dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(0.6))
    assert plan.epsilon_rdp == pytest.approx(_rdp(event, 8, dp_accounting.NeighboringRelation.REPLACE_ONE), rel=1e-9)
    assert plan.epsilon_pld is None and plan.noise_ratio == pytest.approx(0.12)


def test_a_calibrated_z_meets_the_target_and_no_less_noise_would():
    plan = plan_user_level(1000, 10, 1e-5, rate=0.05, sampling="poisson", target_epsilon=3.0)
    assert 3.0 - 1e-3 <= plan.epsilon_rdp <= 3.0
    looser = plan_user_level(1000, 10, 1e-5, rate=0.05, sampling="poisson",
                             noise_multiplier=plan.noise_multiplier * 0.99)
    assert looser.epsilon_rdp > 3.0
    assert plan.advice == ""  # 50 clients per round: noise std well under a tenth of C


def test_four_institutions_are_told_single_digit_epsilon_is_out_of_reach_and_what_would_reach_it():
    plan = plan_user_level(4, 20, 1e-5, sampled=4, target_epsilon=8.0)
    assert plan.noise_ratio > 1 and plan.advice.startswith("out of reach for useful noise")
    clients = int(plan.advice.split("about ")[1].split(" clients")[0])
    bigger = plan_user_level(clients, 20, 1e-5, sampled=clients, target_epsilon=8.0)
    assert bigger.noise_ratio <= 0.1 and bigger.advice == ""


def test_the_command_prints_the_plan_and_names_a_missing_argument(capsys):
    assert main(["privacy", "plan", "--rounds", "5", "--clients", "4", "--per-round", "4", "--z", "1.0",
                 "--examples", "400", "--batch", "8", "--steps", "15", "--sigma", "1.0", "--params", "157696"]) == 0
    out = capsys.readouterr().out
    assert "user level (DP-FedAvg): 4 clients" in out and "record level (DP-SGD, per client): 400 examples" in out
    expected = format_plan(plan_user_level(4, 5, 1e-5, sampled=4, noise_multiplier=1.0),
                           plan_record_level(400, 8, 15, 5, 1e-5, noise_multiplier=1.0), 157696)
    assert out.strip() == expected
    assert main(["privacy", "plan", "--rounds", "5", "--examples", "400"]) == 2
    assert "needs --batch and --steps" in capsys.readouterr().err
