"""One client's side of a round, without Flower: its data (prepared once) and its training.

``client_examples`` loads and tokenizes a client's data the first time it is asked and
keeps it for the life of the process: a simulated client takes its partition of the
configured training files (``partition_id``); a deployed institution reads its own file
(``data_path``). ``run_client_round`` trains the cached model from the global adapter.
The Flower ClientApp and the local-only baseline both call these.
"""

from __future__ import annotations

import threading

import torch

from fedft.config import FedftConfig
from fedft.data import DataError, Example, load_dataset_files, tokenize_dataset
from fedft.model import cached_peft_model
from fedft.partition import partition_dataset
from fedft.train import LocalResult, train_local

_EXAMPLES: dict = {}
_LOCK = threading.Lock()


def client_examples(
    cfg: FedftConfig, tokenizer, *, partition_id: int | None = None, data_path: str | None = None
) -> list[Example]:
    """This client's tokenized training examples, built once per process."""
    key = (cfg.data, cfg.simulation.num_supernodes, cfg.model_path, partition_id, data_path)
    with _LOCK:
        if key not in _EXAMPLES:
            if data_path:
                rows = load_dataset_files([data_path])
            elif partition_id is not None:
                parts = partition_dataset(
                    load_dataset_files(cfg.data.train_files), cfg.data, cfg.simulation.num_supernodes
                )
                if not 0 <= partition_id < len(parts):
                    raise DataError(f"partition-id {partition_id} is outside 0..{len(parts) - 1}")
                rows = parts[partition_id]
            else:
                raise DataError("a client needs either a partition-id (simulation) or a data-path")
            examples = tokenize_dataset(rows, tokenizer, cfg.data.max_length, cfg.data.task_column)
            if not examples:
                raise DataError(f"client {partition_id if data_path is None else data_path} has no examples")
            _EXAMPLES[key] = examples
        return _EXAMPLES[key]


def client_seed(cfg: FedftConfig, round_index: int, client_index: int) -> int:
    """A distinct, reproducible seed for each (run seed, round, client)."""
    return (cfg.seed * 1_000_003 + round_index * 10_007 + client_index) % (2**31)


def run_client_round(
    cfg: FedftConfig,
    global_state: dict[str, torch.Tensor],
    round_index: int,
    *,
    proximal_mu: float = 0.0,
    partition_id: int | None = None,
    data_path: str | None = None,
    client_index: int = 0,
) -> LocalResult:
    """Train this client's cached model for one round from ``global_state``."""
    model, tokenizer = cached_peft_model(cfg)
    examples = client_examples(cfg, tokenizer, partition_id=partition_id, data_path=data_path)
    return train_local(
        model, examples, tokenizer.pad_token_id, cfg.train,
        global_state=global_state, round_index=round_index,
        total_rounds=cfg.strategy.num_rounds, proximal_mu=proximal_mu,
        seed=client_seed(cfg, round_index, client_index),
    )


def check_simulation_data(cfg: FedftConfig) -> list[int]:
    """Read every data file and split it as the clients will, before any training starts.

    Returns the number of rows per client; raises ``DataError`` / ``PartitionError`` for a
    bad row (with its file and line), a missing column or an empty partition.
    """
    from fedft.data import read_jsonl

    read_jsonl(cfg.data.eval_file)
    parts = partition_dataset(load_dataset_files(cfg.data.train_files), cfg.data,
                              cfg.simulation.num_supernodes)
    return [len(p) for p in parts]
