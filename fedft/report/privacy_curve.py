"""The privacy-utility curve: one config at several record-level epsilons, and without DP.

``fedft simulate --epsilons 1,2,4,8,16,off`` runs the config once per target (DP-SGD
calibrated to each record-level epsilon; ``off``: the same run without DP) and hands the
run summaries here. ``curve_points`` reads what each run reached (the exact match, per task,
the held-out loss, the record-level epsilon the ledger charged, the calibrated sigma);
``curve_markdown`` is the table and ``plot_curve`` the figure (exact match and held-out
loss against epsilon, the run without DP and the base model as horizontal lines). Pure but
for the plot file.
"""

from __future__ import annotations

import math
from pathlib import Path

CURVE_FILE = "privacy_utility.json"  # written by `fedft simulate --epsilons` beside the runs
CURVE_PLOT = "privacy_utility.png"


def curve_point(target_epsilon: float | None, summary: dict, sigma: float | None = None) -> dict:
    """One run of the curve: its target (None: without DP) and what it reached."""
    final = summary["final"]
    privacy = summary.get("privacy") or {}
    return {
        "target_epsilon": target_epsilon,
        "epsilon": privacy.get("record_level_max_epsilon") if target_epsilon is not None else None,
        "sigma": sigma,
        "exact_match": final["eval_exact_match"],
        "exact_match_by_task": final.get("eval_exact_match_by_task", {}),
        "eval_loss": final["eval_loss"],
        "base_eval_loss": (summary.get("base") or {}).get("eval_loss"),
    }


def relative_to_no_dp(points: list[dict]) -> dict[float, float]:
    """Each DP point's exact match as a share of the run without DP (empty when that run is
    missing or learned nothing)."""
    baseline = next((p["exact_match"] for p in points if p["target_epsilon"] is None), None)
    if not baseline:
        return {}
    return {p["target_epsilon"]: p["exact_match"] / baseline for p in points if p["target_epsilon"] is not None}


def curve_markdown(points: list[dict]) -> str:
    """The curve as a table, DP runs by epsilon and the run without DP last."""
    shares = relative_to_no_dp(points)
    tasks = sorted({t for p in points for t in p["exact_match_by_task"]})
    lines = ["| record-level epsilon (target / charged) | sigma | exact match | of no-DP | held-out loss | "
             + " | ".join(tasks) + " |",
             "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in tasks) + " |"]
    for point in sorted(points, key=_order):
        target = point["target_epsilon"]
        label = "no DP" if target is None else f"{target:g} / {_number(point['epsilon'], '.2f')}"
        share = "" if target is None or target not in shares else f"{shares[target]:.2f}"
        by_task = " | ".join(f"{100 * point['exact_match_by_task'].get(t, 0.0):.0f}" for t in tasks)
        lines.append(f"| {label} | {_number(point['sigma'], '.3f')} | {100 * point['exact_match']:.1f}% | {share} | "
                     f"{point['eval_loss']:.3f} | {by_task} |")
    return "\n".join(lines)


def plot_curve(points: list[dict], path: Path, title: str = "") -> Path:
    """Exact match and held-out loss against the record-level epsilon (log scale); the run
    without DP, 0.6 of it and the base model as horizontal lines."""
    from fedft.report.plots import pyplot

    plt = pyplot()

    private = sorted((p for p in points if p["target_epsilon"] is not None), key=_order)
    baseline = next((p for p in points if p["target_epsilon"] is None), None)
    fig, (ax_em, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [p["target_epsilon"] for p in private]
    ax_em.plot(xs, [100 * p["exact_match"] for p in private], marker="o", color="black", label="DP-SGD")
    ax_loss.plot(xs, [p["eval_loss"] for p in private], marker="s", label="DP-SGD")
    if baseline is not None:
        ax_em.axhline(100 * baseline["exact_match"], linestyle="--", color="gray", label="without DP")
        ax_em.axhline(60 * baseline["exact_match"], linestyle=":", color="gray", label="0.6 x without DP")
        ax_loss.axhline(baseline["eval_loss"], linestyle="--", color="gray", label="without DP")
    base_loss = next((p["base_eval_loss"] for p in points if p.get("base_eval_loss") is not None), None)
    if base_loss is not None:
        ax_loss.axhline(base_loss, linestyle=":", color="red", label="base model (before training)")
    for ax in (ax_em, ax_loss):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.legend()
    ax_em.set(xlabel="record-level epsilon (delta as configured)", ylabel="held-out exact match (%)",
              title="exact match", ylim=(-2, 102))
    ax_loss.set(xlabel="record-level epsilon", ylabel="held-out loss per answer token", title="held-out loss")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _order(point: dict) -> float:
    return math.inf if point["target_epsilon"] is None else point["target_epsilon"]


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
