"""Start-up cost of simulated clients' data: ``python -m simulations.bench_data [--rows N] [--clients M]``.

Writes N synthetic demo rows (default 200,000) to a temporary JSONL file and times what a
simulation does with them: one read of the training file and one split into M clients
(default 1000, IID), then every client id taking its slice, as a Ray actor playing all M
clients does (``fedft.data.partition.cached_partitions``). Before the split was cached, every
new client id read and split the whole file again; that cost is printed as M x the first
figure. Prints three lines; measures on this machine, so run it on idle cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def measure(rows: int, clients: int, directory: Path) -> dict:
    from fedft.config import load_config
    from fedft.data import partition
    from fedft.demo.tasks import make_demo_rows, write_jsonl

    write_jsonl(make_demo_rows(4, -(-rows // 4), 0.9, seed=0)[:rows], directory / "train.jsonl")
    write_jsonl(make_demo_rows(4, 2, 0.9, seed=1), directory / "eval.jsonl")
    (directory / "bench.toml").write_text('[data]\ntrain_files = ["train.jsonl"]\neval_file = "eval.jsonl"\n'
                                          f'partition = "iid"\n[simulation]\nnum_supernodes = {clients}\n')
    cfg = load_config(directory / "bench.toml")
    partition._PARTITIONS.clear()
    started = time.perf_counter()
    sizes = [len(p) for p in partition.cached_partitions(cfg.data, clients)]
    split_s = time.perf_counter() - started
    started = time.perf_counter()
    for client in range(clients):
        partition.cached_partitions(cfg.data, clients)[client]
    slices_s = time.perf_counter() - started
    return {"rows": rows, "clients": clients, "read_and_split_s": split_s, "every_slice_s": slices_s,
            "smallest_partition": min(sizes), "uncached_estimate_s": clients * split_s}


def lines(result: dict) -> list[str]:
    return [f"data start-up, {result['rows']:,} rows, {result['clients']} clients (iid):",
            f"  one read + split of the training file: {result['read_and_split_s']:.1f} s",
            f"  every client id taking its slice, in one process: {result['every_slice_s']:.1f} s",
            f"  before (each new client id read and split again): about {result['uncached_estimate_s'] / 60:.0f} min "
            f"per process ({result['clients']} x {result['read_and_split_s']:.1f} s)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench_data", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=1000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        print("\n".join(lines(measure(args.rows, args.clients, Path(directory)))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
