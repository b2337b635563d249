"""Held-out evaluation: token loss on answers and exact match of greedy generations.

``evaluate_model`` scores a model on tokenized held-out examples: mean answer-token loss,
exact match overall and per task (the ``data.task_column`` value of each row). Exact match
compares the stripped generated text with the stripped reference answer. Read-only: the
model's weights are never changed here.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from fedft.data import IGNORE_INDEX, Example, collate


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
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        total += losses.item()
        count += int((targets != IGNORE_INDEX).sum())
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


def evaluate_model(model, tokenizer, examples: list[Example], batch_size: int = 32) -> dict:
    """Loss, exact match and per-task exact match on held-out examples."""
    predictions = generate_answers(model, tokenizer, examples, batch_size)
    overall, by_task = exact_match(predictions, examples)
    return {
        "eval_loss": answer_loss(model, examples, tokenizer.pad_token_id, batch_size),
        "eval_exact_match": overall,
        "eval_exact_match_by_task": by_task,
        "samples": [
            {"prompt_source": e.source, "reference": e.reference, "prediction": p}
            for e, p in list(zip(examples, predictions))[:5]
        ],
    }


def load_eval_examples(cfg, tokenizer) -> list[Example]:
    """The held-out set, tokenized; at most ``data.eval_max_examples`` rows, drawn evenly."""
    import random

    from fedft.data import load_dataset_files, tokenize_dataset

    rows = load_dataset_files([cfg.data.eval_file])
    indices = list(range(len(rows)))
    if len(indices) > cfg.data.eval_max_examples:
        indices = sorted(random.Random(cfg.data.seed).sample(indices, cfg.data.eval_max_examples))
    return tokenize_dataset(rows.select(indices), tokenizer, cfg.data.max_length, cfg.data.task_column)


class HeldOutEvaluator:
    """Scores adapter states on the held-out set with one cached model."""

    def __init__(self, cfg) -> None:
        from fedft.model import cached_peft_model, initial_adapter_state

        self.model, self.tokenizer = cached_peft_model(cfg)
        self.examples = load_eval_examples(cfg, self.tokenizer)
        self.initial_state = initial_adapter_state(cfg)

    def __call__(self, state) -> dict:
        from fedft.model import set_adapter_state

        set_adapter_state(self.model, state)
        return evaluate_model(self.model, self.tokenizer, self.examples)
