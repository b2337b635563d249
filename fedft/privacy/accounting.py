"""Pure privacy accounting over Google's dp-accounting: parameters in, events and epsilons out.

Two guarantees are accounted here (the README's privacy section explains them;
tests/privacy/test_accounting.py pins reference values computed with dp-accounting directly):
user-level DP-FedAvg (one privacy unit = one client) and record-level DP-SGD inside a client
(one privacy unit = one training example). Every function is pure and cheap to call again;
nothing here holds state, does I/O, or imports Flower, torch or Opacus, so the ledger can
recompute any epsilon it ever recorded.

Neighbouring relations. dp-accounting's ``noise_multiplier`` is always the noise standard
deviation divided by the L2 sensitivity *under the neighbouring relation in force*:
Poisson sampling and no sampling are analysed under add/remove-one; fixed-size sampling
without replacement (what Flower's FedAvg does) only under replace-one. ``user_level_event``
takes that raw ratio. ``dp_fedavg_round_event`` takes the server's z (noise std on the sum
of clipped updates divided by the clip norm C) and converts it: replacing one client's
update u by u' moves the sum by ``u' - u``, up to 2C, so the replace-one ratio is z / 2.

PLD accountant. dp-accounting 0.6's ``PLDAccountant`` has no privacy loss distribution for
``SampledWithoutReplacementDpEvent``; ``epsilon(..., accountant="pld")`` returns None for any
composition containing one, rather than a number for a different sampling scheme.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dp_accounting


@functools.cache
def _dp():
    """dp-accounting, imported on first use: a run without differential privacy (and every
    client and server process it starts) does not pay for its import (scipy among it)."""
    import dp_accounting

    return dp_accounting


SAMPLING_SCHEMES = ("fixed", "poisson", "none")
ACCOUNTANTS = ("rdp", "pld")
# dp-accounting's default PLD grid. The PLD answer is a pessimistic (upper) bound whose
# excess shrinks with the interval: for DP-SGD q=0.01, sigma=1, 1000 steps it is 1.82824 at
# 1e-4 (about 0.5 s) and 1.82893 at 1e-3 (about 0.05 s). The time is spent building the
# PLD once per distinct event, so it hardly depends on the number of compositions.
PLD_VALUE_DISCRETIZATION = 1e-4
# Replace-one sensitivity of a sum of updates clipped to norm C, in units of C.
REPLACE_ONE_SENSITIVITY_FACTOR = 2.0

EventCounts = Sequence[tuple["dp_accounting.DpEvent", int]]


# --- validation -----------------------------------------------------------------------------

def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f"{low} <= {name}" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{name} = {value} is out of range; allowed: {allowed}")
    return int(value)


def _check_real(name: str, value, low: float, high: float, *, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name} = {value} is out of range; allowed: {left}{low}, {high}{right}")
    return float(value)


def _check_choice(name: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} = {value!r} is not one of {', '.join(map(repr, allowed))}")
    return value


def _check_noise(name: str, value) -> float:
    return _check_real(name, value, 0.0, math.inf, low_open=True, high_open=True)


# --- events ---------------------------------------------------------------------------------

def user_level_event(num_clients: int, sampled: float, noise_multiplier: float,
                     sampling: str) -> dp_accounting.DpEvent:
    """The dp-accounting event of one user-level (per-client) round.

    ``noise_multiplier`` is the raw dp-accounting ratio: noise std / L2 sensitivity under the
    scheme's neighbouring relation (add/remove-one for "poisson" and "none", replace-one for
    "fixed"). For the server's z use ``dp_fedavg_round_event``.

    - "fixed": a uniformly random sample of ``sampled`` of ``num_clients`` clients without
      replacement (Flower's FedAvg), ``SampledWithoutReplacementDpEvent``; replace-one.
    - "poisson": each client joins independently with probability ``sampled / num_clients``
      (``sampled`` is then the expected sample size and may be fractional); add/remove-one.
    - "none": no amplification claimed (the sample is not random or not secret);
      a plain ``GaussianDpEvent``.
    """
    _check_choice("sampling", sampling, SAMPLING_SCHEMES)
    num_clients = _check_int("num_clients", num_clients, 1)
    if sampling == "poisson":
        sampled = _check_real("sampled", sampled, 0.0, num_clients, low_open=True, high_open=False)
    else:
        sampled = _check_int("sampled", sampled, 1, num_clients)
    gaussian = _dp().GaussianDpEvent(_check_noise("noise_multiplier", noise_multiplier))
    if sampling == "fixed":
        return _dp().SampledWithoutReplacementDpEvent(num_clients, sampled, gaussian)
    if sampling == "poisson":
        return _dp().PoissonSampledDpEvent(sampled / num_clients, gaussian)
    return gaussian


def dp_fedavg_round_event(num_clients: int, sampling_rate: float, noise_multiplier: float,
                          sampling: str) -> dp_accounting.DpEvent:
    """One DP-FedAvg round as the server runs it, from the server's own parameters.

    ``noise_multiplier`` is the server's z: it adds N(0, (z*C)^2) to the sum of the sampled
    clients' updates, each clipped to norm C (N(0, (z*C/m)^2) to their fixed-denominator
    average). ``sampling_rate`` is m/N for "fixed" (m*N must be a whole number), the
    inclusion probability for "poisson", and only informative for "none". For "fixed" the
    event's ratio is z / 2, since replace-one moves the sum by up to 2C.
    """
    _check_choice("sampling", sampling, SAMPLING_SCHEMES)
    num_clients = _check_int("num_clients", num_clients, 1)
    rate = _check_real("sampling_rate", sampling_rate, 0.0, 1.0, low_open=True, high_open=False)
    z = _check_noise("noise_multiplier", noise_multiplier)
    if sampling == "fixed":
        expected = rate * num_clients
        sampled = round(expected)
        if abs(expected - sampled) > 1e-6 or sampled < 1:
            raise ValueError(
                f"sampling_rate = {sampling_rate} with num_clients = {num_clients} gives "
                f"{expected:g} clients; fixed-size sampling needs sampling_rate = m / num_clients "
                "for a whole number m >= 1"
            )
        return user_level_event(num_clients, sampled, z / REPLACE_ONE_SENSITIVITY_FACTOR, "fixed")
    if sampling == "poisson":
        return _dp().PoissonSampledDpEvent(rate, _dp().GaussianDpEvent(z))
    return _dp().GaussianDpEvent(z)


def record_sample_rate(num_examples: int, batch_size: int) -> float:
    """DP-SGD's Poisson rate q = 1 / (number of batches of size ``batch_size``), as Opacus sets it."""
    return 1.0 / math.ceil(num_examples / batch_size)


def record_level_round_event(sample_rate: float, noise_multiplier: float,
                             steps: int) -> dp_accounting.DpEvent:
    """One client's local DP-SGD in one round: ``steps`` Poisson-sampled Gaussian steps."""
    q = _check_real("sample_rate", sample_rate, 0.0, 1.0, low_open=True, high_open=False)
    sigma = _check_noise("noise_multiplier", noise_multiplier)
    steps = _check_int("steps", steps, 1)
    step = _dp().PoissonSampledDpEvent(q, _dp().GaussianDpEvent(sigma))
    return _dp().SelfComposedDpEvent(step, steps)


# --- composition ----------------------------------------------------------------------------

def _leaves(event: dp_accounting.DpEvent) -> Iterator[dp_accounting.DpEvent]:
    """The sampling events (and other leaves) inside a possibly composed event."""
    if isinstance(event, _dp().SelfComposedDpEvent):
        yield from _leaves(event.event)
    elif isinstance(event, _dp().ComposedDpEvent):
        for inner in event.events:
            yield from _leaves(inner)
    else:
        yield event


def neighboring_relation(events: EventCounts) -> dp_accounting.NeighboringRelation:
    """The one neighbouring relation under which all ``events`` can be composed.

    Sampling without replacement needs replace-one; Poisson sampling needs add/remove-one;
    a plain Gaussian fits either (its ratio must then be w.r.t. that relation's sensitivity).
    """
    kinds = {type(leaf) for event, _ in events for leaf in _leaves(event)}
    wor = _dp().SampledWithoutReplacementDpEvent in kinds
    poisson = _dp().PoissonSampledDpEvent in kinds
    if wor and poisson:
        raise ValueError(
            "events mix fixed-size sampling without replacement (replace-one neighbours) with "
            "Poisson sampling (add/remove-one neighbours); no single accountant composes both. "
            "Account the two guarantees separately"
        )
    return _dp().NeighboringRelation.REPLACE_ONE if wor else _dp().NeighboringRelation.ADD_OR_REMOVE_ONE


def _grouped(events: EventCounts) -> list[tuple[dp_accounting.DpEvent, int]]:
    """Equal events merged with summed counts (one PLD is then built per distinct event)."""
    groups: list[list] = []
    for index, item in enumerate(events):
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"events[{index}] must be an (event, count) pair, got {item!r}")
        event, count = item
        if not isinstance(event, _dp().DpEvent):
            raise ValueError(f"events[{index}][0] must be a dp_accounting.DpEvent, got {event!r}")
        count = _check_int(f"events[{index}] count", count, 0)
        for group in groups:
            if group[0] == event:
                group[1] += count
                break
        else:
            groups.append([event, count])
    return [(event, count) for event, count in groups if count > 0]


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence dp-accounting's warning that it dropped fractional RDP orders (1.1-1.8).

    It logs it on every compose with large sampling rates (e.g. q=0.5). Dropping orders
    can only raise the reported epsilon, and those orders never give the minimum here.
    """
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def epsilon(events: EventCounts, delta: float, accountant: str = "rdp", *,
            pld_discretization: float = PLD_VALUE_DISCRETIZATION) -> float | None:
    """Epsilon at ``delta`` of all ``(event, count)`` pairs composed together.

    Returns None for ``accountant="pld"`` when an event samples without replacement, which
    dp-accounting's PLD accountant does not support. Composition is commutative, so equal
    events are merged first (the same answer, and PLD far faster); answers are memoised.
    """
    delta = _check_real("delta", delta, 0.0, 1.0, low_open=True, high_open=True)
    _check_choice("accountant", accountant, ACCOUNTANTS)
    grouped = tuple(_grouped(events))
    interval = None
    if accountant == "pld":
        interval = _check_real("pld_discretization", pld_discretization, 0.0, 1.0,
                               low_open=True, high_open=False)
    try:
        hash(grouped)
    except TypeError:  # an unhashable event (a ComposedDpEvent holds a list): no memo
        return _epsilon_uncached(grouped, delta, accountant, interval)
    return _epsilon_cached(grouped, delta, accountant, interval)


def _epsilon_uncached(grouped: tuple, delta: float, accountant: str,
                      interval: float | None) -> float | None:
    relation = neighboring_relation(grouped)
    if accountant == "rdp":
        acc = _dp().rdp.RdpAccountant(neighboring_relation=relation)
    else:
        if relation is _dp().NeighboringRelation.REPLACE_ONE:
            return None
        acc = _dp().pld.PLDAccountant(neighboring_relation=relation, value_discretization_interval=interval)
    with _quiet_absl():
        for event, count in grouped:
            if not acc.supports(event):
                raise ValueError(f"the {accountant.upper()} accountant cannot compose {event!r}")
            acc.compose(event, count)
        return float(acc.get_epsilon(delta))


# The same inputs always give the same epsilon; a ledger audit repeats the writer's calls.
_epsilon_cached = functools.lru_cache(maxsize=4096)(_epsilon_uncached)


# --- calibration ----------------------------------------------------------------------------

def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float,
                               steps_per_round: int, rounds: int, accountant: str = "rdp", *,
                               epsilon_tolerance: float = 1e-4,
                               pld_discretization: float = PLD_VALUE_DISCRETIZATION) -> float:
    """Smallest DP-SGD sigma whose record-level epsilon over ``rounds`` rounds is <= target.

    Each round is ``record_level_round_event(sample_rate, sigma, steps_per_round)`` (a client
    that takes part in every planned round). Bisection on sigma; the answer's epsilon lies
    in ``[target - epsilon_tolerance, target]`` unless sigma is already resolved to 1e-9.
    """
    target = _check_real("target_epsilon", target_epsilon, 0.0, math.inf, low_open=True, high_open=True)
    _check_real("delta", delta, 0.0, 1.0, low_open=True, high_open=True)
    _check_real("sample_rate", sample_rate, 0.0, 1.0, low_open=True, high_open=False)
    _check_int("steps_per_round", steps_per_round, 1)
    rounds = _check_int("rounds", rounds, 1)
    _check_choice("accountant", accountant, ACCOUNTANTS)
    tolerance = _check_real("epsilon_tolerance", epsilon_tolerance, 0.0, math.inf,
                            low_open=True, high_open=True)

    def eps_at(sigma: float) -> float:
        event = record_level_round_event(sample_rate, sigma, steps_per_round)
        return epsilon([(event, rounds)], delta, accountant, pld_discretization=pld_discretization)

    return _smallest_noise(eps_at, target, tolerance)


def calibrate_user_level_noise(target_epsilon: float, delta: float, num_clients: int, sampling_rate: float,
                               sampling: str, rounds: int, *, epsilon_tolerance: float = 1e-4) -> float:
    """Smallest server z (DP-FedAvg) whose user-level RDP epsilon over ``rounds`` rounds is <= target."""
    target = _check_real("target_epsilon", target_epsilon, 0.0, math.inf, low_open=True, high_open=True)
    _check_real("delta", delta, 0.0, 1.0, low_open=True, high_open=True)
    rounds = _check_int("rounds", rounds, 1)

    def eps_at(z: float) -> float:
        return epsilon([(dp_fedavg_round_event(num_clients, sampling_rate, z, sampling), rounds)], delta, "rdp")

    return _smallest_noise(eps_at, target, epsilon_tolerance)


def _smallest_noise(eps_at, target: float, tolerance: float) -> float:
    """Bisection: the smallest noise multiplier whose epsilon ``eps_at(noise)`` is <= ``target``."""
    sigma_min, sigma_max = 1e-2, 1e4
    hi = 1.0
    while eps_at(hi) > target:
        hi *= 2.0
        if hi > sigma_max:
            raise ValueError(f"target_epsilon = {target} needs a noise multiplier above {sigma_max:g}; "
                             "raise the target or lower sample_rate, steps or rounds")
    lo = hi / 2.0
    while eps_at(lo) <= target:
        hi, lo = lo, lo / 2.0
        if lo < sigma_min:
            raise ValueError(f"target_epsilon = {target} is met even with noise multiplier {sigma_min:g}; "
                             "it gives no meaningful protection: choose a smaller target")
    eps_hi = eps_at(hi)
    while target - eps_hi > tolerance and hi - lo > 1e-9 * hi:
        mid = 0.5 * (lo + hi)
        eps_mid = eps_at(mid)
        if eps_mid > target:
            lo = mid
        else:
            hi, eps_hi = mid, eps_mid
    return hi
