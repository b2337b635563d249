"""Canary audit: the one-run lower bound, exposure, and memorisation a trained model shows."""

from __future__ import annotations

import math

import pytest

from fedft.config import load_config
from fedft.privacy.canaries import (
    audit_canaries,
    canary_training_examples,
    exposure,
    make_canaries,
    one_run_epsilon_lower_bound,
)
from tests.conftest import REPO_ROOT


def test_one_run_bound_matches_the_binomial_test():
    # all 100 guesses right: reject eps while p^100 < 0.05, i.e. eps < log(p / (1 - p)) at p = 0.05^(1/100)
    p = 0.05 ** (1 / 100)
    assert one_run_epsilon_lower_bound(100, 100) == pytest.approx(math.log(p / (1 - p)), abs=0.005)
    assert one_run_epsilon_lower_bound(50, 100) == 0.0  # chance level proves nothing
    assert one_run_epsilon_lower_bound(70, 100) < one_run_epsilon_lower_bound(90, 100)


def test_exposure_is_log2_candidates_minus_log2_rank():
    assert exposure(0.1, [0.5] * 255) == pytest.approx(8.0)  # ranked first of 256
    assert exposure(1.0, [0.5] * 255) == pytest.approx(0.0)  # ranked last


def test_canaries_are_deterministic_and_about_half_are_inserted(tiny_config_path):
    cfg = load_config(tiny_config_path, ["privacy.canaries=40", "privacy.canary_repeats=3"])
    first, again = make_canaries(cfg.privacy, cfg.seed), make_canaries(cfg.privacy, cfg.seed)
    assert first == again and len({c.secret for c in first}) == 40
    assert 10 <= sum(c.inserted for c in first) <= 30
    assert load_config(tiny_config_path, ["privacy.canaries=40"]).privacy.canaries == 40
    other_cfg = load_config(tiny_config_path, ["privacy.canaries=40", "seed=1"])
    other = make_canaries(other_cfg.privacy, other_cfg.seed)
    assert [c.secret for c in other] != [c.secret for c in first]


@pytest.mark.slow
def test_a_model_trained_on_its_canaries_exposes_them():

    from fedft.model.adapter import get_adapter_state
    from fedft.model.load import cached_peft_model, model_spec
    from fedft.train.local import train_local

    demo = REPO_ROOT / "simulations" / "demo.toml"
    cfg = load_config(demo, ["privacy.canaries=16", "privacy.canary_repeats=8", "train.local_steps=60"])
    model, tokenizer = cached_peft_model(model_spec(cfg))
    start = get_adapter_state(model)
    # 63 random secrets per canary (not the run's 255): exposure at most 6 bits, a quarter of the scoring
    canary_args = {"seed": cfg.seed, "max_length": cfg.data.max_length, "candidates": 63}
    before = audit_canaries(cfg.privacy, model, tokenizer, **canary_args)
    examples = canary_training_examples(cfg.privacy, tokenizer, seed=cfg.seed, max_length=cfg.data.max_length)
    assert len(examples) == 8 * sum(c.inserted for c in make_canaries(cfg.privacy, cfg.seed))
    train_local(model, examples, tokenizer.pad_token_id, cfg.train, global_state=start,
                round_index=1, total_rounds=1)
    after = audit_canaries(cfg.privacy, model, tokenizer, **canary_args)
    # measured: 2.29 bits before, 4.61 after (of at most 6); 5.41 while an evaluation broke the
    # next training's gradients on AVX512-BF16 CPUs (fedft.model.quantization.keep_training_kernel)
    assert before["mean_exposure_bits"] < 3 < 4 < after["mean_exposure_bits"] <= 6.0
    assert after["max_possible_exposure_bits"] == 6.0
    assert after["correct_guesses"] == after["guesses"] and after["epsilon_lower_bound"] > 0.5
