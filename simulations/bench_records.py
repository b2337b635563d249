"""The adapter's conversions in a round: ``python -m simulations.bench_records [--config TOML] [--repeats N]``.

A round moves the global adapter and each reply through Flower's ``ArrayRecord`` (each tensor a
``.npy`` file). Times, in this process, Flower's own conversion (``ArrayRecord(torch_state_dict=...)``
and ``to_torch_state_dict()``) against fedft's (``fedft.federated.tensor_bytes``: the same bytes with cached
headers) for the adapter of the config's model (the demo's by default), as the median of
``--repeats`` calls; and what a round spends on them: eight conversions with Flower's (the round
loop's own round trip through a record on each side of the aggregation, the downlink, the
client's read and reply, the server's read) against four now. Run it on idle cores.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent / "demo.toml"


def _median_ms(call: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(config: Path, repeats: int = 200) -> dict:
    from flwr.app import ArrayRecord

    from fedft.config import load_config
    from fedft.federated.tensor_bytes import state_from_record
    from fedft.model.adapter import adapter_nbytes
    from fedft.model.load import initial_adapter_state, model_spec
    from server.strategy import to_array_record

    cfg = load_config(config)
    state = initial_adapter_state(model_spec(cfg))
    record = ArrayRecord(torch_state_dict=state)
    return {
        "tensors": len(state), "megabytes": adapter_nbytes(state) / 1e6,
        "flower_to_record_ms": _median_ms(lambda: ArrayRecord(torch_state_dict=state), repeats),
        "flower_from_record_ms": _median_ms(record.to_torch_state_dict, repeats),
        "fedft_to_record_ms": _median_ms(lambda: to_array_record(state), repeats),
        "fedft_from_record_ms": _median_ms(lambda: state_from_record(record), repeats),
    }


def lines(result: dict) -> list[str]:
    flower = result["flower_to_record_ms"] + result["flower_from_record_ms"]
    fedft = result["fedft_to_record_ms"] + result["fedft_from_record_ms"]
    return [
        f"adapter: {result['tensors']} tensors, {result['megabytes']:.2f} MB",
        f"to a record: fedft / Flower = {result['fedft_to_record_ms'] / result['flower_to_record_ms']:.2f}x  "
        f"({result['fedft_to_record_ms']:.2f} ms vs {result['flower_to_record_ms']:.2f} ms)",
        f"back to tensors: fedft / Flower = {result['fedft_from_record_ms'] / result['flower_from_record_ms']:.2f}x  "
        f"({result['fedft_from_record_ms']:.2f} ms vs {result['flower_from_record_ms']:.2f} ms)",
        f"a round's conversions: {2 * fedft:.1f} ms now (2 each way) vs {4 * flower:.1f} ms with Flower's "
        "(4 each way, 2 of them the server's own round trips)",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench_records", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="a fedft config (default: the demo's)")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per figure (median)")
    args = parser.parse_args(argv)
    for line in lines(measure(args.config, args.repeats)):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
