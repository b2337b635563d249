"""Preference pairs built from the model's own wrong answers, and the preference scores."""

from __future__ import annotations

import json

import pytest
import torch

from fedft.align.pairs import (
    ORIGIN_FILE,
    ORIGIN_MODEL,
    SamplingSettings,
    model_error_rows,
    rows_from_answers,
    sample_answers,
    wrong_answers,
)
from fedft.align.stage import MODEL_PAIR_FILES, run_dpo_stage
from fedft.config import ConfigError, load_config
from fedft.data.preferences import pair_from_row, tokenize_pair
from fedft.score.preference import preference_scores
from tests.align.test_dpo import _dpo_config, _perturbed_adapter


def test_wrong_answers_are_distinct_stripped_and_never_the_reference():
    candidates = [" 2020-01-02", "2020-01-02 ", "2020-02-01", "", "  ", "2020-02-01", "2021-01-02"]
    assert wrong_answers(candidates, "2020-01-02") == ["2020-02-01", "2021-01-02"]
    assert wrong_answers(["a", " a "], "a") == []


def test_rows_keep_their_keys_and_take_the_most_probable_wrong_answers():
    rows = [{"prompt": "p0", "chosen": "A", "rejected": "file0", "task": "t", "flaw": "x"},
            {"prompt": "p1", "chosen": "B", "rejected": "file1", "task": "t"},
            {"prompt": "p2", "chosen": "C", "rejected": "file2", "task": "u"}]
    answers = [["w1", "A", "w2", "w3"],  # greedy wrong
               ["B", "B", "v1"],  # only a sampled answer wrong
               ["C", " C", "C"]]  # never wrong
    logps = {"w1": -3.0, "w2": -1.0, "w3": -2.0, "v1": -5.0}
    seen = []

    def score(i, wrong):
        seen.append((i, wrong))
        return [logps[w] for w in wrong]

    out, counts = rows_from_answers(rows, ["A", "B", "C"], answers, score, per_prompt=2)
    assert counts == {"greedy_wrong": 1, "sampled_wrong": 1, "never_wrong": 1}
    assert seen == [(0, ["w1", "w2", "w3"]), (1, ["v1"])]  # prompts never wrong are not scored
    assert [(r["prompt"], r["rejected"], r["origin"]) for r in out] == [
        ("p0", "w2", ORIGIN_MODEL), ("p0", "w3", ORIGIN_MODEL), ("p1", "v1", ORIGIN_MODEL),
        ("p2", "file2", ORIGIN_FILE)]
    assert out[0]["flaw"] == "x" and all(r["chosen"] == rows[int(r["prompt"][1])]["chosen"] for r in out)
    one, _ = rows_from_answers(rows, ["A", "B", "C"], answers, score)
    assert [r["rejected"] for r in one] == ["w2", "v1", "file2"]


def test_preference_scores_by_hand():
    policy = (torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -2.0, -1.0]))
    reference = (torch.tensor([-1.5, -2.0, -2.0]), torch.tensor([-1.0, -2.0, -2.5]))
    # rewards at beta 0.5: chosen 0.25, 0, -0.5; rejected -0.5, 0, 0.75 -> margins 0.75, 0, -1.25
    s = preference_scores(policy, reference, ["a", "a", "b"], beta=0.5)
    assert s["pref_accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert s["reward_margin"] == pytest.approx((0.75 + 0 - 1.25) / 3)
    assert s["pref_accuracy_by_task"] == {"a": 0.75, "b": 0.0}
    # the policy itself: chosen - rejected log-probs are 1, 0, -2
    assert s["likelihood_accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)
    itself = preference_scores(policy, policy, ["a", "a", "b"], beta=0.5)
    assert itself["pref_accuracy"] == 0.5 and itself["reward_margin"] == 0.0


def _tiny(tiny_config_path, tmp_path, *overrides):
    from fedft.model.adapter import set_adapter_state
    from fedft.model.load import cached_peft_model, model_spec

    cfg = _dpo_config(tiny_config_path, tmp_path, *overrides)
    model, tokenizer = cached_peft_model(model_spec(cfg))
    set_adapter_state(model, _perturbed_adapter(model))
    lines = [json.loads(line) for line in open(cfg.dpo.eval_path)]
    pairs = [pair_from_row(row, f"p-eval:{i}") for i, row in enumerate(lines)]
    return cfg, model, tokenizer, lines, pairs


def test_model_rows_hold_answers_the_model_gave_and_sampling_is_reproducible(tiny_config_path, tmp_path):
    cfg, model, tokenizer, lines, pairs = _tiny(tiny_config_path, tmp_path)
    settings = SamplingSettings(samples=3, temperature=1.0, seed=5, batch_size=3)
    tokenized = [tokenize_pair(p, tokenizer, cfg.dpo.max_length) for p in pairs]
    answers = sample_answers(model, tokenizer, tokenized, settings)
    assert answers == sample_answers(model, tokenizer, tokenized, settings)
    assert [len(a) for a in answers] == [4] * len(pairs)
    out, counts = model_error_rows(model, tokenizer, lines, pairs, max_length=cfg.dpo.max_length,
                                   settings=settings, per_prompt=2)
    assert sum(counts.values()) == len(pairs) and counts["never_wrong"] < len(pairs)  # an untrained model errs
    by_prompt: dict[str, list[dict]] = {}
    for row in out:
        by_prompt.setdefault(row["prompt"], []).append(row)
    for i, (line, pair) in enumerate(zip(lines, pairs, strict=True)):
        got = by_prompt[line["prompt"]]
        assert 1 <= len(got) <= 2
        for row in got:
            assert row["chosen"] == line["chosen"] and row["task"] == line["task"]
            if row["origin"] == ORIGIN_MODEL:
                assert row["rejected"] in wrong_answers(answers[i], pair.chosen)
            else:
                assert row["rejected"] == line["rejected"]
            pair_from_row(row, "rebuilt")  # still a valid preference row


def test_the_dpo_stage_trains_on_pairs_built_from_the_model(tiny_config_path, tmp_path):
    cfg, *_ = _tiny(tiny_config_path, tmp_path, "dpo.rejected_from=model", "dpo.samples=2",
                    "dpo.negatives_per_prompt=2")
    from fedft.model.load import cached_peft_model, model_spec

    model, _ = cached_peft_model(model_spec(cfg))
    summary = run_dpo_stage(cfg, _perturbed_adapter(model), tmp_path / "run", log=lambda line: None)
    dpo_dir = tmp_path / "run" / "dpo"
    train_rows = [json.loads(line) for line in (dpo_dir / MODEL_PAIR_FILES[0]).read_text().splitlines()]
    eval_rows = [json.loads(line) for line in (dpo_dir / MODEL_PAIR_FILES[1]).read_text().splitlines()]
    assert summary["train_path"] == str(dpo_dir / MODEL_PAIR_FILES[0])
    assert summary["train_pairs"] == len(train_rows) and summary["eval_pairs"] == len(eval_rows)
    counts = summary["model_pairs"]
    source_eval = open(cfg.dpo.eval_path).read().splitlines()
    assert sum(counts["eval"].values()) == len(source_eval) == len(eval_rows)  # one pair per held-out prompt
    assert any(r["origin"] == ORIGIN_MODEL for r in train_rows)
    assert summary["pref_accuracy_before"] == 0.5  # the reference scores itself


def test_train_max_pairs_bounds_the_prompts_sampled_for_training_pairs(tiny_config_path, tmp_path):
    cfg, *_ = _tiny(tiny_config_path, tmp_path, "dpo.rejected_from=model", "dpo.samples=1",
                    "dpo.train_max_pairs=3", "dpo.steps=1")
    from fedft.model.load import cached_peft_model, model_spec

    model, _ = cached_peft_model(model_spec(cfg))
    summary = run_dpo_stage(cfg, _perturbed_adapter(model), tmp_path / "run", log=lambda line: None)
    prompts = {json.loads(line)["prompt"] if isinstance(json.loads(line)["prompt"], str)
               else json.dumps(json.loads(line)["prompt"]) for line in open(cfg.dpo.train_path)}
    assert len(prompts) > 3  # the file has more prompts than the bound
    assert sum(summary["model_pairs"]["train"].values()) == 3 and summary["train_pairs"] == 3


def test_rejected_from_is_checked(tiny_config_path):
    with pytest.raises(ConfigError, match="dpo.rejected_from"):
        load_config(tiny_config_path, ["dpo.rejected_from=humans"])
    with pytest.raises(ConfigError, match="dpo.samples"):
        load_config(tiny_config_path, ["dpo.samples=0"])
