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

from fedft.config import ConfigError, DataConfig, FedftConfig, LoraConfig, PrivacyConfig, StrategyConfig, TrainConfig
from fedft.data.partition import cached_partitions
from fedft.data.rows import DataError, Example, load_row_files, tokenize_dataset
from fedft.federated.admission import check_noise
from fedft.federated.exchange import wire_dtype
from fedft.federated.lora_aggregate import (
    LORA_A,
    adapter_rank,
    b_only,
    truncate_to_rank,
)
from fedft.model.load import ModelSpec, cached_peft_model, initial_adapter_state, model_spec
from fedft.privacy.client_accountant import RecordLevelAccountant
from fedft.privacy.dpfedavg import adapter_delta, clip_update, secure_generator
from fedft.train.local import LocalResult, train_local

_EXAMPLES: dict = {}
_LOCK = threading.Lock()


def client_examples(
    data: DataConfig, tokenizer, *, num_partitions: int, partition_id: int | None = None,
    data_path: str | None = None,
) -> list[Example]:
    """This client's tokenized training examples, built once per process.

    A simulated client takes partition ``partition_id`` of ``data.train_files`` split into
    ``num_partitions``; a deployed one reads its own ``data_path``. The cache key is what the
    examples depend on: the data section, the partition, the path and the tokenizer's source.
    """
    key = (data, num_partitions, tokenizer.name_or_path, partition_id, data_path)
    with _LOCK:
        if key not in _EXAMPLES:
            if data_path:
                rows = load_row_files([data_path], data.columns)
            elif partition_id is not None:
                parts = cached_partitions(data, num_partitions)
                if not 0 <= partition_id < len(parts):
                    raise DataError(f"partition-id {partition_id} is outside 0..{len(parts) - 1}")
                rows = parts[partition_id]
            else:
                raise DataError("a client needs either a partition-id (simulation) or a data-path")
            examples = tokenize_dataset(rows, tokenizer, data)
            if not examples:
                raise DataError(f"client {partition_id if data_path is None else data_path} has no examples")
            _EXAMPLES[key] = examples
        return _EXAMPLES[key]


def with_canaries(examples: list[Example], privacy: PrivacyConfig, tokenizer, *, seed: int, max_length: int,
                  partition_id: int | None, data_path: str | None) -> list[Example]:
    """``examples`` plus the audit's canaries when this simulated client is ``privacy.canary_client``."""
    if not privacy.canaries or data_path is not None or partition_id != privacy.canary_client:
        return examples
    from fedft.privacy.canaries import canary_training_examples

    return examples + canary_training_examples(privacy, tokenizer, seed=seed, max_length=max_length)


def client_seed(seed: int, round_index: int, client_index: int) -> int:
    """A distinct, reproducible seed for each (run ``seed``, round, client)."""
    return (seed * 1_000_003 + round_index * 10_007 + client_index) % (2**31)


def client_rank(lora: LoraConfig, strategy: StrategyConfig, partition_id: int | None = None,
                node_rank: int | None = None) -> int:
    """This client's LoRA rank: its node config's, else its simulated partition's, else lora.r.

    ``lora`` gives the global rank and the simulated clients' ranks; ``strategy.aggregation``
    refuses a lower rank under FFA-LoRA.
    """
    if node_rank is not None:
        rank, where = node_rank, "node config lora-rank"
    elif partition_id is not None and lora.client_ranks:
        rank, where = lora.client_ranks[partition_id], f"lora.client_ranks[{partition_id}]"
    else:
        return lora.r
    if not 1 <= rank <= lora.r:
        raise ConfigError(f"{where} = {rank} is not allowed; expected 1..lora.r = {lora.r}")
    if rank != lora.r and strategy.aggregation == "ffa":
        raise ConfigError(f"{where} = {rank}: strategy.aggregation = 'ffa' needs every client at rank {lora.r}")
    return rank


def lora_for_rank(lora: LoraConfig, rank: int) -> LoraConfig:
    """The [lora] section of a client training rank ``rank``: alpha scales with it, so alpha / r is shared."""
    if rank == lora.r:
        return lora
    return dataclasses.replace(lora, r=rank, alpha=lora.alpha * rank / lora.r)


def received_to_start_state(spec: ModelSpec, strategy: StrategyConfig,
                            received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter a client starts its round from, given what the server sent.

    Takes the client's ``ModelSpec`` (its rank ``spec.lora.r``; its seeded initial A) and the
    ``strategy`` (FFA-LoRA or not). Tensors arrive in the wire dtype and are trained in float32.
    Under FFA-LoRA only B travels: A is the shared seeded initialisation every client already
    holds. A global adapter of higher rank than this client's is truncated to its first components.
    """
    state = {k: v.to(torch.float32) for k, v in received.items()}
    if strategy.aggregation == "ffa":
        initial = initial_adapter_state(spec)
        state = {**{k: v for k, v in initial.items() if f".{LORA_A}." in k}, **b_only(state)}
    if adapter_rank(state) > spec.lora.r:
        state = truncate_to_rank(state, spec.lora.r)
    return state


def reply_state(strategy: StrategyConfig, trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What leaves the client: B only under FFA-LoRA, in ``strategy.wire_dtype``."""
    state = b_only(trained) if strategy.aggregation == "ffa" else trained
    return {k: v.to(wire_dtype(strategy)) for k, v in state.items()}


def private_reply(
    strategy: StrategyConfig, privacy: PrivacyConfig, start: dict[str, torch.Tensor],
    trained: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], bool]:
    """DP-FedAvg: the update (trained - start) on the tensors that travel, clipped to C here.

    ``strategy`` decides what travels (``reply_state``), ``privacy.clip_norm`` is C. Clipping
    happens before anything leaves the institution, so the server never holds an unclipped update.
    """
    sent = reply_state(strategy, trained)
    return clip_update(adapter_delta(sent, start), privacy.clip_norm)


def train_lora_a(model, trainable: bool) -> None:
    """Whether the LoRA A factors train this round (FFA-LoRA keeps them at their shared start)."""
    for name, param in model.named_parameters():
        if f".{LORA_A}." in name:
            param.requires_grad = trainable


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
    optimizer_state: dict[str, torch.Tensor] | None = None,
) -> LocalResult:
    """Train this client's cached model for one round from the server's adapter.

    ``correction`` is SCAFFOLD's ``c - c_i`` from the server (``fedft.federated.scaffold``).
    ``optimizer_state`` is this client's AdamW moments from its previous round
    (``train.keep_optimizer_state``; the result carries the new ones, which stay here).

    The returned ``state`` is the reply payload (``reply_state``); ``rank`` is this
    client's LoRA rank, which the server needs for heterogeneous-rank aggregation. Under
    record-level DP the round is first checked against ``max_epsilon`` (else
    ``privacy.client_max_epsilon``) and ``min_noise_multiplier`` with the client's
    ``accountant``, which then records the round's spend (``ClientDeclined`` when the limit
    would be passed; nothing is trained).
    """
    rank = client_rank(cfg.lora, cfg.strategy, partition_id, node_rank)
    cfg = dataclasses.replace(cfg, lora=lora_for_rank(cfg.lora, rank))
    spec = model_spec(cfg)
    model, tokenizer = cached_peft_model(spec)
    examples = client_examples(cfg.data, tokenizer, num_partitions=cfg.simulation.num_supernodes,
                               partition_id=partition_id, data_path=data_path)
    examples = with_canaries(examples, cfg.privacy, tokenizer, seed=cfg.seed, max_length=cfg.data.max_length,
                             partition_id=partition_id, data_path=data_path)
    train_lora_a(model, cfg.strategy.aggregation != "ffa")
    start = received_to_start_state(spec, cfg.strategy, received_state)
    seed = client_seed(cfg.seed, round_index, client_index)
    if correction is not None and (cfg.privacy.record_level or cfg.privacy.user_level):
        raise ConfigError("a SCAFFOLD correction arrived with differential privacy on; fedft does not combine them")
    if cfg.privacy.record_level:
        result = _dp_sgd_round(cfg.train, cfg.privacy, cfg.strategy.num_rounds, model, tokenizer.pad_token_id,
                               examples, start, round_index, seed,
                               accountant=accountant if accountant is not None else RecordLevelAccountant(),
                               max_epsilon=max_epsilon if max_epsilon is not None else cfg.privacy.client_max_epsilon,
                               min_noise_multiplier=min_noise_multiplier,
                               noise_generator=noise_generator or secure_generator(),
                               optimizer_state=optimizer_state)
    else:
        result = train_local(
            model, examples, tokenizer.pad_token_id, cfg.train,
            global_state=start, round_index=round_index,
            total_rounds=cfg.strategy.num_rounds, proximal_mu=proximal_mu, seed=seed,
            correction=None if correction is None else {k: v.to(torch.float32) for k, v in correction.items()},
            optimizer_state=optimizer_state,
        )
    if cfg.privacy.user_level:
        update, clipped = private_reply(cfg.strategy, cfg.privacy, start, result.state)
        return dataclasses.replace(result, state=update, rank=cfg.lora.r, clipped=clipped)
    return dataclasses.replace(result, state=reply_state(cfg.strategy, result.state), rank=cfg.lora.r)


def _dp_sgd_round(train: TrainConfig, privacy: PrivacyConfig, total_rounds: int, model, pad_id: int,
                  examples: list, start: dict[str, torch.Tensor], round_index: int, seed: int, *,
                  accountant: RecordLevelAccountant, max_epsilon: float, min_noise_multiplier: float,
                  noise_generator: torch.Generator, optimizer_state: dict | None = None) -> LocalResult:
    """Record-level DP-SGD (``train``, ``privacy``, the run's ``total_rounds``): the planned round checked
    against the noise floor and the epsilon limit first (``ClientDeclined``: nothing trained), then
    trained and its spend recorded."""
    from fedft.privacy.dpsgd import planned_round, train_local_dp

    planned = planned_round(train, privacy, total_rounds, len(examples))
    check_noise(planned.noise_multiplier, min_noise_multiplier)
    accountant.check(planned, privacy.delta, max_epsilon)
    result, spent = train_local_dp(model, examples, pad_id, train, privacy, global_state=start,
                                   round_index=round_index, total_rounds=total_rounds,
                                   noise_generator=noise_generator, seed=seed, planned=planned,
                                   optimizer_state=optimizer_state)
    accountant.step(spent)
    return dataclasses.replace(result, dp_sgd=spent)
