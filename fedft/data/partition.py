"""Split one data set into simulated institutions with flwr-datasets, and check it before a run.

``partition_dataset`` cuts rows IID, by a Dirichlet draw over a label column, or naturally
(one partition per value of a column, e.g. the institution). ``check_simulation_data``
reads every file and splits it as the clients will, so a bad row (file and line), a
missing column or an empty partition fails before anything starts.
"""

from __future__ import annotations

from fedft.config import DataConfig, FedftConfig
from fedft.data.rows import load_dataset_files


class PartitionError(ValueError):
    """The requested split cannot give every client usable data."""


_PARTITIONS: dict = {}  # the last split this process made: (data config, clients) -> partitions


def _file_stamps(paths) -> tuple:
    """(size, mtime) of each training path: a file rewritten in the same process is read again."""
    from pathlib import Path

    stamps = []
    for path in paths:
        try:
            info = Path(path).stat()
            stamps.append((info.st_size, info.st_mtime_ns))
        except OSError:
            stamps.append(None)  # reading it will name the problem
    return tuple(stamps)


def cached_partitions(cfg: DataConfig, num_partitions: int) -> list:
    """Every client's partition of the training files, read and split once per process.

    A Ray actor plays many simulated clients; each new partition id takes its slice of this
    one split instead of reading every file and splitting the whole data set again (which
    cost O(clients x rows) per run). Only the latest split is kept.
    """
    key = (cfg, num_partitions, _file_stamps(cfg.train_files))
    if key not in _PARTITIONS:
        _PARTITIONS.clear()
        _PARTITIONS[key] = partition_dataset(load_dataset_files(cfg.train_files, cfg.columns), cfg, num_partitions)
    return _PARTITIONS[key]


def make_partitioner(cfg: DataConfig, num_partitions: int):
    """The flwr-datasets partitioner named by ``cfg.partition``."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    if cfg.partition == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if cfg.partition == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by=cfg.partition_by,
            alpha=cfg.dirichlet_alpha, min_partition_size=1, seed=cfg.seed,
        )
    return NaturalIdPartitioner(partition_by=cfg.partition_by)


def partition_dataset(dataset, cfg: DataConfig, num_partitions: int) -> list:
    """Split ``dataset`` into ``num_partitions`` non-empty ``datasets.Dataset`` partitions."""
    if len(dataset) < num_partitions:
        raise PartitionError(
            f"{len(dataset)} training rows cannot fill {num_partitions} client partitions "
            "(simulation.num_supernodes); every client needs at least one row"
        )
    needs_column = cfg.partition in ("dirichlet", "natural")
    if needs_column and cfg.partition_by not in dataset.column_names:
        raise PartitionError(
            f"data.partition_by = {cfg.partition_by!r}: no such column in the training data "
            f"(columns: {', '.join(dataset.column_names)})"
        )
    if needs_column and any(v is None for v in dataset[cfg.partition_by]):
        raise PartitionError(f"data.partition_by = {cfg.partition_by!r}: some rows have no value")
    if cfg.partition == "natural":
        found = sorted(set(map(str, dataset[cfg.partition_by])))
        if len(found) != num_partitions:
            raise PartitionError(
                f"data.partition = 'natural' by {cfg.partition_by!r} gives {len(found)} "
                f"partitions ({', '.join(found[:10])}), but {num_partitions} clients are configured "
                "(simulation.num_supernodes)"
            )
        # NaturalIdPartitioner numbers ids in order of first appearance; sort for stability.
        dataset = dataset.sort(cfg.partition_by)
    partitioner = make_partitioner(cfg, num_partitions)
    partitioner.dataset = dataset
    try:
        parts = [partitioner.load_partition(i) for i in range(num_partitions)]
    except (ValueError, IndexError) as err:
        raise PartitionError(f"data.partition = {cfg.partition!r}: {err}") from err
    for i, part in enumerate(parts):
        if len(part) == 0:
            raise PartitionError(
                f"client partition {i} of {num_partitions} is empty (data.partition = "
                f"{cfg.partition!r}); use fewer clients, more data or a larger dirichlet_alpha"
            )
    return parts


def check_simulation_data(cfg: FedftConfig) -> list[int]:
    """Read every data file and split it as the clients will, before any training starts.

    Returns the number of rows per client; raises ``DataError`` / ``PartitionError`` for a
    bad row (with its file and line), a missing column or an empty partition.
    """
    from fedft.config import ConfigError
    from fedft.data.rows import read_rows

    if not cfg.data.train_files:  # a deployment's coordinator config has none; a simulation needs them
        raise ConfigError("data.train_files is empty; a simulation or baseline needs at least one data file")
    read_rows(cfg.data.eval_file, cfg.data.columns)
    return [len(p) for p in cached_partitions(cfg.data, cfg.simulation.num_supernodes)]
