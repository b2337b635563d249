"""Simulated institutions: fedft's IID and natural splits (equal to flwr-datasets') and the Dirichlet one."""

from __future__ import annotations

import dataclasses

import pytest

from fedft.config import DataConfig
from fedft.data.partition import PartitionError, partition_dataset


def _rows(n_per_inst: dict[str, int]) -> list[dict]:
    rows = []
    for inst, n in n_per_inst.items():
        rows += [{"x": f"{inst}-{i}", "institution": inst, "task": f"t{i % 3}"} for i in range(n)]
    return rows


def _column(rows: list[dict], name: str) -> list:
    return [row[name] for row in rows]


@pytest.mark.parametrize("rows, clients", [
    ([{"x": i, "institution": ("b", "a", "c")[i % 3]} for i in range(10)], 3),
    ([{"x": i, "institution": (12, 3, 7, 40)[i * 7 % 4]} for i in range(23)], 4),
])
def test_iid_and_natural_splits_equal_flwr_datasets_partitioners(rows, clients):
    """The plain-Python splits hand each client exactly the rows, in the order, flwr-datasets would."""
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner, NaturalIdPartitioner

    for n in (1, 3, clients):
        iid = IidPartitioner(num_partitions=n)
        iid.dataset = Dataset.from_list(rows)
        ours = partition_dataset(rows, DataConfig(partition="iid"), n)
        assert [_column(p, "x") for p in ours] == [iid.load_partition(i)["x"] for i in range(n)]
    natural = NaturalIdPartitioner(partition_by="institution")
    natural.dataset = Dataset.from_list(rows).sort("institution")
    ours = partition_dataset(rows, DataConfig(partition="natural", partition_by="institution"), clients)
    assert [_column(p, "x") for p in ours] == [natural.load_partition(i)["x"] for i in range(clients)]
    assert all(isinstance(p[0], dict) and set(p[0]) == {"x", "institution"} for p in ours)


def test_natural_gives_one_partition_per_value_in_sorted_order():
    ds = _rows({"b": 5, "a": 3, "c": 4})
    parts = partition_dataset(ds, DataConfig(partition="natural", partition_by="institution"), 3)
    assert [sorted(set(_column(p, "institution"))) for p in parts] == [["a"], ["b"], ["c"]]
    assert [len(p) for p in parts] == [3, 5, 4]


def test_natural_with_wrong_client_count_is_an_error():
    ds = _rows({"a": 3, "b": 3})
    with pytest.raises(PartitionError, match="gives 2 partitions"):
        partition_dataset(ds, DataConfig(partition="natural"), 3)


def test_iid_splits_evenly_without_loss():
    ds = _rows({"a": 40})
    parts = partition_dataset(ds, DataConfig(partition="iid"), 4)
    assert [len(p) for p in parts] == [10, 10, 10, 10]
    assert sorted(row["x"] for p in parts for row in p) == sorted(_column(ds, "x"))


def test_dirichlet_small_alpha_skews_labels():
    ds = _rows({"a": 300})
    cfg = DataConfig(partition="dirichlet", partition_by="task", dirichlet_alpha=0.1, seed=1)
    parts = partition_dataset(ds, cfg, 3)
    assert sum(len(p) for p in parts) == 300
    # With alpha = 0.1 each client is dominated by one label.
    shares = [max(_column(p, "task").count(t) for t in ("t0", "t1", "t2")) / len(p) for p in parts]
    assert min(shares) > 0.6
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    theirs = DirichletPartitioner(num_partitions=3, partition_by="task", alpha=0.1, min_partition_size=1, seed=1)
    theirs.dataset = Dataset.from_list(ds)
    assert [_column(p, "x") for p in parts] == [theirs.load_partition(i)["x"] for i in range(3)]


def test_splitting_the_training_files_imports_neither_datasets_nor_flwr_datasets(tiny_config_path):
    """Their imports (Arrow, pandas, seaborn, scipy) cost each simulation process seconds at start."""
    import subprocess
    import sys

    code = ("import sys; from fedft.config import load_config; from fedft.data.partition import "
            f"check_simulation_data; print(check_simulation_data(load_config({str(tiny_config_path)!r}))); "
            "print(sorted(m for m in ('datasets', 'flwr_datasets', 'pandas', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[1] == "[]", out


def test_missing_column_is_named():
    ds = _rows({"a": 3})
    with pytest.raises(PartitionError, match="data.partition_by = 'site': no such column"):
        partition_dataset(ds, DataConfig(partition="natural", partition_by="site"), 1)


def test_empty_partition_is_an_error_before_training():
    ds = _rows({"a": 3})
    with pytest.raises(PartitionError, match="empty|partition"):
        partition_dataset(ds, dataclasses.replace(DataConfig(), partition="iid"), 5)


def test_a_process_reads_and_splits_the_training_files_once_for_all_its_clients(tiny_config_path, monkeypatch):
    """A Ray actor plays many client ids; each takes its slice of one split (not O(clients x rows))."""
    from fedft.config import load_config
    from fedft.data import partition
    from fedft.federated.client_round import client_examples
    from fedft.model.load import load_tokenizer, model_spec

    cfg = load_config(tiny_config_path)
    calls = []
    real = partition.partition_dataset
    monkeypatch.setattr(partition, "partition_dataset", lambda *a, **k: calls.append(1) or real(*a, **k))
    partition._PARTITIONS.clear()
    tokenizer = load_tokenizer(model_spec(cfg))
    first = client_examples(cfg.data, tokenizer, num_partitions=cfg.simulation.num_supernodes, partition_id=0)
    second = client_examples(cfg.data, tokenizer, num_partitions=cfg.simulation.num_supernodes, partition_id=1)
    assert len(calls) == 1 and first and second and {e.source for e in first}.isdisjoint({e.source for e in second})
    assert partition.check_simulation_data(cfg) == [len(p) for p in real(
        partition.load_row_files(cfg.data.train_files), cfg.data, 2)] and len(calls) == 1
