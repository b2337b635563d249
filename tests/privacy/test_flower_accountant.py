"""fedft's user-level accounting against Flower's own RDP accountant (flwr.supercore.privacy_accounting).

Where the two model the same mechanism they must agree: no amplification (Flower's
DifferentialPrivacyServerSideFixedClipping accounts this way) and Poisson client sampling.
For fixed-size sampling without replacement, Flower's event takes the noise multiplier under
replace-one as given; fedft derives it from the server's z as z / 2 (replacing one client's
clipped update moves the sum by up to 2C). Fed the same z, Flower's figure is lower than the
guarantee; fed z / 2 it equals fedft's.
"""

from __future__ import annotations

import pytest
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedft.privacy import accounting

DELTA = 1e-5


def flower_epsilon(method: SamplingMethod, relation: NeighboringRelation, z: float, m: int, n: int,
                   rounds: int) -> float:
    flower = RdpAccountant(PrivacyConfig(target_delta=DELTA, population_size=n, neighboring_relation=relation,
                                         sampling_method=method))
    # ``rounds`` identical releases (Flower's DP strategy composes one per round; the sum is the same)
    flower.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=m, population_size=n), count=rounds)
    return flower.get_epsilon(DELTA)


def fedft_epsilon(sampling: str, z: float, m: int, n: int, rounds: int) -> float:
    return accounting.epsilon([(accounting.dp_fedavg_round_event(n, m / n, z, sampling), rounds)], DELTA, "rdp")


@pytest.mark.parametrize("z, m, n, rounds", [(1.0, 4, 4, 20), (0.8, 10, 100, 50), (2.5, 3, 12, 7)])
def test_no_amplification_agrees(z, m, n, rounds):
    expected = flower_epsilon(SamplingMethod.NO_AMPLIFICATION, NeighboringRelation.ADD_OR_REMOVE_ONE, z, m, n, rounds)
    assert fedft_epsilon("none", z, m, n, rounds) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("z, m, n, rounds", [(1.0, 5, 100, 100), (0.7, 50, 1000, 30)])
def test_poisson_client_sampling_agrees(z, m, n, rounds):
    expected = flower_epsilon(SamplingMethod.POISSON, NeighboringRelation.ADD_OR_REMOVE_ONE, z, m, n, rounds)
    assert fedft_epsilon("poisson", z, m, n, rounds) == pytest.approx(expected, rel=1e-9)


def test_fixed_size_sampling_differs_by_the_replace_one_sensitivity():
    z, m, n, rounds = 1.2, 10, 100, 40
    ours = fedft_epsilon("fixed", z, m, n, rounds)
    same_z = flower_epsilon(SamplingMethod.WITHOUT_REPLACEMENT, NeighboringRelation.REPLACE_ONE, z, m, n, rounds)
    half_z = flower_epsilon(SamplingMethod.WITHOUT_REPLACEMENT, NeighboringRelation.REPLACE_ONE, z / 2, m, n, rounds)
    assert ours == pytest.approx(half_z, rel=1e-9)
    assert same_z < ours / 1.5  # the server's z passed as is would report far less than the guarantee
