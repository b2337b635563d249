"""Preference pairs whose rejected answers are the model's own mistakes (on-policy pairs).

A preference file's ``chosen`` answers are references; its ``rejected`` answers were
written by someone else and may be mistakes the model never makes. ``model_error_rows``
asks the model itself: for each prompt it takes the greedy answer and ``samples`` answers
drawn at ``temperature``, keeps those that differ from the reference (compared stripped,
as exact match does), ranks them by the model's own sequence log-probability and pairs
the reference with the most probable ones. What DPO then pushes down is what the model
actually says, as in the DPO paper, where pairs are sampled from the SFT model.
A prompt the model never gets wrong keeps the file's rejected answer. Every row says
where its rejected answer came from: ``"origin": "model"`` or ``"file"``.

``wrong_answers`` and ``rows_from_answers`` (the selection) are pure given the scores;
``sample_answers`` generates; nothing here trains or changes the model's weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedft.data.preferences import PreferencePair, TokenizedPair, tokenize_pair
from fedft.score.answers import left_padded

ORIGIN_MODEL, ORIGIN_FILE = "model", "file"


def wrong_answers(candidates: list[str], reference: str) -> list[str]:
    """Distinct non-empty candidates that are not the reference (stripped), in first-seen order."""
    seen: list[str] = []
    for answer in (c.strip() for c in candidates):
        if answer and answer != reference.strip() and answer not in seen:
            seen.append(answer)
    return seen


@dataclass(frozen=True)
class SamplingSettings:
    """How answers are drawn: the greedy one plus ``samples`` draws at ``temperature``."""

    samples: int = 8
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 32
    extra_tokens: int = 8  # new tokens allowed beyond the longest reference in a batch


@torch.no_grad()
def sample_answers(model, tokenizer, pairs: list[TokenizedPair], settings: SamplingSettings) -> list[list[str]]:
    """Per pair: the greedy answer, then ``settings.samples`` sampled answers to its prompt.

    Prompts are batched by the length of their reference answer (a batch generates until its
    longest answer allows, so short and long answers are not mixed); the answers come back in
    the order of ``pairs``. Batches are seeded ``settings.seed + batch index``, so a given
    file, model and setting always give the same answers.
    """
    from fedft.score.preference import eval_mode

    device = next(model.parameters()).device
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i].chosen_ids) - pairs[i].prompt_len, i))
    answers: list[list[str]] = [[] for _ in pairs]
    with eval_mode(model):
        for index, start in enumerate(range(0, len(pairs), settings.batch_size)):
            rows = order[start:start + settings.batch_size]
            chunk = [pairs[i] for i in rows]
            ids, mask = left_padded([p.chosen_ids[:p.prompt_len] for p in chunk], pad_id)
            ids, mask, width = ids.to(device), mask.to(device), ids.shape[1]
            longest = max(len(p.chosen_ids) - p.prompt_len for p in chunk) + settings.extra_tokens
            common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=longest, pad_token_id=pad_id,
                          eos_token_id=eos_id)
            greedy = model.generate(**common, do_sample=False)
            torch.manual_seed(settings.seed + index)
            drawn = model.generate(**common, do_sample=True, temperature=settings.temperature, top_k=0,
                                   top_p=1.0, num_return_sequences=settings.samples)
            for row, i in enumerate(rows):
                texts = [greedy[row, width:]] + [drawn[row * settings.samples + j, width:]
                                                 for j in range(settings.samples)]
                answers[i] = [tokenizer.decode(t, skip_special_tokens=True) for t in texts]
    return answers


def rows_from_answers(rows: list[dict], references: list[str], answers: list[list[str]],
                      score: Callable[[int, list[str]], list[float]], per_prompt: int = 1) -> tuple[list[dict], dict]:
    """(rows, counts): each row paired with its most probable wrong answers, the file's when none.

    ``answers[i]`` are row i's candidates, the greedy one first; ``score(i, wrong)`` gives
    the model's log-probability of each wrong answer to row i's prompt. A row yields up to
    ``per_prompt`` rows (most probable first, ties in first-seen order), each with every
    key of the input row, its ``rejected`` replaced and ``"origin": "model"``; a row with no
    wrong answer is kept with ``"origin": "file"``. ``counts``: prompts whose greedy answer
    was wrong, whose only wrong answers were sampled, and that were never wrong.
    """
    out: list[dict] = []
    counts = {"greedy_wrong": 0, "sampled_wrong": 0, "never_wrong": 0}
    for i, (row, reference, candidates) in enumerate(zip(rows, references, answers, strict=True)):
        wrong = wrong_answers(candidates, reference)
        if not wrong:
            counts["never_wrong"] += 1
            out.append({**row, "origin": ORIGIN_FILE})
            continue
        counts["greedy_wrong" if candidates[0].strip() in wrong else "sampled_wrong"] += 1
        logps = score(i, wrong)
        ranked = sorted(range(len(wrong)), key=lambda j: -logps[j])
        out.extend({**row, "rejected": wrong[j], "origin": ORIGIN_MODEL} for j in ranked[:per_prompt])
    return out, counts


def model_error_rows(model, tokenizer, rows: list[dict], pairs: list[PreferencePair], *, max_length: int,
                     settings: SamplingSettings, per_prompt: int = 1) -> tuple[list[dict], dict]:
    """``rows_from_answers`` with the model's own answers and log-probabilities.

    ``rows`` are the raw JSON objects behind ``pairs`` (same order); ``chosen`` is the
    reference each answer is checked against.
    """
    from fedft.score.preference import scored_logps

    if len(rows) != len(pairs):
        raise ValueError(f"{len(rows)} rows but {len(pairs)} pairs")
    answers = sample_answers(model, tokenizer, [tokenize_pair(p, tokenizer, max_length) for p in pairs], settings)

    # every prompt's wrong answers scored in one batched pass (not one small pass per prompt)
    wrong = [wrong_answers(candidates, pair.chosen) for candidates, pair in zip(answers, pairs, strict=True)]
    scored = [tokenize_pair(PreferencePair(pair.messages, pair.chosen, w, pair.task, pair.source), tokenizer,
                            max_length) for pair, ws in zip(pairs, wrong, strict=True) for w in ws]
    logps = scored_logps(model, scored, tokenizer.pad_token_id, batch_size=settings.batch_size)[1].tolist()
    starts = [0]
    for ws in wrong:
        starts.append(starts[-1] + len(ws))

    def score(i: int, wrong_i: list[str]) -> list[float]:  # wrong_i == wrong[i]: the same wrong_answers call
        return logps[starts[i]:starts[i + 1]]

    return rows_from_answers(rows, [p.chosen for p in pairs], answers, score, per_prompt)
