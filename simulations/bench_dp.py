"""DP-SGD's cost per step: ``python -m simulations.bench_dp [--config TOML] [--batch 8,64] [--steps N]``.

On the demo config's model and first client's data (or another config's), times rounds of
record-level DP-SGD (``fedft.privacy.dpsgd.train_local_dp``: Opacus per-example gradients on
the LoRA layers, clipping, noise) against rounds of the plain local loop
(``fedft.train.local.train_local``) on the same model, at each batch size; the best of a
few interleaved repeats. DP-SGD's Poisson batches vary in size around the batch size, so
the figure is per example trained. Prints one line per batch size; run it on idle cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent / "demo.toml"


def measure(config: Path, batch: int, steps: int, repeats: int = 3) -> dict:
    import torch

    from fedft.config import load_config
    from fedft.federated.client_round import client_examples
    from fedft.model.load import cached_peft_model, initial_adapter_state, model_spec
    from fedft.privacy.dpsgd import train_local_dp
    from fedft.train.local import train_local

    cfg = load_config(config, ["privacy.record_level=true", f"train.batch_size={batch}",
                               f"train.local_steps={steps}", "train.warmup_steps=0"])
    spec = model_spec(cfg)
    model, tokenizer = cached_peft_model(spec)
    examples = client_examples(cfg.data, tokenizer, num_partitions=cfg.simulation.num_supernodes, partition_id=0)
    start = initial_adapter_state(spec)

    def plain() -> float:
        began = time.perf_counter()
        train_local(model, examples, tokenizer.pad_token_id, cfg.train, global_state=start, round_index=1,
                    total_rounds=cfg.strategy.num_rounds, seed=1)
        return time.perf_counter() - began

    def private() -> float:
        began = time.perf_counter()
        train_local_dp(model, examples, tokenizer.pad_token_id, cfg.train, cfg.privacy, global_state=start,
                       round_index=1, total_rounds=cfg.strategy.num_rounds,
                       noise_generator=torch.Generator().manual_seed(1), seed=1)
        return time.perf_counter() - began

    plain(), private()  # warm-up
    plain_s, private_s = [], []
    for _ in range(repeats):
        plain_s.append(plain())
        private_s.append(private())
    step_plain, step_private = min(plain_s) / steps, min(private_s) / steps
    return {"batch": batch, "steps": steps, "non_dp_step_s": step_plain, "dp_sgd_step_s": step_private,
            "ratio": step_private / step_plain, "repeats": repeats}


def line(result: dict) -> str:
    return (f"batch {result['batch']}: DP-SGD step / non-DP step = {result['ratio']:.2f}x  "
            f"({1000 * result['dp_sgd_step_s']:.0f} ms vs {1000 * result['non_dp_step_s']:.0f} ms, "
            f"best of {result['repeats']} rounds of {result['steps']} steps; "
            f"DP-SGD batches are Poisson around {result['batch']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench_dp", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    parser.add_argument("--batch", default="8,64", help="batch sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    for batch in (int(b) for b in args.batch.split(",")):
        print(line(measure(Path(args.config), batch, args.steps)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
