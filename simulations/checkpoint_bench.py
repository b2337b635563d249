"""Benchmark: time a demo-size checkpoint (1.26 MB adapter, metrics, ledger, config) written the way a run writes it.

Run: python -m simulations.checkpoint_bench DIR  (prints the median and max of 20 writes; DIR is created).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from fedft.rundir import (
    atomic_directory,
    atomic_write_json,
    atomic_write_jsonl,
    save_tensors_atomic,
)


def main(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    state = {f"layer{i}.lora_A": torch.randn(16, 64) for i in range(154)}
    state.update({f"layer{i}.lora_B": torch.randn(64, 16) for i in range(154)})
    rows = [{"round": i, "eval_loss": 1.0, "client_failures": []} for i in range(20)]
    times = []
    for r in range(20):
        t = time.perf_counter()
        with atomic_directory(root / f"round-{r:03d}") as tmp:
            save_tensors_atomic(state, tmp / "adapter_model.safetensors")
            atomic_write_json(tmp / "adapter_config.json", {"r": 16})
            atomic_write_jsonl(tmp / "metrics.jsonl", rows)
            atomic_write_jsonl(tmp / "privacy_ledger.jsonl", rows)
            atomic_write_json(tmp / "round.json", {"round": r})
        times.append(time.perf_counter() - t)
    times.sort()
    print(f"checkpoint write: median {1000*times[10]:.1f} ms, max {1000*times[-1]:.1f} ms over 20 "
          f"({sum(v.numel()*4 for v in state.values())/1e6:.2f} MB adapter)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
