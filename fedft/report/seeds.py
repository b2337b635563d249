"""Runs that differ only in their seed, as one result: mean, standard deviation and each seed.

One seed is noise on small federated tasks (the demo's date task swings from 12% to 100%
between seeds). ``same_config_groups`` groups run summaries whose resolved configs are equal
but for ``seed``; ``seed_statistics`` turns one group into the mean, the sample standard
deviation (n - 1) and the per-seed values of the final exact match (overall and per task)
and held-out loss. Pure: summaries in, numbers out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

SEEDS_FILE = "seeds.json"  # written by `fedft simulate --seeds` beside the seed-N run directories


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for a single value)."""
    n = len(values)
    if not n:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def config_key(summary: dict) -> str:
    """The run's resolved config without its seed (and its method, as summary.json names it),
    as a comparable string."""
    config = json.loads(json.dumps(summary.get("config", {})))
    config.pop("seed", None)
    config.get("privacy", {}).pop("client_state_dir", None)  # set per run directory under record-level DP
    method = {k: summary.get(k) for k in ("strategy", "aggregation", "server_optimizer", "wire_dtype")}
    return json.dumps({"config": config, "method": method}, sort_keys=True)


def same_config_groups(summaries: Sequence[dict]) -> list[list[int]]:
    """Indices of ``summaries`` grouped by config-but-seed, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, summary in enumerate(summaries):
        groups.setdefault(config_key(summary), []).append(index)
    return list(groups.values())


def seed_statistics(summaries: Sequence[dict]) -> dict:
    """Mean, std and per-seed values of the final exact match (overall, per task) and held-out loss."""
    finals = [s["final"] for s in summaries]
    seeds = [s.get("config", {}).get("seed") for s in summaries]
    tasks = sorted({t for f in finals for t in f.get("eval_exact_match_by_task", {})})

    def stat(values: list[float]) -> dict:
        mean, std = mean_std(values)
        return {"mean": mean, "std": std, "min": min(values), "max": max(values), "per_seed": values}

    return {
        "seeds": seeds,
        "runs": len(summaries),
        "exact_match": stat([f["eval_exact_match"] for f in finals]),
        "eval_loss": stat([f["eval_loss"] for f in finals]),
        "exact_match_by_task": {t: stat([f.get("eval_exact_match_by_task", {}).get(t, 0.0) for f in finals])
                                for t in tasks},
    }


def seeds_markdown(statistics: dict) -> str:
    """A short table: each seed's exact match, then mean ± std, per task and overall."""
    tasks = list(statistics["exact_match_by_task"])
    lines = ["| seed | exact match | " + " | ".join(tasks) + " | held-out loss |",
             "| --- | ---: | " + " | ".join("---:" for _ in tasks) + " | ---: |"]
    for i, seed in enumerate(statistics["seeds"]):
        cells = [f"{100 * statistics['exact_match_by_task'][t]['per_seed'][i]:.0f}%" for t in tasks]
        lines.append(f"| {seed} | {100 * statistics['exact_match']['per_seed'][i]:.1f}% | " + " | ".join(cells)
                     + f" | {statistics['eval_loss']['per_seed'][i]:.3f} |")
    em, loss = statistics["exact_match"], statistics["eval_loss"]
    cells = [f"{100 * statistics['exact_match_by_task'][t]['mean']:.0f} ± "
             f"{100 * statistics['exact_match_by_task'][t]['std']:.0f}%" for t in tasks]
    lines.append(f"| mean ± std | **{100 * em['mean']:.1f} ± {100 * em['std']:.1f}%** | " + " | ".join(cells)
                 + f" | {loss['mean']:.3f} ± {loss['std']:.3f} |")
    return "\n".join(lines)
