"""Held-out evaluation: token loss on answers and exact match of greedy generations.

``evaluate_model`` scores a model on tokenized held-out examples: mean answer-token loss,
exact match overall and per task (the ``data.task_column`` value of each row). Exact match
compares the stripped generated text with the stripped reference answer. Read-only: the
model's weights are never changed here.


Evaluate every stage of a run (base, local, centralized, federated, DPO) on the same held-out data.

For each model state, ``evaluate_stages`` measures: answer loss and perplexity (exp of the
mean answer-token loss) on the held-out SFT set; exact match overall, per task and, when
the training data says which institution mostly holds which task, per institution;
preference accuracy and mean reward margin of DPO's implicit reward against one reference
for all stages (the run's federated or centralized SFT adapter, the DPO reference, which
so scores 50%; the base model when there is neither) and the reference-free likelihood
accuracy (``fedft.dpo.preference_scores``); a forgetting probe (perplexity on general
text the base model knew); and a few generated samples. The result is written atomically
to ``RUN_DIR/evaluation.json``. ``evaluate_run`` does the same from a finished run's files.
A state of ``None`` is the base model: the seeded initial adapter, whose B = 0 makes it
compute exactly the base (as summary.json's "base" entry does). Weights are never trained
here, and the model's adapter is restored afterwards. Nothing here imports flwr.

At the end of a run loop (``state`` / ``dpo_state``: adapter tensors held in memory)::

    inputs = stage_inputs(cfg, tokenizer)
    sources = inputs.pop("sources")
    evaluate_stages(cfg, {"base": None, "federated": state, "dpo": dpo_state}, out_dir=run_dir, **inputs)


Record-level DP-SGD for one client's round with Opacus, on the 4-bit base + LoRA model.

``train_local_dp`` is the DP counterpart of ``fedft.train.train_local``: batches are
Poisson-sampled (each example independently with rate q = batch_size / n), every
example's gradient on the LoRA parameters is clipped to ``dp_sgd_clip_norm`` and Gaussian
noise with std sigma * clip is added to their sum (Opacus ``PrivacyEngine.make_private``
with ``wrap_model=False``: hooks on the model's trainable LoRA ``nn.Linear`` layers; the
frozen 4-bit layers are skipped).

The privacy unit is one sequence (one training example): the loss is the mean over the
batch of each example's own token-mean loss, so one example's gradient never depends on
the other examples in its batch (a token-mean over the whole batch would rescale every
example by the batch's token count and void the sensitivity bound). Gradient
checkpointing must be reentrant under Opacus (``fedft.model`` loads it that way when
``privacy.record_level`` is on): non-reentrant checkpointing silently loses per-sample
gradients. Gradient accumulation and FedProx are refused by the config. No flwr.
"""

from __future__ import annotations

from collections import defaultdict
import torch
from fedft.data.rows import IGNORE_INDEX, Example, collate
import math


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


# ---------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------

def perplexity(loss: float) -> float:
    """exp(mean token loss); ``inf`` where that overflows a float."""
    return math.exp(loss) if loss < 700 else float("inf")


def per_example_loss(model, batch: dict) -> torch.Tensor:
    """Each example's mean next-token loss over its own completion tokens, shape (batch,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=-100, reduction="none")
    counts = (labels != -100).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts
