"""Split one data set into simulated institutions, and check it before a run.

``partition_dataset`` cuts a list of rows IID, by a Dirichlet draw over a label column, or
naturally (one partition per value of a column, e.g. the institution). The IID and natural
splits are plain Python and give exactly flwr-datasets' ``IidPartitioner`` (contiguous
shards) and ``NaturalIdPartitioner`` (sorted ids) partitions (a test compares them) without
importing ``datasets`` or flwr-datasets, whose imports (Arrow, pandas, seaborn, scipy) cost
every simulation process seconds at start; the Dirichlet split is flwr-datasets' own.
``check_simulation_data``
reads every file and splits it as the clients will, so a bad row (file and line), a
missing column or an empty partition fails before anything starts.
"""

from __future__ import annotations

from fedft.config import DataConfig, FedftConfig
from fedft.data.rows import load_row_files


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
        _PARTITIONS[key] = partition_dataset(load_row_files(cfg.train_files, cfg.columns), cfg, num_partitions)
    return _PARTITIONS[key]


def contiguous_shards(rows: list, num_partitions: int) -> list[list]:
    """``rows`` cut in order into ``num_partitions`` shards, the first ``len % n`` one row longer
    (what ``datasets.Dataset.shard(n, i, contiguous=True)``, flwr-datasets' IID split, returns)."""
    size, extra = divmod(len(rows), num_partitions)
    bounds = [i * size + min(i, extra) for i in range(num_partitions + 1)]
    return [rows[bounds[i]:bounds[i + 1]] for i in range(num_partitions)]


def natural_parts(rows: list[dict], column: str) -> list[list[dict]]:
    """One partition per value of ``column``, in sorted order of the values, each keeping the rows'
    order (flwr-datasets' ``NaturalIdPartitioner``, which numbers the sorted unique ids)."""
    by_value: dict = {}
    for row in rows:
        by_value.setdefault(row[column], []).append(row)
    return [by_value[value] for value in sorted(by_value)]


def dirichlet_parts(rows: list[dict], cfg: DataConfig, num_partitions: int) -> list[list[dict]]:
    """flwr-datasets' ``DirichletPartitioner`` over ``cfg.partition_by`` (imported only here): it is
    given the label column and each row's index, and the rows themselves are handed out."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(num_partitions=num_partitions, partition_by=cfg.partition_by,
                                       alpha=cfg.dirichlet_alpha, min_partition_size=1, seed=cfg.seed)
    partitioner.dataset = Dataset.from_list([{cfg.partition_by: row[cfg.partition_by], "row_index": i}
                                             for i, row in enumerate(rows)])
    return [[rows[i] for i in partitioner.load_partition(p)["row_index"]] for p in range(num_partitions)]


def partition_dataset(rows: list[dict], cfg: DataConfig, num_partitions: int) -> list[list[dict]]:
    """Split ``rows`` into ``num_partitions`` non-empty lists of rows."""
    rows = list(rows)
    if len(rows) < num_partitions:
        raise PartitionError(
            f"{len(rows)} training rows cannot fill {num_partitions} client partitions "
            "(simulation.num_supernodes); every client needs at least one row"
        )
    needs_column = cfg.partition in ("dirichlet", "natural")
    columns = set().union(*(row.keys() for row in rows))
    if needs_column and cfg.partition_by not in columns:
        raise PartitionError(
            f"data.partition_by = {cfg.partition_by!r}: no such column in the training data "
            f"(columns: {', '.join(sorted(columns))})"
        )
    if needs_column and any(row.get(cfg.partition_by) is None for row in rows):
        raise PartitionError(f"data.partition_by = {cfg.partition_by!r}: some rows have no value")
    try:
        if cfg.partition == "natural":
            parts = natural_parts(rows, cfg.partition_by)
            if len(parts) != num_partitions:
                found = sorted(set(map(str, (row[cfg.partition_by] for row in rows))))
                raise PartitionError(
                    f"data.partition = 'natural' by {cfg.partition_by!r} gives {len(found)} "
                    f"partitions ({', '.join(found[:10])}), but {num_partitions} clients are configured "
                    "(simulation.num_supernodes)"
                )
        elif cfg.partition == "dirichlet":
            parts = dirichlet_parts(rows, cfg, num_partitions)
        else:
            parts = contiguous_shards(rows, num_partitions)
    except (ValueError, IndexError, TypeError) as err:
        if isinstance(err, PartitionError):
            raise
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
