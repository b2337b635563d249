"""The local SFT loop each client runs per round: AdamW, accumulation, clipping, FedProx.

``train_local`` starts from the global adapter it is given, runs ``train.local_steps``
optimizer steps on the client's tokenized examples and returns the new adapter tensors
with the number of examples and the mean training loss. The learning-rate schedule spans
all rounds (step = (round - 1) * local_steps + local step), so clients decay together.
With ``proximal_mu > 0`` the FedProx term (mu / 2) * ||w - w_global||^2 over the adapter
parameters is added to the loss. Nothing here knows about Flower or the network.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fedft.config import TrainConfig
from fedft.data.rows import Example, collate
from fedft.model.adapter import get_adapter_state, set_adapter_state
from fedft.train.optimizer_state import restore_state, saved_state, trainable_names


@dataclass(frozen=True)
class LocalResult:
    """What a client's round produced."""

    state: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    steps: int
    rank: int = 0  # the client's LoRA rank (set by fedft.federated.client_round)
    clipped: bool = False  # DP-FedAvg: the update was scaled down to privacy.clip_norm
    dp_sgd: object = None  # record-level DP: fedft.privacy.dpsgd.DpSgdRound spent this round
    lr_sum: float | None = None  # SCAFFOLD: the sum of the round's per-step learning rates
    optimizer_state: dict | None = None  # train.keep_optimizer_state: the AdamW moments after the round
    optimizer_restored: int = 0  # how many parameters continued from the previous round's moments


def lr_multiplier(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Warmup then constant / linear / cosine decay; ``step`` counts from 0 across rounds."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_indices(num_examples: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless shuffled epochs of batch indices (the last short batch of an epoch is kept)."""
    rng = random.Random(seed)
    while True:
        order = list(range(num_examples))
        rng.shuffle(order)
        for start in range(0, num_examples, batch_size):
            yield order[start:start + batch_size]


def proximal_term(params: list[torch.Tensor], anchors: list[torch.Tensor]) -> torch.Tensor:
    """sum ||w - w_global||^2 over the trainable adapter tensors."""
    return sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))


def train_local(
    model,
    examples: list[Example],
    pad_id: int,
    cfg: TrainConfig,
    *,
    global_state: dict[str, torch.Tensor],
    round_index: int,
    total_rounds: int,
    proximal_mu: float = 0.0,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    correction: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, torch.Tensor] | None = None,
) -> LocalResult:
    """Run ``cfg.local_steps`` optimizer steps from ``global_state``; return the new adapter.

    ``correction`` (SCAFFOLD's ``c - c_i``, by adapter tensor name) moves the adapter by
    ``-lr * correction`` after every optimizer step; the result then carries ``lr_sum``.
    With ``cfg.keep_optimizer_state`` AdamW starts from ``optimizer_state`` (this client's
    previous round, ``fedft.train.optimizer_state``; ``None`` or ``{}``: fresh) and the result
    carries the moments after this round.
    """
    if not examples:
        raise ValueError("train_local: this client has no training examples")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    set_adapter_state(model, global_state)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    corrections = correction_pairs(model, correction) if correction is not None else []
    lr_sum = 0.0
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    named = trainable_names(model) if cfg.keep_optimizer_state else []
    restored = restore_state(optimizer, named, optimizer_state) if optimizer_state else 0
    total_steps = total_rounds * cfg.local_steps
    first_step = (round_index - 1) * cfg.local_steps
    batches = batch_indices(len(examples), cfg.batch_size, seed)
    torch.manual_seed(seed)  # LoRA dropout
    model.train()
    losses = []
    proximal = (lambda: (proximal_mu / 2) * proximal_term(params, anchors)) if proximal_mu > 0 else None
    for step in range(cfg.local_steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate * lr_multiplier(first_step + step, total_steps, cfg)
        step_loss = _accumulate_gradients(model, [[examples[i] for i in next(batches)] for _ in range(cfg.grad_accum)],
                                          pad_id, device, proximal)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]
        lr_sum += lr
        with torch.no_grad():
            for param, term in corrections:
                param.add_(term, alpha=-lr)
        losses.append(step_loss)
        if on_step is not None:
            on_step(step, step_loss)
    model.eval()
    return LocalResult(
        state=get_adapter_state(model), num_examples=len(examples),
        train_loss=sum(losses) / len(losses), steps=cfg.local_steps,
        lr_sum=lr_sum if correction is not None else None,
        optimizer_state=saved_state(optimizer, named) if cfg.keep_optimizer_state else None,
        optimizer_restored=restored,
    )


def _accumulate_gradients(model, micro_batches: list[list[Example]], pad_id: int, device,
                          proximal: Callable[[], torch.Tensor] | None) -> float:
    """Backpropagate one optimizer step's micro-batches (each loss divided by their number, plus
    the proximal term when given); returns the step's mean loss."""
    step_loss = 0.0
    for examples in micro_batches:
        batch = {k: v.to(device) for k, v in collate(examples, pad_id).items()}
        loss = model(**batch).loss
        step_loss += loss.item() / len(micro_batches)
        if proximal is not None:
            loss = loss + proximal()
        (loss / len(micro_batches)).backward()
    return step_loss


def correction_pairs(model, correction: dict[str, torch.Tensor]) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Each trainable LoRA parameter with its correction tensor (names as the adapter state has them)."""
    pairs = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = name.replace(".default.", ".")
            if key not in correction:
                raise ValueError(f"the SCAFFOLD correction has no tensor for {key}")
            pairs.append((param, correction[key].to(param.device, param.dtype)))
    return pairs
