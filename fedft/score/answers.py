"""Scores of a model's answers: answer-token loss, greedy generation, exact match, perplexity.

``answer_loss`` is the mean cross-entropy over answer tokens of held-out examples (from
``fedft.score.tokens``); ``per_example_loss`` is the same loss kept per sequence (DP-SGD's
privacy unit and the canary audit's score). ``generate_answers`` decodes greedily from
left-padded prompts; ``exact_match`` compares stripped generations with stripped references,
overall and per task. Read-only: the model's weights are never changed here, and nothing reads files.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from fedft.data.rows import IGNORE_INDEX, Example, collate
from fedft.score.tokens import shifted, summed_nll, token_logps


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def answer_loss(model, examples: list[Example], pad_id: int, batch_size: int = 32) -> float:
    """Mean cross-entropy per answer token (prompt tokens excluded)."""
    model.eval()
    device = _device(model)
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, mask = token_logps(logits, batch["labels"])
        total += summed_nll(logps, mask).item()
        count += int(mask.sum())
    return total / max(1, count)


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id prompts padded on the left, as generation needs."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention[row, width - len(prompt):] = 1
    return input_ids, attention


@torch.no_grad()
def generate_answers(model, tokenizer, examples: list[Example], batch_size: int = 32) -> list[str]:
    """Greedy answers to each example's prompt (left-padded batches, stop at EOS)."""
    model.eval()
    device = _device(model)
    pad_id = tokenizer.pad_token_id
    answers = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        input_ids, attention = left_padded([e.prompt_ids for e in chunk], pad_id)
        width = input_ids.shape[1]
        longest_answer = max(len(e.input_ids) - len(e.prompt_ids) for e in chunk)
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device),
            max_new_tokens=longest_answer + 4, do_sample=False,
            pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
        )
        for row in range(len(chunk)):
            answers.append(tokenizer.decode(output[row, width:], skip_special_tokens=True))
    return answers


def exact_match(predictions: list[str], examples: list[Example]) -> tuple[float, dict[str, float]]:
    """Share of stripped predictions equal to the stripped reference, overall and per task."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for prediction, example in zip(predictions, examples, strict=True):
        hits[example.task].append(prediction.strip() == example.reference.strip())
    every = [h for task_hits in hits.values() for h in task_hits]
    by_task = {task: sum(h) / len(h) for task, h in sorted(hits.items())}
    return (sum(every) / len(every) if every else 0.0), by_task


# ---------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------

def perplexity(loss: float) -> float:
    """exp(mean token loss); ``inf`` where that overflows a float."""
    return math.exp(loss) if loss < 700 else float("inf")


def per_example_loss(model, batch: dict) -> torch.Tensor:
    """Each example's mean next-token loss over its own completion tokens, shape (batch,).

    The token losses come from ``F.cross_entropy`` over (batch, vocab, length), not from
    ``token_logps``: that layout's log-softmax adds up the vocabulary in another order, and
    DP-SGD's gradients and the canary scores are kept bit-identical to what runs recorded.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    scores, targets = shifted(logits, batch["labels"])
    token_loss = torch.nn.functional.cross_entropy(
        scores.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts
