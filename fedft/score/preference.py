"""Preference scores: sequence log-probabilities of chosen / rejected answers and DPO's rewards.

``dpo_loss`` is DPO's sigmoid loss (Rafailov et al., 2023, arXiv:2305.18290), the one TRL's
``DPOTrainer`` optimises. ``scored_logps`` gives the summed answer log-probability of each
pair's chosen and rejected answer (``fedft.score.tokens``) under the active adapter (or the
base). ``preference_scores`` is pure: from policy and reference log-probs it gives the
implicit-reward accuracy (beta * log(pi / pi_ref)), the mean reward margin and the
reference-free likelihood accuracy (how often the model itself ranks the chosen answer
first). No training here.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fedft.data.preferences import TokenizedPair
from fedft.data.rows import IGNORE_INDEX
from fedft.score.tokens import token_logps


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss and the implicit rewards of each answer (Rafailov et al., eq. 7).

    reward(y) = beta * (log pi(y|x) - log pi_ref(y|x)), summed over answer tokens;
    loss = mean over pairs of -log sigmoid(reward(chosen) - reward(rejected)).
    TRL's ``DPOTrainer`` with ``loss_type="sigmoid"`` and ``label_smoothing=0`` computes the
    same quantity (``-F.logsigmoid(beta * (chosen_logratios - rejected_logratios))``) and logs
    the same rewards (``rewards/chosen``, ``rewards/margins``). With ``dpo.sft_weight > 0``
    training adds TRL's ``"sft"`` term, sft_weight * the chosen answers' mean token NLL (RPO,
    Pang et al. 2024, arXiv:2404.19733), which this function leaves out.
    Returns (loss, chosen rewards, rejected rewards); the rewards carry no gradient.
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def pair_batch(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels``: every chosen row, then every rejected.

    Labels are -100 on the prompt and padding, so only answer tokens count.
    """
    sequences = [(p.chosen_ids, p.prompt_len) for p in pairs] + [(p.rejected_ids, p.prompt_len) for p in pairs]
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
        attention[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log-probabilities of each row's labelled (answer) tokens, shape (rows,), float32."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits
    logps, mask = token_logps(logits, batch["labels"].to(device))
    return (logps * mask).sum(dim=1)


@torch.no_grad()
def pair_logps(model, pairs: list[TokenizedPair], pad_id: int, batch_size: int = 32
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) answer log-probabilities under the model's active adapter(s)."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        logps = sequence_logps(model, pair_batch(chunk, pad_id)).cpu()
        chosen.append(logps[:len(chunk)])
        rejected.append(logps[len(chunk):])
    return torch.cat(chosen), torch.cat(rejected)


@contextlib.contextmanager
def eval_mode(model):
    """``model.eval()`` for the block, then the previous train/eval mode again."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def scored_logps(model, pairs: list[TokenizedPair], pad_id: int, *, base: bool = False,
                 batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``pair_logps`` in eval mode, under the active adapter or (``base``) with it disabled."""
    with eval_mode(model), (model.disable_adapter() if base else contextlib.nullcontext()):
        return pair_logps(model, pairs, pad_id, batch_size)


def preference_scores(policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
                      tasks: list[str], beta: float) -> dict:
    """Preference metrics from (chosen, rejected) answer log-probs of a policy and a reference.

    The implicit reward of an answer is beta * (log pi(y|x) - log pi_ref(y|x)) (DPO's own
    reward). ``pref_accuracy``: share of pairs whose chosen answer out-earns the rejected one,
    an exact tie counting one half (so the reference itself scores exactly 50%);
    ``reward_margin``: mean reward(chosen) - reward(rejected). ``likelihood_accuracy`` needs
    no reference: the share of pairs where the policy gives the chosen answer the higher
    log-probability, i.e. what the model itself would pick. Pure.
    """
    _, chosen_rewards, rejected_rewards = dpo_loss(policy[0], policy[1], reference[0], reference[1], beta)
    margins = chosen_rewards - rejected_rewards
    wins = (margins > 0).float() + 0.5 * (margins == 0).float()
    gaps = policy[0] - policy[1]
    likely = (gaps > 0).float() + 0.5 * (gaps == 0).float()
    by_task: dict[str, list[float]] = {}
    for task, win in zip(tasks, wins.tolist(), strict=True):
        by_task.setdefault(task, []).append(win)
    return {
        "pref_accuracy": wins.mean().item(),
        "reward_margin": margins.mean().item(),
        "likelihood_accuracy": likely.mean().item(),
        "pref_accuracy_by_task": {t: sum(w) / len(w) for t, w in sorted(by_task.items())},
        "pairs": len(tasks),
    }


def preference_metrics(model, pairs: list[TokenizedPair], pad_id: int, *, beta: float = 0.1,
                       reference: tuple[torch.Tensor, torch.Tensor] | None = None, batch_size: int = 32) -> dict:
    """``preference_scores`` of the model's active adapter on ``pairs``.

    ``reference`` is the reference model's (chosen, rejected) log-probs on the same pairs
    (``scored_logps``); without it the reference is the base model (adapter disabled).
    """
    policy = scored_logps(model, pairs, pad_id, batch_size=batch_size)
    if reference is None:
        reference = scored_logps(model, pairs, pad_id, base=True, batch_size=batch_size)
    return preference_scores(policy, reference, [p.task for p in pairs], beta)
