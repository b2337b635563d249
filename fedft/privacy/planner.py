"""``fedft privacy plan``: the privacy a run will spend, and the noise it will pay, before it starts.

User level (DP-FedAvg; one privacy unit = one institution or user): N clients, m sampled per
round ("fixed", Flower's sampling) or each with probability q ("poisson"), R rounds, delta, and
the server's z or a target epsilon (then z is calibrated). Record level (DP-SGD inside one
client; one unit = one training example): n local examples, batch B (q = 1 / ceil(n / B), as
Opacus and ``fedft.privacy.dpsgd`` set it), steps per round, R rounds, and sigma or a target.

For each it gives the epsilon after every round and in total (RDP, and PLD where dp-accounting
has one) with the very events the ledger records (``fedft.privacy.accounting``), so a plan and
the ledger of the run agree, and the noise-to-signal figure that decides utility: the server's
noise std on the mean update, z * C / m, against the clip norm C (z / m), and DP-SGD's noise
std on the mean batch gradient, sigma * C / B, against C (sigma / B). When a target needs more
noise than ``max_noise_ratio`` (a rule of thumb: noise std on the mean at most that fraction of
C), the plan says so and how many clients (or examples) would reach it. Pure: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedft.privacy import accounting

DEFAULT_MAX_NOISE_RATIO = 0.1


@dataclass(frozen=True)
class UserLevelPlan:
    num_clients: int
    sampling: str  # fixed | poisson | none
    sampling_rate: float  # m / N (fixed) or q (poisson)
    rounds: int
    delta: float
    noise_multiplier: float  # z
    epsilon_per_round: list[float]  # cumulative RDP epsilon after each round
    epsilon_rdp: float
    epsilon_pld: float | None
    noise_ratio: float  # z / m: the server noise std on the mean update, in units of C
    advice: str = ""

    @property
    def expected_sample(self) -> float:
        return self.sampling_rate * self.num_clients


@dataclass(frozen=True)
class RecordLevelPlan:
    num_examples: int
    batch_size: int
    sample_rate: float
    steps_per_round: int
    rounds: int
    delta: float
    noise_multiplier: float  # sigma
    epsilon_per_round: list[float]
    epsilon_rdp: float
    epsilon_pld: float | None
    noise_ratio: float  # sigma / B: DP-SGD noise std on the mean batch gradient, in units of C
    advice: str = ""


def _cumulative(event, rounds: int, delta: float) -> list[float]:
    return [accounting.epsilon([(event, r)], delta, "rdp") for r in range(1, rounds + 1)]


def plan_user_level(num_clients: int, rounds: int, delta: float, *, sampled: int | None = None,
                    rate: float | None = None, sampling: str = "fixed", noise_multiplier: float | None = None,
                    target_epsilon: float | None = None,
                    max_noise_ratio: float = DEFAULT_MAX_NOISE_RATIO) -> UserLevelPlan:
    """The user-level plan; give ``sampled`` (m) or ``rate`` (q), and z or a target epsilon."""
    if (sampled is None) == (rate is None):
        raise ValueError("give the per-round sample as exactly one of m (clients per round) or q (a rate)")
    q = rate if rate is not None else sampled / num_clients
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of z (noise multiplier) or a target epsilon")
    z = (noise_multiplier if noise_multiplier is not None
         else accounting.calibrate_user_level_noise(target_epsilon, delta, num_clients, q, sampling, rounds))
    event = accounting.dp_fedavg_round_event(num_clients, q, z, sampling)
    per_round = _cumulative(event, rounds, delta)
    pld = accounting.epsilon([(event, rounds)], delta, "pld")
    m = q * num_clients
    ratio = z / m
    advice = ""
    if ratio > max_noise_ratio:
        clients = math.ceil(z / max_noise_ratio / q)
        advice = (f"out of reach for useful noise: z = {z:.3g} over m = {m:g} clients per round puts noise of "
                  f"{ratio:.2f} x C on the mean update (rule of thumb: <= {max_noise_ratio:g} x C). At the same "
                  f"sampling rate q = {q:.3g}, about {clients} clients ({math.ceil(clients * q)} per round) "
                  f"would bring it to {max_noise_ratio:g} x C at this epsilon")
    return UserLevelPlan(num_clients, sampling, q, rounds, delta, z, per_round, per_round[-1], pld, ratio, advice)


def plan_record_level(num_examples: int, batch_size: int, steps_per_round: int, rounds: int, delta: float, *,
                      noise_multiplier: float | None = None, target_epsilon: float | None = None,
                      max_noise_ratio: float = DEFAULT_MAX_NOISE_RATIO) -> RecordLevelPlan:
    """The record-level plan of one client that trains every round; sigma or a target epsilon."""
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of sigma (noise multiplier) or a target epsilon")
    q = accounting.record_sample_rate(num_examples, batch_size)
    sigma = (noise_multiplier if noise_multiplier is not None
             else accounting.calibrate_noise_multiplier(target_epsilon, delta, q, steps_per_round, rounds))
    event = accounting.record_level_round_event(q, sigma, steps_per_round)
    per_round = _cumulative(event, rounds, delta)
    pld = accounting.epsilon([(event, rounds)], delta, "pld")
    ratio = sigma / batch_size
    advice = ""
    if ratio > max_noise_ratio:
        batch = math.ceil(sigma / max_noise_ratio)
        advice = (f"noisy: sigma = {sigma:.3g} over batches of {batch_size} puts noise of {ratio:.2f} x C on the "
                  f"mean batch gradient (rule of thumb: <= {max_noise_ratio:g} x C). Batches of about {batch} (at the "
                  f"same q, about {math.ceil(batch / q)} examples) would bring it to {max_noise_ratio:g} x C; a "
                  "larger batch at a fixed data size raises q and so sigma: more data is the lasting fix")
    return RecordLevelPlan(num_examples, batch_size, q, steps_per_round, rounds, delta, sigma, per_round,
                           per_round[-1], pld, ratio, advice)


def _shown_rounds(rounds: int, limit: int = 12) -> list[int]:
    if rounds <= limit:
        return list(range(1, rounds + 1))
    step = math.ceil(rounds / (limit - 1))
    return sorted(set(list(range(step, rounds, step)) + [1, rounds]))


def _epsilon_lines(per_round: list[float]) -> list[str]:
    """'round  epsilon (RDP)' and a row for each shown round."""
    return ["  round  epsilon (RDP)"] + [f"  {r:>5}  {per_round[r - 1]:.4f}" for r in _shown_rounds(len(per_round))]


def _norm_line(ratio: float, trainable: int | None, what: str) -> str:
    if not trainable:
        return ""
    norm = ratio * math.sqrt(trainable)
    return (f"  over {trainable:,} trainable parameters the noise vector's norm is about {norm:.3g}"
            f" x C, against a {what} whose norm is at most C")


def format_plan(user: UserLevelPlan | None, record: RecordLevelPlan | None, trainable: int | None = None) -> str:
    """The plan as a person reads it: parameters, epsilon by round, totals, noise, advice.
    ``trainable`` (the adapter's parameter count) adds the noise's norm, which is what training feels."""
    lines = []
    if user is not None:
        lines.append(f"user level (DP-FedAvg): {user.num_clients} clients, {user.sampling} sampling, "
                     f"{user.expected_sample:g} per round (q = {user.sampling_rate:.4g}), {user.rounds} rounds, "
                     f"delta {user.delta:g}, z = {user.noise_multiplier:.4g}")
        lines += _epsilon_lines(user.epsilon_per_round)
        pld = "n/a (fixed-size sampling)" if user.epsilon_pld is None else f"{user.epsilon_pld:.4f}"
        lines.append(f"  total: epsilon {user.epsilon_rdp:.4f} (RDP), {pld} (PLD); round 1 alone "
                     f"{user.epsilon_per_round[0]:.4f}")
        lines.append(f"  noise: std z*C/m = {user.noise_ratio:.4g} x C on the mean update")
        lines += [line for line in [_norm_line(user.noise_ratio, trainable, "mean clipped update")] if line]
        if user.advice:
            lines.append(f"  {user.advice}")
    if record is not None:
        lines.append(f"record level (DP-SGD, per client): {record.num_examples} examples, batch {record.batch_size} "
                     f"(q = {record.sample_rate:.4g}), {record.steps_per_round} steps per round, {record.rounds} "
                     f"rounds, delta {record.delta:g}, sigma = {record.noise_multiplier:.4g}")
        lines += _epsilon_lines(record.epsilon_per_round)
        pld = "n/a" if record.epsilon_pld is None else f"{record.epsilon_pld:.4f}"
        lines.append(f"  total: epsilon {record.epsilon_rdp:.4f} (RDP), {pld} (PLD), for a client in every round")
        lines.append(f"  noise: std sigma*C/B = {record.noise_ratio:.4g} x C on the mean batch gradient")
        lines += [line for line in [_norm_line(record.noise_ratio, trainable, "mean clipped gradient")] if line]
        if record.advice:
            lines.append(f"  {record.advice}")
    return "\n".join(lines)
