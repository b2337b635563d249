"""Record-level DP-SGD for one client's round with Opacus, on the 4-bit base + LoRA model.

``train_local_dp`` is the DP counterpart of ``fedft.train.local.train_local``: batches are
Poisson-sampled (each example independently with rate q = batch_size / n), every
example's gradient on the LoRA parameters is clipped to ``dp_sgd_clip_norm`` and Gaussian
noise with std sigma * clip is added to their sum (Opacus ``PrivacyEngine.make_private``
with ``wrap_model=False``: hooks on the model's trainable LoRA ``nn.Linear`` layers; the
frozen 4-bit layers are skipped).

The privacy unit is one sequence (one training example): the loss is the mean over the
batch of each example's own token-mean loss (``fedft.score.answers.per_example_loss``), so
one example's gradient never depends on the other examples in its batch. Gradient
checkpointing must be reentrant under Opacus (``fedft.model.load`` loads it that way when
``privacy.record_level`` is on): non-reentrant checkpointing silently loses per-sample
gradients. Gradient accumulation and FedProx are refused by the config.
"""

from __future__ import annotations

import logging

import torch

from fedft.config import PrivacyConfig, TrainConfig
from fedft.data.rows import Example, collate
from fedft.model.adapter import get_adapter_state, set_adapter_state
from fedft.privacy import accounting
from fedft.privacy.client_accountant import DpSgdRound
from fedft.score.answers import per_example_loss
from fedft.train.local import LocalResult, lr_multiplier
from fedft.train.optimizer_state import restore_state, saved_state, trainable_names


def noise_for_client(privacy: PrivacyConfig, *, sample_rate: float, local_steps: int, num_rounds: int) -> float:
    """sigma: ``privacy.dp_sgd_noise_multiplier``, or calibrated to ``dp_sgd_target_epsilon``.

    Calibration covers the whole planned run (``num_rounds`` x ``local_steps`` steps at
    ``sample_rate``) so that a client that trains every round ends at the target, by the RDP
    accountant.
    """
    if privacy.dp_sgd_target_epsilon <= 0:
        return privacy.dp_sgd_noise_multiplier
    return accounting.calibrate_noise_multiplier(
        privacy.dp_sgd_target_epsilon, privacy.delta, sample_rate, local_steps, num_rounds)


def planned_round(train: TrainConfig, privacy: PrivacyConfig, total_rounds: int, num_examples: int) -> DpSgdRound:
    """What one round of DP-SGD on ``num_examples`` examples will be: q, sigma and the steps.

    ``train`` gives the batch size and steps, ``privacy`` sigma (or its target), ``total_rounds``
    the run's planned rounds (``strategy.num_rounds``) a calibrated sigma covers.
    """
    q = accounting.record_sample_rate(num_examples, train.batch_size)
    sigma = noise_for_client(privacy, sample_rate=q, local_steps=train.local_steps, num_rounds=total_rounds)
    return DpSgdRound(sample_rate=q, noise_multiplier=sigma, steps=train.local_steps)


class _Indices(torch.utils.data.Dataset):
    """Example indices as 1-tuples of tensors (the item shape Opacus's loader expects)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return (torch.tensor(i),)


def train_local_dp(
    model,
    examples: list[Example],
    pad_id: int,
    train: TrainConfig,
    privacy: PrivacyConfig,
    *,
    global_state: dict[str, torch.Tensor],
    round_index: int,
    total_rounds: int,
    noise_generator: torch.Generator,
    seed: int = 0,
    planned: DpSgdRound | None = None,
    optimizer_state: dict[str, torch.Tensor] | None = None,
) -> tuple[LocalResult, DpSgdRound]:
    """``train.local_steps`` DP-SGD steps from ``global_state``; the adapter and what it spent.

    ``train`` and ``privacy`` are the run's sections; ``total_rounds`` (``strategy.num_rounds``) sets
    the learning-rate schedule's length and a calibrated sigma. ``planned`` is the round a caller
    already checked against its limits (``planned_round``); without it the round is planned here.
    With ``train.keep_optimizer_state`` AdamW continues from ``optimizer_state`` (moments of noised,
    clipped gradients: post-processing, no extra privacy cost) and the result carries the new ones."""
    if not examples:
        raise ValueError("train_local_dp: this client has no training examples")
    if train.num_threads:
        torch.set_num_threads(train.num_threads)
    set_adapter_state(model, global_state)
    params = [p for p in model.parameters() if p.requires_grad]
    planned = planned if planned is not None else planned_round(train, privacy, total_rounds, len(examples))
    sigma = planned.noise_multiplier
    hooks, dp_optimizer, dp_loader = _make_private(model, params, train, privacy, len(examples), sigma,
                                                   noise_generator, seed)
    named = trainable_names(model) if train.keep_optimizer_state else []
    inner = dp_optimizer.original_optimizer
    restored = restore_state(inner, named, optimizer_state) if optimizer_state else 0
    torch.manual_seed(seed)  # LoRA dropout
    try:
        losses = _dp_steps(model, examples, pad_id, train, dp_optimizer, dp_loader, round_index,
                           total_rounds=total_rounds, device=params[0].device)
    finally:
        hooks.cleanup() if hasattr(hooks, "cleanup") else hooks.remove_hooks()
        for p in params:
            p.grad_sample = None
            p.grad = None
        model.eval()
    result = LocalResult(
        state=get_adapter_state(model), num_examples=len(examples),
        train_loss=sum(losses) / len(losses) if losses else float("nan"), steps=train.local_steps,
        optimizer_state=saved_state(inner, named) if train.keep_optimizer_state else None,
        optimizer_restored=restored,
    )
    return result, planned


def _make_private(model, params: list[torch.nn.Parameter], train: TrainConfig, privacy: PrivacyConfig,
                  num_examples: int, sigma: float, noise_generator: torch.Generator, seed: int):
    """Opacus's (hooks, DP optimizer, Poisson loader) on the trainable LoRA layers; the model in train mode.

    ``train`` gives the optimizer and batch size, ``privacy.dp_sgd_clip_norm`` the per-example bound."""
    from opacus import PrivacyEngine

    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    loader = torch.utils.data.DataLoader(
        _Indices(num_examples), batch_size=train.batch_size,
        generator=torch.Generator().manual_seed(seed))
    logging.getLogger("opacus").setLevel(logging.ERROR)
    model.train()  # Opacus refuses a model in eval mode (the cached model ends rounds in eval)
    engine = PrivacyEngine(accountant="rdp")
    return engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
        max_grad_norm=privacy.dp_sgd_clip_norm, poisson_sampling=True, wrap_model=False,
        noise_generator=on_device(noise_generator, params[0].device), loss_reduction="mean",
    )


def on_device(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """``generator`` where the noise is drawn: Opacus draws it on the gradients' device, and torch
    refuses a CPU generator for CUDA tensors. A generator on another device is seeded with 62 bits
    drawn from ``generator`` (so a fixed test seed stays reproducible, a secret seed stays secret)."""
    if generator.device.type == torch.device(device).type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def _dp_steps(model, examples: list[Example], pad_id: int, train: TrainConfig, dp_optimizer, dp_loader,
              round_index: int, *, total_rounds: int, device: torch.device) -> list[float]:
    """The round's ``train.local_steps`` noisy steps on the schedule of ``total_rounds`` rounds; each step's loss."""
    total_steps = total_rounds * train.local_steps
    first_step = (round_index - 1) * train.local_steps
    losses = []
    batches = _endless(dp_loader)
    for step in range(train.local_steps):
        for group in dp_optimizer.param_groups:
            group["lr"] = train.learning_rate * lr_multiplier(first_step + step, total_steps, train)
        (indices,) = next(batches)
        if indices.numel() == 0:  # an empty Poisson batch: nothing to release, skip
            continue
        batch = collate([examples[int(i)] for i in indices], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = per_example_loss(model, batch).mean()
        loss.backward()
        dp_optimizer.step()
        dp_optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _endless(loader):
    """Iterate a Poisson loader forever (each pass draws fresh batches)."""
    while True:
        yield from loader
