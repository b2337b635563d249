"""DP-FedAvg end to end on Flower's Simulation Engine: ledger, budget stop, audit command."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedft.config import load_config
from fedft.privacy.bookkeeping import LEDGER_FILE
from fedft.privacy.ledger import audit, next_user_epsilon, read_ledger
from fedft.rundir import load_metrics

pytestmark = pytest.mark.slow

Z, C = 0.5, 0.05


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory, tiny_model_dir):
    from simulations.runner import simulate
    from tests.conftest import write_tiny_setup

    d = tmp_path_factory.mktemp("dp")
    write_tiny_setup(d, tiny_model_dir)
    # a budget between the epsilon after 2 rounds and after 3: the run must stop after round 2
    common = dict(num_clients=2, sampling_rate=1.0, noise_multiplier=Z, sampling="fixed", delta=1e-5)
    from fedft.privacy.ledger import LedgerRow, with_epsilons

    rows = []
    for r in (1, 2):
        rows.append(with_epsilons(rows, LedgerRow(
            round=r, mechanisms=["user-dp-fedavg"], sampled_clients=["a", "b"],
            participating_clients=["a", "b"], num_clients=2, sampling="fixed", sampling_rate=1.0,
            noise_multiplier=Z, clip_norm=C, delta=1e-5)))
    eps2, eps3 = rows[-1].epsilon_user_rdp, next_user_epsilon(rows, **common)
    target = (eps2 + eps3) / 2
    cfg = load_config(d / "tiny.toml", [
        "strategy.num_rounds=4", "strategy.eval_every=0", "strategy.aggregation=ffa",
        "privacy.user_level=true", f"privacy.noise_multiplier={Z}", f"privacy.clip_norm={C}",
        f"privacy.target_epsilon={target}", "privacy.noise_seed=3", "privacy.canaries=8",
    ])
    summary = simulate(cfg, d / "run")  # the federation's own process warns about the fixed seed
    return d / "run", summary, target


def test_dp_run_stops_before_the_round_that_would_exceed_the_budget(dp_run):
    run, summary, target = dp_run
    rows = read_ledger(run / LEDGER_FILE)
    assert [r.round for r in rows] == [1, 2]
    assert rows[-1].epsilon_user_rdp <= target
    assert summary["privacy"]["stopped_by_budget"].startswith("privacy budget: round 3 would bring")
    assert summary["rounds"] == 2
    metrics = load_metrics(run)
    assert metrics[-1]["round"] == 2 and "eval_exact_match" in metrics[-1]  # final state evaluated
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_canary_audit_runs_after_training_and_is_reported_beside_the_formal_epsilon(dp_run):
    run, summary, _ = dp_run
    audit_file = json.loads((run / "canary_audit.json").read_text())
    assert audit_file == summary["canary_audit"]
    assert audit_file["canaries"] == 8 and audit_file["guesses"] == 4
    assert 0 <= audit_file["correct_guesses"] <= 4 and audit_file["epsilon_lower_bound"] >= 0
    assert summary["privacy"]["epsilon_user_rdp"] > 0


def test_ledger_rows_are_complete_and_match_a_fresh_recomputation(dp_run):
    run, _, target = dp_run
    rows = read_ledger(run / LEDGER_FILE)
    for row in rows:
        assert len(row.sampled_clients) == 2 and row.participating_clients == row.sampled_clients
        assert row.noise_multiplier == Z and row.clip_norm == C and row.sampling == "fixed"
        assert 0.0 <= row.clipped_fraction <= 1.0
        assert row.remaining_budget == pytest.approx(target - row.epsilon_user_rdp)
    assert audit(rows, target_epsilon=target) == []
    # each checkpoint carries the ledger as of its round
    assert len(read_ledger(run / "checkpoints" / "round-002" / LEDGER_FILE)) == 2


def test_updates_are_clipped_and_the_noised_adapter_moves(dp_run):
    run, _, _ = dp_run
    first = load_file(run / "checkpoints" / "round-001" / "adapter_model.safetensors")
    second = load_file(run / "checkpoints" / "round-002" / "adapter_model.safetensors")
    b_keys = [k for k in first if ".lora_B." in k]
    assert any(not torch.equal(first[k], second[k]) for k in b_keys)
    rows = read_ledger(run / LEDGER_FILE)
    assert rows[0].clipped_fraction == 1.0  # C = 0.05 is far below a round's update norm


def test_privacy_report_command_passes_an_honest_ledger_and_flags_an_edited_one(dp_run, tmp_path, capsys):
    import shutil

    from simulations.cli import main

    run, _, _ = dp_run
    assert main(["privacy", "report", str(run), "--json", "--plot", str(tmp_path / "eps.png")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mismatches"] == [] and len(report["rows"]) == 2
    assert (tmp_path / "eps.png").stat().st_size > 1000

    edited = tmp_path / "edited"
    shutil.copytree(run, edited)
    lines = (edited / LEDGER_FILE).read_text().splitlines()
    row = json.loads(lines[1])
    row["epsilon_user_rdp"] = row["epsilon_user_rdp"] / 2  # someone under-reports the spend
    lines[1] = json.dumps(row)
    (edited / LEDGER_FILE).write_text("\n".join(lines) + "\n")
    assert main(["privacy", "report", str(edited)]) == 1
    out = capsys.readouterr().out
    assert "epsilon_user_rdp" in out and "differ from the recomputation" in out


@pytest.fixture(scope="module")
def dpsgd_run(tmp_path_factory, tiny_model_dir):
    """Both mechanisms on; institution 0 holds 16 rows (q = 1/2), institution 1 holds 40 (q = 1/5)."""
    from fedft.demo.tasks import make_demo_rows
    from simulations.runner import simulate
    from tests.conftest import write_tiny_setup

    d = tmp_path_factory.mktemp("dpsgd")
    rows = make_demo_rows(2, 40, 0.9, seed=0)
    small = [r for r in rows if r["institution"] == "inst0"][:16]
    write_tiny_setup(d, tiny_model_dir, small + [r for r in rows if r["institution"] == "inst1"])
    cfg = load_config(d / "tiny.toml", [
        "strategy.num_rounds=3", "strategy.eval_every=0", "strategy.min_train_nodes=1",
        "privacy.user_level=true", f"privacy.noise_multiplier={Z}", f"privacy.clip_norm={C}",
        "privacy.record_level=true", "privacy.dp_sgd_noise_multiplier=1.0", "privacy.dp_sgd_clip_norm=1.0",
        "privacy.client_max_epsilon=8.0", "privacy.noise_seed=5",
    ])
    simulate(cfg, d / "run")
    return d / "run"


def test_dp_sgd_charges_each_client_for_the_rounds_it_trained_and_a_client_declines_at_its_limit(dpsgd_run):
    from fedft.privacy.client_accountant import DpSgdRound, epsilon_of

    rows = read_ledger(dpsgd_run / LEDGER_FILE)
    assert [r.round for r in rows] == [1, 2, 3]
    assert all(r.mechanisms == ["user-dp-fedavg", "record-dp-sgd"] for r in rows)
    first = rows[0].record_level
    assert sorted(e["sample_rate"] for e in first.values()) == [0.2, 0.5]
    small = next(cid for cid, e in first.items() if e["sample_rate"] == 0.5)
    big = next(cid for cid in first if cid != small)
    # the q = 1/2 client would reach 10.33 > 8 in round 2: it declines, and the server records it
    assert rows[1].refusals == [small] and rows[2].refusals == [small]
    assert small not in rows[1].record_level and rows[1].participating_clients == [big]
    # the other client is charged for exactly its three rounds, as dp-accounting composes them
    assert rows[2].record_level[big]["epsilon"] == pytest.approx(
        epsilon_of([DpSgdRound(0.2, 1.0, 4)] * 3, 1e-5), abs=1e-6)
    assert audit(rows) == []


def test_a_plan_made_before_the_run_agrees_with_its_ledger(dpsgd_run):
    from fedft.privacy.planner import plan_record_level, plan_user_level

    rows = read_ledger(dpsgd_run / LEDGER_FILE)
    user = plan_user_level(2, 3, 1e-5, sampled=2, sampling="fixed", noise_multiplier=Z)
    assert [r.epsilon_user_rdp for r in rows] == pytest.approx(user.epsilon_per_round, abs=1e-9)
    big = next(cid for cid, e in rows[0].record_level.items() if e["sample_rate"] == 0.2)
    record = plan_record_level(40, 8, 4, 3, 1e-5, noise_multiplier=1.0)  # institution 1: 40 rows, batches of 8
    assert [r.record_level[big]["epsilon"] for r in rows] == pytest.approx(record.epsilon_per_round, abs=1e-9)


def test_dp_sgd_and_dp_fedavg_still_train_the_adapter(dpsgd_run):
    first = load_file(dpsgd_run / "checkpoints" / "round-001" / "adapter_model.safetensors")
    last = load_file(dpsgd_run / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(first[k], last[k]) for k in first)


def test_poisson_client_sampling_is_accounted_with_rdp_and_pld(tmp_path, tiny_config_path, capfd):
    from fedft.privacy import accounting
    from simulations.runner import simulate

    cfg = load_config(tiny_config_path, [
        "strategy.num_rounds=3", "strategy.eval_every=0", "privacy.user_level=true",
        f"privacy.noise_multiplier={Z}", f"privacy.clip_norm={C}", "privacy.client_sampling=poisson",
        "privacy.client_sampling_rate=0.5", "privacy.noise_seed=2"])
    simulate(cfg, tmp_path / "run")
    assert "DP noise uses a FIXED seed" in capfd.readouterr().err  # said loudly on the console, from the federation
    rows = read_ledger(tmp_path / "run" / LEDGER_FILE)
    assert [r.round for r in rows] == [1, 2, 3]
    assert all(r.sampling == "poisson" and r.sampling_rate == 0.5 for r in rows)
    assert all(r.epsilon_user_pld is not None and r.epsilon_user_pld < r.epsilon_user_rdp for r in rows)
    event = accounting.user_level_event(2, 1.0, Z, "poisson")
    assert rows[-1].epsilon_user_rdp == pytest.approx(accounting.epsilon([(event, 3)], 1e-5, "rdp"), abs=1e-6)
    assert audit(rows) == []
