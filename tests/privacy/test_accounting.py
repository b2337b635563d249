"""Privacy accounting and ledger: reference epsilons from PRIVACY_NOTES.md, calibration, ledger I/O and audit.

Reference values (delta = 1e-5) are given to 3 decimals, so they are asserted to 1e-3.
Ledger epsilons are compared with dp-accounting's accountants called directly, to 1e-6.
"""

from __future__ import annotations

import dataclasses
import json
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fedft.privacy import accounting, ledger
from fedft.privacy.accounting import (
    calibrate_noise_multiplier,
    dp_fedavg_round_event,
    epsilon,
    record_level_round_event,
    user_level_event,
)
from fedft.privacy.ledger import LedgerError, LedgerRow

DELTA = 1e-5
ROUNDS = (1, 5, 10, 20)


# --- reference values ---------------------------------------------------------------------

@pytest.mark.parametrize(("rounds", "rdp_ref", "pld_ref"),
                         list(zip(ROUNDS, (3.894, 8.231, 11.544, 16.575), (3.534, 7.422, 10.460, 15.123))))
def test_user_level_poisson_reference(rounds, rdp_ref, pld_ref):
    event = user_level_event(num_clients=10, sampled=5, noise_multiplier=1.0, sampling="poisson")
    assert event == dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.0))
    assert epsilon([(event, rounds)], DELTA, "rdp") == pytest.approx(rdp_ref, abs=1e-3)
    assert epsilon([(event, rounds)], DELTA, "pld") == pytest.approx(pld_ref, abs=1e-3)


@pytest.mark.parametrize(("rounds", "ref"), list(zip(ROUNDS, (4.086, 10.384, 16.364, 27.293))))
def test_user_level_fixed_size_without_replacement_reference(rounds, ref):
    event = user_level_event(10, 5, 1.0, "fixed")
    assert event == dp_accounting.SampledWithoutReplacementDpEvent(10, 5, dp_accounting.GaussianDpEvent(1.0))
    assert epsilon([(event, rounds)], DELTA, "rdp") == pytest.approx(ref, abs=1e-3)
    # dp-accounting 0.6 has no PLD for sampling without replacement.
    assert epsilon([(event, rounds)], DELTA, "pld") is None


@pytest.mark.parametrize(("rounds", "ref"), list(zip(ROUNDS, (4.729, 12.302, 19.054, 30.127))))
def test_user_level_no_amplification_reference(rounds, ref):
    event = user_level_event(10, 5, 1.0, "none")
    assert event == dp_accounting.GaussianDpEvent(1.0)
    assert epsilon([(event, rounds)], DELTA, "rdp") == pytest.approx(ref, abs=1e-3)


def test_user_level_many_clients_reference():
    event = user_level_event(1000, 100, 1.0, "poisson")
    assert epsilon([(event, 100)], DELTA, "rdp") == pytest.approx(7.904, abs=1e-3)


def test_dp_sgd_reference():
    step = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0))
    assert epsilon([(step, 1000)], DELTA, "rdp") == pytest.approx(2.101, abs=1e-3)
    assert epsilon([(step, 1000)], DELTA, "pld") == pytest.approx(1.828, abs=1e-3)


@pytest.mark.parametrize(("rounds", "ref"), list(zip(ROUNDS, (1.136, 1.397, 1.653, 2.101))))
def test_record_level_reference(rounds, ref):
    event = record_level_round_event(sample_rate=0.01, noise_multiplier=1.0, steps=50)
    assert epsilon([(event, rounds)], DELTA, "rdp") == pytest.approx(ref, abs=1e-3)


def test_composition_order_and_grouping_do_not_change_epsilon():
    a = record_level_round_event(0.01, 1.0, 50)
    b = record_level_round_event(0.02, 1.5, 30)
    grouped = epsilon([(a, 3), (b, 2)], DELTA)
    interleaved = epsilon([(b, 1), (a, 1), (b, 1), (a, 2)], DELTA)
    assert interleaved == pytest.approx(grouped, abs=1e-12)
    direct = rdp.RdpAccountant()
    direct.compose(a, 3)
    direct.compose(b, 2)
    assert grouped == pytest.approx(direct.get_epsilon(DELTA), abs=1e-12)


def test_dp_fedavg_fixed_event_uses_replace_one_sensitivity():
    # The server adds N(0, (zC)^2) to the sum; replace-one moves the sum by up to 2C.
    assert dp_fedavg_round_event(10, 0.5, 2.0, "fixed") == user_level_event(10, 5, 1.0, "fixed")
    assert dp_fedavg_round_event(10, 0.5, 1.0, "poisson") == user_level_event(10, 5, 1.0, "poisson")
    assert dp_fedavg_round_event(10, 0.3, 1.0, "none") == dp_accounting.GaussianDpEvent(1.0)
    with pytest.raises(ValueError, match="whole number"):
        dp_fedavg_round_event(10, 0.25, 1.0, "fixed")


# --- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "name"), [
    ({"num_clients": 0, "sampled": 1, "noise_multiplier": 1.0, "sampling": "fixed"}, "num_clients"),
    ({"num_clients": 10, "sampled": 11, "noise_multiplier": 1.0, "sampling": "fixed"}, "sampled"),
    ({"num_clients": 10, "sampled": 2.5, "noise_multiplier": 1.0, "sampling": "fixed"}, "sampled"),
    ({"num_clients": 10, "sampled": 5, "noise_multiplier": 0.0, "sampling": "poisson"}, "noise_multiplier"),
    ({"num_clients": 10, "sampled": 5, "noise_multiplier": 1.0, "sampling": "uniform"}, "sampling"),
])
def test_user_level_event_rejects_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        user_level_event(**kwargs)


def test_epsilon_and_record_event_reject_bad_input():
    event = record_level_round_event(0.01, 1.0, 10)
    with pytest.raises(ValueError, match=r"delta = 1\.0 is out of range"):
        epsilon([(event, 1)], 1.0)
    with pytest.raises(ValueError, match="accountant"):
        epsilon([(event, 1)], DELTA, "prv")
    with pytest.raises(ValueError, match="count"):
        epsilon([(event, -1)], DELTA)
    with pytest.raises(ValueError, match="sample_rate"):
        record_level_round_event(1.5, 1.0, 10)
    with pytest.raises(ValueError, match="steps"):
        record_level_round_event(0.01, 1.0, 0)
    mixed = [(user_level_event(10, 5, 1.0, "fixed"), 1), (user_level_event(10, 5, 1.0, "poisson"), 1)]
    with pytest.raises(ValueError, match="replace-one"):
        epsilon(mixed, DELTA)


# --- calibration --------------------------------------------------------------------------

@pytest.mark.parametrize(("target", "sample_rate", "steps", "rounds"),
                         [(3.0, 0.01, 50, 20), (8.0, 0.01, 1000, 1), (1.0, 0.02, 25, 10)])
def test_calibration_round_trip_rdp(target, sample_rate, steps, rounds):
    sigma = calibrate_noise_multiplier(target, DELTA, sample_rate, steps, rounds)

    def eps(s):
        return epsilon([(record_level_round_event(sample_rate, s, steps), rounds)], DELTA)

    assert target - 1e-3 <= eps(sigma) <= target
    assert eps(sigma * (1 - 1e-3)) > target


def test_calibration_matches_opacus_reference():
    # opacus get_noise_multiplier(8, 1e-5, 0.01, 1000 steps, "rdp") = 0.6158 (its own bisection).
    sigma = calibrate_noise_multiplier(8.0, DELTA, 0.01, 1000, 1)
    assert sigma == pytest.approx(0.6158, abs=1e-3)


def test_calibration_round_trip_pld():
    sigma = calibrate_noise_multiplier(2.0, DELTA, 0.01, 100, 5, "pld", pld_discretization=1e-3)
    event = record_level_round_event(0.01, sigma, 100)
    assert 2.0 - 1e-3 <= epsilon([(event, 5)], DELTA, "pld", pld_discretization=1e-3) <= 2.0
    smaller = record_level_round_event(0.01, sigma * (1 - 1e-3), 100)
    assert epsilon([(smaller, 5)], DELTA, "pld", pld_discretization=1e-3) > 2.0


def test_calibration_rejects_bad_target():
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(0.0, DELTA, 0.01, 50, 10)
    with pytest.raises(ValueError, match="rounds"):
        calibrate_noise_multiplier(3.0, DELTA, 0.01, 50, 0)


# --- ledger -------------------------------------------------------------------------------

TARGET = 20.0
CLIENTS = [f"c{i}" for i in range(10)]


def _record(steps, sample_rate=0.01, sigma=1.0):
    return {"sample_rate": sample_rate, "noise_multiplier": sigma, "steps": steps, "epsilon": None}


def _bare_rows(sampling="poisson", z=1.0):
    """Three rounds at N=10, rate 0.5; c4 is sampled in round 2 but drops out, c9 refuses."""
    rounds = [
        (["c0", "c1", "c2", "c3", "c4"], ["c0", "c1", "c2", "c3", "c4"]),
        (["c0", "c4", "c5", "c6", "c7"], ["c0", "c5", "c6", "c7"]),
        (["c1", "c2", "c5", "c8", "c9"], ["c1", "c2", "c5", "c8"]),
    ]
    rows = []
    for number, (sampled, participating) in enumerate(rounds, start=1):
        record = {cid: _record(50 if cid != "c5" else 40) for cid in participating}
        rows.append(LedgerRow(
            round=number, mechanisms=[ledger.USER_LEVEL, ledger.RECORD_LEVEL],
            sampled_clients=sampled, participating_clients=participating, num_clients=10,
            sampling=sampling, sampling_rate=0.5, noise_multiplier=z, clip_norm=1.0, delta=DELTA,
            record_level=record, clipped_fraction=0.25, refusals=["c9"] if number == 3 else [],
        ))
    return rows


def _filled(rows, target=TARGET):
    done = []
    for row in rows:
        done.append(ledger.with_epsilons(done, row, target))
    return done


@pytest.fixture(scope="module")
def honest_rows():
    return _filled(_bare_rows())


def test_ledger_epsilons_equal_direct_dp_accounting(honest_rows):
    last = honest_rows[-1]
    event = dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.0))
    direct_rdp = rdp.RdpAccountant()
    direct_rdp.compose(event, 3)
    direct_pld = pld.PLDAccountant(value_discretization_interval=accounting.PLD_VALUE_DISCRETIZATION)
    direct_pld.compose(event, 3)
    assert last.epsilon_user_rdp == pytest.approx(direct_rdp.get_epsilon(DELTA), abs=1e-6)
    assert last.epsilon_user_pld == pytest.approx(direct_pld.get_epsilon(DELTA), abs=1e-6)
    single = rdp.RdpAccountant()
    single.compose(event, 1)
    assert last.epsilon_round == pytest.approx(single.get_epsilon(DELTA), abs=1e-6)
    assert last.remaining_budget == pytest.approx(TARGET - direct_rdp.get_epsilon(DELTA), abs=1e-6)

    # Record level: c5 trained 40 steps in rounds 2 and 3; c0 50 steps in rounds 1 and 2
    # and is not charged for round 3; c4 dropped out of round 2 and is charged once.
    step = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0))
    for client, row, steps in [("c5", honest_rows[2], 80), ("c0", honest_rows[1], 100),
                               ("c4", honest_rows[0], 50)]:
        direct = rdp.RdpAccountant()
        direct.compose(step, steps)
        assert row.record_level[client]["epsilon"] == pytest.approx(direct.get_epsilon(DELTA), abs=1e-6)
    assert "c4" not in honest_rows[1].record_level


def test_fixed_sampling_ledger_uses_half_z_and_has_no_pld():
    rows = _filled(_bare_rows(sampling="fixed", z=2.0))
    direct = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    direct.compose(dp_accounting.SampledWithoutReplacementDpEvent(10, 5, dp_accounting.GaussianDpEvent(1.0)), 3)
    assert rows[-1].epsilon_user_rdp == pytest.approx(direct.get_epsilon(DELTA), abs=1e-6)
    assert rows[-1].epsilon_user_pld is None
    assert ledger.audit(rows, target_epsilon=TARGET) == []


def test_ledger_append_read_round_trip(tmp_path, honest_rows):
    path = tmp_path / "privacy" / "ledger.jsonl"
    for row in honest_rows:
        ledger.append_row(path, row)
    assert ledger.read_ledger(path) == honest_rows
    first = json.loads(path.read_text().splitlines()[0])
    assert first["round"] == 1 and first["sampling"] == "poisson"
    assert ledger.read_ledger(tmp_path / "absent.jsonl") == []


def test_ledger_refuses_duplicate_and_out_of_order_rounds(tmp_path, honest_rows):
    path = tmp_path / "ledger.jsonl"
    ledger.append_row(path, honest_rows[0])
    ledger.append_row(path, honest_rows[2])
    before = path.read_text()
    with pytest.raises(LedgerError, match="round 3 is already in the ledger"):
        ledger.append_row(path, honest_rows[2])
    with pytest.raises(LedgerError, match="round 2 comes after round 3"):
        ledger.append_row(path, honest_rows[1])
    assert path.read_text() == before


def test_read_ledger_names_file_and_line(tmp_path, honest_rows):
    path = tmp_path / "ledger.jsonl"
    good = json.dumps(honest_rows[0].to_dict())
    path.write_text(good + "\n\n{not json\n")
    with pytest.raises(LedgerError, match=rf"{path}:3: not valid JSON"):
        ledger.read_ledger(path)
    bad = dict(honest_rows[1].to_dict(), sampling="uniform")
    path.write_text(good + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(LedgerError, match=rf"{path}:2: round 2: sampling = 'uniform'"):
        ledger.read_ledger(path)
    extra = dict(honest_rows[1].to_dict(), epsilon_bonus=1.0)
    path.write_text(json.dumps(extra) + "\n")
    with pytest.raises(LedgerError, match=r":1: .*unknown keys \['epsilon_bonus'\]"):
        ledger.read_ledger(path)


def test_ledger_row_validation():
    row = _bare_rows()[0]
    with pytest.raises(LedgerError, match="sampled_clients has 4 ids"):
        dataclasses.replace(row, sampling="fixed", sampled_clients=row.sampled_clients[:4])
    with pytest.raises(LedgerError, match="clip_norm"):
        dataclasses.replace(row, clip_norm=0.0)
    with pytest.raises(LedgerError, match="mechanisms"):
        dataclasses.replace(row, mechanisms=["secure-aggregation"])
    with pytest.raises(LedgerError, match=r"record_level\['c0'\].steps"):
        dataclasses.replace(row, record_level={"c0": _record(-1)})


def test_audit_honest_ledger_and_hand_edit(honest_rows):
    assert ledger.audit(honest_rows, target_epsilon=TARGET) == []
    edited = list(honest_rows)
    second = edited[1]
    record = {cid: dict(entry) for cid, entry in second.record_level.items()}
    record["c5"]["epsilon"] -= 0.1
    edited[1] = dataclasses.replace(second, epsilon_user_rdp=second.epsilon_user_rdp - 0.5,
                                    record_level=record)
    found = ledger.audit(edited, target_epsilon=TARGET)
    assert [(m.round, m.field) for m in found] == [(2, "epsilon_user_rdp"), (2, "record_level[c5].epsilon")]
    assert found[0].recorded == pytest.approx(second.epsilon_user_rdp - 0.5)
    assert found[0].recomputed == pytest.approx(second.epsilon_user_rdp, abs=1e-9)
    assert "round 2: epsilon_user_rdp recorded" in str(found[0])


def test_next_user_epsilon_predicts_the_next_row(honest_rows):
    predicted = ledger.next_user_epsilon(honest_rows[:2], num_clients=10, sampling_rate=0.5,
                                         noise_multiplier=1.0, sampling="poisson", delta=DELTA)
    assert predicted == pytest.approx(honest_rows[2].epsilon_user_rdp, abs=1e-12)
    assert predicted > honest_rows[1].epsilon_user_rdp
    off = dataclasses.replace(honest_rows[0], mechanisms=[ledger.RECORD_LEVEL])
    assert math.isinf(ledger.next_user_epsilon([off], num_clients=10, sampling_rate=0.5,
                                               noise_multiplier=1.0, sampling="poisson", delta=DELTA))


def test_dp_accounting_is_imported_only_when_an_epsilon_is_computed():
    """A run without DP (its server and every client process) does not pay for dp-accounting's import."""
    import subprocess
    import sys

    code = ("import sys; import fedft.privacy.ledger, fedft.run.loop, clients.institution; "
            "print('dp_accounting' in sys.modules); from fedft.privacy import accounting; "
            "e = accounting.record_level_round_event(0.01, 1.0, 10); "
            "print('dp_accounting' in sys.modules, type(e).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "SelfComposedDpEvent"]
