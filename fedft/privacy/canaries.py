"""Empirical privacy audit with canaries: exposure and a one-run epsilon lower bound.

Off unless ``privacy.canaries > 0``, and only for simulated clients (a deployed
institution's data is never touched). ``privacy.canaries`` random secrets ("Recall the
access code of record 17." -> "4 0 9 2 7 1") are drawn from the run's seed; each is
inserted, with probability 1/2, ``canary_repeats`` times into the training data of client
``canary_client``. After training the server scores every canary by the final model's loss
on its secret and reports:

- **exposure** (Carlini et al. 2019, The Secret Sharer) of each inserted canary:
  log2(candidates) - log2(rank of the true secret among random secrets of the same form);
- **an empirical epsilon lower bound** from one run (Steinke, Nasr and Jagielski 2023):
  guess "inserted" for the k lowest-loss canaries and "not inserted" for the k highest; if
  v of the r = 2k guesses are right, every epsilon with P[Binomial(r, e^eps / (1 + e^eps))
  >= v] + r * delta-term below the significance level is rejected. The bound can only
  certify that privacy is *worse* than it; it is never an estimate of epsilon, and with a
  few hundred canaries it saturates at small values.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from fedft.config import PrivacyConfig
from fedft.data.rows import Example, collate, tokenize_row

SECRET_DIGITS = 6
CANDIDATES = 255  # alternatives per canary: exposure is at most log2(256) = 8 bits
SIGNIFICANCE = 0.05


@dataclass(frozen=True)
class Canary:
    """One secret, and whether the coin put it into the training data."""

    index: int
    prompt: str
    secret: str
    inserted: bool


def _secret(rng: random.Random) -> str:
    return " ".join(str(rng.randrange(10)) for _ in range(SECRET_DIGITS))


def make_canaries(privacy: PrivacyConfig, seed: int) -> list[Canary]:
    """The run's ``privacy.canaries`` canaries, deterministic in its ``seed`` (the audit redraws the same ones)."""
    rng = random.Random(f"fedft-canaries-{seed}")
    return [Canary(i, f"Recall the access code of record {i}.", _secret(rng), rng.random() < 0.5)
            for i in range(privacy.canaries)]


def canary_row(canary: Canary, secret: str | None = None) -> dict:
    """A chat row whose answer is the canary's secret (or a candidate secret)."""
    return {"messages": [{"role": "user", "content": canary.prompt},
                         {"role": "assistant", "content": canary.secret if secret is None else secret}],
            "task": "canary", "source": f"canary {canary.index}"}


def canary_training_examples(privacy: PrivacyConfig, tokenizer, *, seed: int, max_length: int) -> list[Example]:
    """What the chosen client adds to its data: each inserted canary, ``privacy.canary_repeats`` times.

    ``seed`` is the run's seed (``make_canaries``), ``max_length`` is ``data.max_length``."""
    rows = [canary_row(c) for c in make_canaries(privacy, seed) if c.inserted]
    examples = [tokenize_row(r, tokenizer, max_length) for r in rows]
    return [e for e in examples for _ in range(privacy.canary_repeats)]


def secret_losses(model, tokenizer, rows: list[dict], max_length: int, batch_size: int = 64) -> list[float]:
    """The model's mean loss on each row's answer (the secret), one value per row."""
    from fedft.score.answers import per_example_loss

    examples = [tokenize_row(r, tokenizer, max_length) for r in rows]
    device = next(model.parameters()).device
    model.eval()
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            out += per_example_loss(model, batch).tolist()
    return out


def exposure(true_loss: float, candidate_losses: list[float]) -> float:
    """log2(#candidates incl. the secret) - log2(rank of the secret by loss, 1 = lowest)."""
    rank = 1 + sum(1 for loss in candidate_losses if loss < true_loss)
    return math.log2(len(candidate_losses) + 1) - math.log2(rank)


def _binomial_tail(r: int, p: float, v: int) -> float:
    """P[Binomial(r, p) >= v]."""
    return sum(math.comb(r, i) * p ** i * (1 - p) ** (r - i) for i in range(v, r + 1))


def one_run_epsilon_lower_bound(correct: int, guesses: int, delta: float = 0.0,
                                significance: float = SIGNIFICANCE) -> float:
    """The largest epsilon rejected at ``significance`` by ``correct`` right of ``guesses`` guesses.

    Steinke, Nasr and Jagielski (2023), Theorem 1 without abstention bookkeeping: under
    (eps, delta)-DP the number of right guesses is stochastically dominated by
    Binomial(r, e^eps / (1 + e^eps)) up to an additive r * delta term in probability.
    """
    if guesses == 0:
        return 0.0
    best = 0.0
    for step in range(1, 2001):  # eps on a 0.005 grid up to 10
        eps = step * 0.005
        p = math.exp(eps) / (1 + math.exp(eps))
        if _binomial_tail(guesses, p, correct) + guesses * delta < significance:
            best = eps
        else:
            break
    return best


def audit_canaries(privacy: PrivacyConfig, model, tokenizer, *, seed: int, max_length: int,
                   candidates: int = CANDIDATES) -> dict:
    """Score every canary with the trained model: exposures and the empirical lower bound.

    ``privacy`` gives the canaries and delta, ``seed`` is the run's seed (the same canaries as
    ``make_canaries``), ``max_length`` is ``data.max_length``; ``candidates`` random secrets are
    ranked against each inserted one (exposure is at most log2(candidates + 1) bits)."""
    canaries = make_canaries(privacy, seed)
    losses = secret_losses(model, tokenizer, [canary_row(c) for c in canaries], max_length)
    rng = random.Random(f"fedft-canary-candidates-{seed}")
    exposures = []
    for canary, loss in zip(canaries, losses):
        if not canary.inserted:
            continue
        alternatives = set()
        while len(alternatives) < candidates:
            s = _secret(rng)
            if s != canary.secret:
                alternatives.add(s)
        candidate_losses = secret_losses(model, tokenizer, [canary_row(canary, s) for s in sorted(alternatives)],
                                         max_length)
        exposures.append(exposure(loss, candidate_losses))
    k = max(1, len(canaries) // 4)
    order = sorted(range(len(canaries)), key=lambda i: losses[i])
    guessed_in, guessed_out = order[:k], order[-k:]
    correct = sum(canaries[i].inserted for i in guessed_in) + sum(not canaries[i].inserted for i in guessed_out)
    return {
        "canaries": len(canaries),
        "inserted": sum(c.inserted for c in canaries),
        "repeats": privacy.canary_repeats,
        "client": privacy.canary_client,
        "guesses": 2 * k,
        "correct_guesses": correct,
        "epsilon_lower_bound": one_run_epsilon_lower_bound(correct, 2 * k, privacy.delta),
        "significance": SIGNIFICANCE,
        "mean_exposure_bits": sum(exposures) / len(exposures) if exposures else None,
        "max_exposure_bits": max(exposures) if exposures else None,
        "max_possible_exposure_bits": math.log2(candidates + 1),
    }
