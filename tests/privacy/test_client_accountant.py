"""The client-side record-level accountant: history, epsilon, limit check, save/load."""

from __future__ import annotations

import json

import pytest

from fedft.privacy.client_accountant import ClientDeclined, DpSgdRound, RecordLevelAccountant, epsilon_of

ROUND = DpSgdRound(sample_rate=0.2, noise_multiplier=1.0, steps=4)


def test_epsilon_grows_with_each_round_and_is_pinned():
    accountant = RecordLevelAccountant()
    assert accountant.epsilon(1e-5) == 0.0
    for _ in range(3):
        accountant.step(ROUND)
    # dp-accounting's RDP accountant for 12 Poisson-sampled Gaussian steps (q 0.2, sigma 1), delta 1e-5
    assert accountant.epsilon(1e-5) == pytest.approx(6.157039488088101, rel=1e-9)
    assert epsilon_of([ROUND] * 4, 1e-5) > accountant.epsilon(1e-5)


def test_a_round_past_the_limit_is_declined_and_nothing_is_recorded():
    accountant = RecordLevelAccountant([ROUND] * 3)
    after_four = epsilon_of([ROUND] * 4, 1e-5)
    accountant.check(ROUND, 1e-5, after_four + 1e-6)  # within the limit: no error
    accountant.check(ROUND, 1e-5, None)  # no limit
    with pytest.raises(ClientDeclined, match=r"to 6\.87\d > its limit 6\.8 \(spent 6\.157\)"):
        accountant.check(ROUND, 1e-5, 6.8)
    assert accountant.history == [ROUND] * 3


def test_save_and_load_round_trip_through_the_institutions_file(tmp_path):
    path = tmp_path / "state" / "dp-sgd-history.json"
    assert RecordLevelAccountant.load(path).history == []  # no file yet: nothing spent
    accountant = RecordLevelAccountant([ROUND, DpSgdRound(0.1, 2.0, 7)])
    accountant.save(path)
    assert json.loads(path.read_text()) == {"sample_rate": [0.2, 0.1], "noise_multiplier": [1.0, 2.0], "steps": [4, 7]}
    loaded = RecordLevelAccountant.load(path)
    assert loaded.history == accountant.history
    assert loaded.epsilon(1e-5) == accountant.epsilon(1e-5)
    assert RecordLevelAccountant.from_record(accountant.to_record()).history == accountant.history
