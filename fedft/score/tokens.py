"""Next-token log-probabilities of labelled tokens: where a causal LM's logits meet its labels.

Position t of the logits predicts the token at t + 1, so the logits lose their last position
and the labels their first (``shifted``); positions labelled ``IGNORE_INDEX`` (prompt,
padding) are masked out. ``token_logps`` gives each position's float32 log-probability of
its target with that mask, and the scores reduce it: ``fedft.score.answers`` to the loss
per answer token, ``fedft.score.preference`` to each answer's summed log-probability.
Pure tensor functions: no model, no files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedft.data.rows import IGNORE_INDEX


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``logits[:, :-1]`` in float32, ``labels[:, 1:]``): each position's scores and the token it predicts."""
    return logits[:, :-1].float(), labels[:, 1:]


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's log-probability of its next token, shape (batch, length - 1), and the labelled mask.

    ``logits`` (batch, length, vocab) of a causal LM, ``labels`` (batch, length) with
    ``IGNORE_INDEX`` off the answer. The log-softmax runs in float32 over the vocabulary.
    An unlabelled position holds a meaningless value (the log-probability of token 0):
    reduce through the mask.
    """
    scores, targets = shifted(logits, labels)
    mask = targets != IGNORE_INDEX
    logps = torch.log_softmax(scores, dim=-1)
    return torch.gather(logps, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1), mask


def summed_nll(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of -log p over the labelled positions of ``token_logps``' output, a 0-dim tensor.

    Summed by ``F.nll_loss`` (one column, target 0, unlabelled positions ignored), which adds
    in the order ``F.cross_entropy(..., reduction="sum")`` does over the flattened positions:
    the held-out loss stays bit-identical to that cross-entropy's.
    """
    targets = torch.where(mask, 0, IGNORE_INDEX).reshape(-1)
    return F.nll_loss(logps.reshape(-1, 1), targets, ignore_index=IGNORE_INDEX, reduction="sum")
