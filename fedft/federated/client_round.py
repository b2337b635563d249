"""One client's side of a round, without Flower: its data (prepared once) and its training.

``client_examples`` loads and tokenizes a client's data the first time it is asked and
keeps it for the life of the process: a simulated client takes its partition of the
configured training files (``partition_id``); a deployed institution reads its own file
(``data_path``). ``run_client_round`` trains the cached model from the global adapter
(SFT, or DP-SGD under record-level privacy) and returns what may leave the client. The
Flower ClientApp calls it.
"""

from __future__ import annotations

import dataclasses
import threading

import torch

from fedft.config import ConfigError, FedftConfig
from fedft.data.partition import cached_partitions
from fedft.data.rows import DataError, Example, load_dataset_files, tokenize_dataset
from fedft.federated.admission import check_noise
from fedft.federated.exchange import wire_dtype
from fedft.federated.lora_aggregate import (
    LORA_A,
    adapter_rank,
    b_only,
    truncate_to_rank,
)
from fedft.model.load import cached_peft_model, initial_adapter_state, model_spec
from fedft.privacy.client_accountant import RecordLevelAccountant
from fedft.privacy.dpfedavg import adapter_delta, clip_update, secure_generator
from fedft.train.local import LocalResult, train_local

_EXAMPLES: dict = {}
_LOCK = threading.Lock()


def client_examples(
    cfg: FedftConfig, tokenizer, *, partition_id: int | None = None, data_path: str | None = None
) -> list[Example]:
    """This client's tokenized training examples, built once per process."""
    p = cfg.privacy
    key = (cfg.data, cfg.simulation.num_supernodes, cfg.model_path, partition_id, data_path,
           cfg.seed, p.canaries, p.canary_client, p.canary_repeats)
    with _LOCK:
        if key not in _EXAMPLES:
            if data_path:
                rows = load_dataset_files([data_path], cfg.data.columns)
            elif partition_id is not None:
                parts = cached_partitions(cfg.data, cfg.simulation.num_supernodes)
                if not 0 <= partition_id < len(parts):
                    raise DataError(f"partition-id {partition_id} is outside 0..{len(parts) - 1}")
                rows = parts[partition_id]
            else:
                raise DataError("a client needs either a partition-id (simulation) or a data-path")
            examples = tokenize_dataset(rows, tokenizer, cfg.data)
            if not examples:
                raise DataError(f"client {partition_id if data_path is None else data_path} has no examples")
            if p.canaries and data_path is None and partition_id == p.canary_client:
                from fedft.privacy.canaries import canary_training_examples

                examples = examples + canary_training_examples(cfg, tokenizer)  # audit only
            _EXAMPLES[key] = examples
        return _EXAMPLES[key]


def client_seed(cfg: FedftConfig, round_index: int, client_index: int) -> int:
    """A distinct, reproducible seed for each (run seed, round, client)."""
    return (cfg.seed * 1_000_003 + round_index * 10_007 + client_index) % (2**31)


def client_rank(cfg: FedftConfig, partition_id: int | None = None, node_rank: int | None = None) -> int:
    """This client's LoRA rank: its node config's, else its simulated partition's, else lora.r."""
    if node_rank is not None:
        rank, where = node_rank, "node config lora-rank"
    elif partition_id is not None and cfg.lora.client_ranks:
        rank, where = cfg.lora.client_ranks[partition_id], f"lora.client_ranks[{partition_id}]"
    else:
        return cfg.lora.r
    if not 1 <= rank <= cfg.lora.r:
        raise ConfigError(f"{where} = {rank} is not allowed; expected 1..lora.r = {cfg.lora.r}")
    if rank != cfg.lora.r and cfg.strategy.aggregation == "ffa":
        raise ConfigError(f"{where} = {rank}: strategy.aggregation = 'ffa' needs every client at rank {cfg.lora.r}")
    return rank


def config_for_rank(cfg: FedftConfig, rank: int) -> FedftConfig:
    """The config of a client training rank ``rank``: alpha scales with it, so alpha / r is shared."""
    if rank == cfg.lora.r:
        return cfg
    lora = dataclasses.replace(cfg.lora, r=rank, alpha=cfg.lora.alpha * rank / cfg.lora.r)
    return dataclasses.replace(cfg, lora=lora)


def received_to_start_state(cfg: FedftConfig, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter a client starts its round from, given what the server sent.

    Tensors arrive in the wire dtype and are trained in float32. Under FFA-LoRA only B
    travels: A is the shared seeded initialisation every client already holds. A global
    adapter of higher rank than this client's is truncated to its first components.
    """
    state = {k: v.to(torch.float32) for k, v in received.items()}
    if cfg.strategy.aggregation == "ffa":
        initial = initial_adapter_state(model_spec(cfg))
        state = {**{k: v for k, v in initial.items() if f".{LORA_A}." in k}, **b_only(state)}
    if adapter_rank(state) > cfg.lora.r:
        state = truncate_to_rank(state, cfg.lora.r)
    return state


def reply_state(cfg: FedftConfig, trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What leaves the client: B only under FFA-LoRA, in the configured wire dtype."""
    state = b_only(trained) if cfg.strategy.aggregation == "ffa" else trained
    return {k: v.to(wire_dtype(cfg.strategy)) for k, v in state.items()}


def private_reply(
    cfg: FedftConfig, start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], bool]:
    """DP-FedAvg: the update (trained - start) on the tensors that travel, clipped to C here.

    Clipping happens before anything leaves the institution, so the server never holds
    an unclipped update.
    """
    sent = reply_state(cfg, trained)
    return clip_update(adapter_delta(sent, start), cfg.privacy.clip_norm)


def run_client_round(
    cfg: FedftConfig,
    received_state: dict[str, torch.Tensor],
    round_index: int,
    *,
    proximal_mu: float = 0.0,
    partition_id: int | None = None,
    data_path: str | None = None,
    client_index: int = 0,
    node_rank: int | None = None,
    accountant: RecordLevelAccountant | None = None,
    max_epsilon: float | None = None,
    min_noise_multiplier: float = 0.0,
    noise_generator: torch.Generator | None = None,
    correction: dict[str, torch.Tensor] | None = None,
) -> LocalResult:
    """Train this client's cached model for one round from the server's adapter.

    ``correction`` is SCAFFOLD's ``c - c_i`` from the server (``fedft.federated.scaffold``).

    The returned ``state`` is the reply payload (``reply_state``); ``rank`` is this
    client's LoRA rank, which the server needs for heterogeneous-rank aggregation. Under
    record-level DP the round is first checked against ``max_epsilon`` (else
    ``privacy.client_max_epsilon``) and ``min_noise_multiplier`` with the client's
    ``accountant``, which then records the round's spend (``ClientDeclined`` when the limit
    would be passed; nothing is trained).
    """
    cfg = config_for_rank(cfg, client_rank(cfg, partition_id, node_rank))
    model, tokenizer = cached_peft_model(model_spec(cfg))
    examples = client_examples(cfg, tokenizer, partition_id=partition_id, data_path=data_path)
    freeze_a = cfg.strategy.aggregation == "ffa"
    for name, param in model.named_parameters():
        if f".{LORA_A}." in name:
            param.requires_grad = not freeze_a
    start = received_to_start_state(cfg, received_state)
    seed = client_seed(cfg, round_index, client_index)
    if correction is not None and (cfg.privacy.record_level or cfg.privacy.user_level):
        raise ConfigError("a SCAFFOLD correction arrived with differential privacy on; fedft does not combine them")
    if cfg.privacy.record_level:
        result = _dp_sgd_round(cfg, model, tokenizer.pad_token_id, examples, start, round_index, seed,
                               accountant=accountant if accountant is not None else RecordLevelAccountant(),
                               max_epsilon=max_epsilon if max_epsilon is not None else cfg.privacy.client_max_epsilon,
                               min_noise_multiplier=min_noise_multiplier,
                               noise_generator=noise_generator or secure_generator())
    else:
        result = train_local(
            model, examples, tokenizer.pad_token_id, cfg.train,
            global_state=start, round_index=round_index,
            total_rounds=cfg.strategy.num_rounds, proximal_mu=proximal_mu, seed=seed,
            correction=None if correction is None else {k: v.to(torch.float32) for k, v in correction.items()},
        )
    if cfg.privacy.user_level:
        update, clipped = private_reply(cfg, start, result.state)
        return dataclasses.replace(result, state=update, rank=cfg.lora.r, clipped=clipped)
    return dataclasses.replace(result, state=reply_state(cfg, result.state), rank=cfg.lora.r)


def _dp_sgd_round(cfg: FedftConfig, model, pad_id: int, examples: list, start: dict[str, torch.Tensor],
                  round_index: int, seed: int, *, accountant: RecordLevelAccountant, max_epsilon: float,
                  min_noise_multiplier: float, noise_generator: torch.Generator) -> LocalResult:
    """Record-level DP-SGD: the planned round checked against the noise floor and the epsilon
    limit first (``ClientDeclined``: nothing trained), then trained and its spend recorded."""
    from fedft.privacy.dpsgd import planned_round, train_local_dp

    planned = planned_round(cfg, len(examples))
    check_noise(planned.noise_multiplier, min_noise_multiplier)
    accountant.check(planned, cfg.privacy.delta, max_epsilon)
    result, spent = train_local_dp(model, examples, pad_id, cfg, global_state=start, round_index=round_index,
                                   noise_generator=noise_generator, seed=seed, planned=planned)
    accountant.step(spent)
    return dataclasses.replace(result, dp_sgd=spent)
