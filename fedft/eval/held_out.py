"""Held-out evaluation during the rounds: answer loss and exact match of the global adapter.

``evaluate_model`` scores a model on tokenized held-out examples (mean answer-token loss,
exact match overall and per task, a few samples). ``HeldOutEvaluator`` holds the cached
model and the held-out examples of one run and scores an adapter state when the run loop
asks (round 0, every ``strategy.eval_every`` rounds, the last round). Read-only.

Each evaluation also carries its greedy answers and loss under ``ANSWERS`` (not an ``eval_``
column, so kept out of metrics rows and summary.json), with a fingerprint of the examples
they answer: the stage evaluation after the last round takes the base's and the trained
adapter's scores from there instead of generating the same answers again.
"""

from __future__ import annotations

import hashlib
import json

from fedft.data.rows import Example
from fedft.score.answers import answer_loss, exact_match, generate_answers

ANSWERS = "answers"  # {"examples": fingerprint, "predictions": [...], "loss": float}


def examples_fingerprint(examples: list[Example]) -> str:
    """SHA-256 of the examples' token ids, labels, references and tasks, in order."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.input_ids, e.labels, e.prompt_ids, e.reference, e.task]).encode())
    return digest.hexdigest()


def known_answers(scored: dict | None, fingerprint: str) -> dict | None:
    """``scored[ANSWERS]`` when it answers exactly the examples of ``fingerprint``
    (``examples_fingerprint``), else None."""
    answers = (scored or {}).get(ANSWERS)
    if answers is None or answers["examples"] != fingerprint:
        return None
    return answers


def evaluate_model(model, tokenizer, examples: list[Example], batch_size: int = 32, *,
                   fingerprint: str | None = None) -> dict:
    """Loss, exact match and per-task exact match on held-out examples (``fingerprint``: their
    ``examples_fingerprint`` when the caller already has it)."""
    predictions = generate_answers(model, tokenizer, examples, batch_size)
    overall, by_task = exact_match(predictions, examples)
    loss = answer_loss(model, examples, tokenizer.pad_token_id, batch_size)
    return {
        "eval_loss": loss,
        "eval_exact_match": overall,
        "eval_exact_match_by_task": by_task,
        "samples": [
            {"prompt_source": e.source, "reference": e.reference, "prediction": p}
            for e, p in list(zip(examples, predictions))[:5]
        ],
        ANSWERS: {"examples": fingerprint or examples_fingerprint(examples), "predictions": predictions, "loss": loss},
    }


def load_eval_examples(cfg, tokenizer) -> list[Example]:
    """The held-out set, tokenized; at most ``data.eval_max_examples`` rows, drawn evenly."""
    import random

    from fedft.data.rows import load_row_files, tokenize_dataset

    rows = load_row_files([cfg.data.eval_file], cfg.data.columns)
    indices = list(range(len(rows)))
    if len(indices) > cfg.data.eval_max_examples:
        indices = sorted(random.Random(cfg.data.seed).sample(indices, cfg.data.eval_max_examples))
    return tokenize_dataset([rows[i] for i in indices], tokenizer, cfg.data)


class HeldOutEvaluator:
    """Scores adapter states on the held-out set with one cached model."""

    def __init__(self, cfg) -> None:
        from fedft.model.load import cached_peft_model, initial_adapter_state, model_spec

        spec = model_spec(cfg)
        self.model, self.tokenizer = cached_peft_model(spec)
        self.examples = load_eval_examples(cfg, self.tokenizer)
        self.initial_state = initial_adapter_state(spec)
        self.fingerprint = examples_fingerprint(self.examples)

    def __call__(self, state) -> dict:
        from fedft.model.adapter import set_adapter_state

        set_adapter_state(self.model, state)
        return evaluate_model(self.model, self.tokenizer, self.examples, fingerprint=self.fingerprint)
