"""A run's plots: the round curves (curves.png) and the report's figures.

``plot_curves`` draws RUN_DIR/curves.png from the metrics rows at the end of a run;
``write_plots`` draws report_curves.png, report_stage_accuracy.png and
report_preferences.png from report.json's content (``fedft.report.markdown``). Both draw
the federated rounds with ``round_panels``. matplotlib (Agg) is imported only when a plot
is drawn (or ahead, in the background: ``prefetch_pyplot``); nothing here reads a run's
files, loads a model or changes a number it plots.
"""

from __future__ import annotations

import threading
from pathlib import Path

PLOTS = {"curves": "report_curves.png", "stages": "report_stage_accuracy.png",
         "preferences": "report_preferences.png"}


def federated_curves(rows: list[dict]) -> dict:
    """Per-round train loss, held-out loss and exact match (None where not measured)."""
    return {key: [r.get(key) for r in rows]
            for key in ("round", "train_loss", "eval_loss", "eval_exact_match")}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display), imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def prefetch_pyplot() -> None:
    """Import matplotlib in a background thread now, so that the plots at the end of a run do not
    wait for it (0.7 s on 2 cores); a run starts this once its first round is in, while the
    clients train."""
    threading.Thread(target=pyplot, name="fedft-import-matplotlib", daemon=True).start()


def _points(xs: list, ys: list) -> tuple[list, list]:
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _line(ax, xs: list, ys: list, scale: float = 1.0, **style) -> None:
    """Plot the measured points of ``ys`` (times ``scale``) against ``xs``; nothing when none are."""
    xs, ys = _points(xs, ys)
    if xs:
        ax.plot(xs, [scale * y for y in ys] if scale != 1.0 else ys, **style)


def round_panels(ax_loss, ax_em, curves: dict, by_task: dict[str, list] | None = None) -> None:
    """Train / held-out loss (log scale) and held-out exact match (%) against the round.

    ``curves`` as ``federated_curves`` gives them; ``by_task``: each task's exact match on
    the same rows (None where not measured), drawn dashed beside the overall line.
    """
    rounds = curves["round"]
    _line(ax_loss, rounds, curves["train_loss"], marker="o", label="train loss (clients)")
    _line(ax_loss, rounds, curves["eval_loss"], marker="s", label="held-out loss")
    _line(ax_em, rounds, curves["eval_exact_match"], 100, marker="s", linewidth=2.5, color="black",
          label="all tasks")
    for task, values in (by_task or {}).items():
        _line(ax_em, rounds, values, 100, linestyle="--", label=task)
    ax_loss.set(xlabel="round", ylabel="loss per answer token (log)", title="loss", yscale="log")
    ax_em.set(xlabel="round", ylabel="exact match (%)", title="held-out exact match", ylim=(-2, 102))


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    """Train / eval loss and exact match (overall and per task) against the round."""
    plt = pyplot()
    fig, (ax_loss, ax_em) = plt.subplots(1, 2, figsize=(11, 4))
    measured = [r.get("eval_exact_match") is not None for r in rows]
    tasks = sorted({t for r, m in zip(rows, measured) if m for t in r.get("eval_exact_match_by_task", {})})
    by_task = {task: [r["eval_exact_match_by_task"].get(task, 0.0) if m else None for r, m in zip(rows, measured)]
               for task in tasks}
    round_panels(ax_loss, ax_em, federated_curves(rows), by_task)
    for ax in (ax_loss, ax_em):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


# ---------------------------------------------------------------------------------------
# The report's figures
# ---------------------------------------------------------------------------------------

def plot_report_curves(curves: dict, path: Path) -> None:
    """Federated loss and exact match per round; DPO loss and reward accuracy per step."""
    plt = pyplot()
    fed, dpo = curves["federated"], curves["dpo"]
    panels = (2 if fed else 0) + (1 if dpo else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    if fed:
        ax_loss, ax_em = axes.pop(0), axes.pop(0)
        round_panels(ax_loss, ax_em, fed)
        ax_loss.set(title="federated loss")
        ax_em.set(ylabel="held-out exact match (%)", title="federated exact match")
    if dpo:
        ax = axes.pop(0)
        _line(ax, dpo["step"], dpo["loss"], label="DPO loss")
        _line(ax, dpo["step"], dpo["reward_accuracy"], label="reward accuracy (batch)")
        ax.set(xlabel="DPO step", title="DPO")
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(fig, path)


def accuracy_series(report: dict) -> list[tuple[str, list[float | None], float | None]]:
    """(label, exact match per column, overall) per stage; a local stage's own-adapter scores after it."""
    series = []
    for s in report["stages"]:
        if s.get("exact_match") is None:
            continue
        series.append((s["stage"], [(s.get(c["key"]) or {}).get(c["name"]) for c in report["columns"]],
                       s["exact_match"]))
        own = s.get("exact_match_own_model_by_institution")
        if own and all(c["key"] == "exact_match_by_institution" for c in report["columns"]):
            series.append((f"{s['stage']} (own adapter)", [own.get(c["name"]) for c in report["columns"]], None))
    return series


def plot_stage_accuracy(report: dict, path: Path) -> None:
    """Grouped bars: exact match per institution (or task) and overall, one bar per stage."""
    plt = pyplot()
    series = accuracy_series(report)
    labels = [c["label"] for c in report["columns"]] + ["all"]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(labels)), 4))
    for i, (label, values, overall) in enumerate(series):
        heights = [100 * (v or 0) for v in values] + [100 * (overall or 0)]
        ax.bar([x + i * width for x in range(len(labels))], heights, width, label=label)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))], labels)
    ax.set(ylabel="held-out exact match (%)", ylim=(0, 105), title="exact match by stage")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)


def plot_preferences(report: dict, path: Path) -> None:
    """Bars per stage: implicit-reward preference accuracy and chosen-ranked-first share."""
    plt = pyplot()
    stages = [s for s in report["stages"] if s.get("pref_accuracy") is not None]
    fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(stages)), 4))
    xs = range(len(stages))
    ax.bar([x - 0.2 for x in xs], [100 * s["pref_accuracy"] for s in stages], width=0.4, color="tab:purple",
           label=f"implicit reward vs {report.get('preference_reference')}")
    ax.bar([x + 0.2 for x in xs], [100 * (s.get("likelihood_accuracy") or 0) for s in stages], width=0.4,
           color="tab:olive", label="chosen ranked first (no reference)")
    ax.set_xticks(list(xs), [s["stage"] for s in stages])
    ax.axhline(50, color="grey", linestyle="--", label="the reference itself (50%)")
    ax.set(ylabel="held-out pairs (%)", ylim=(0, 105), title="preference accuracy by stage")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def write_plots(report: dict, run_dir: Path) -> dict[str, str]:
    """Every report figure there is data for, in ``run_dir``; returns {plot: file name}."""
    plots = {}
    if report["curves"]["federated"] or report["curves"]["dpo"]:
        plot_report_curves(report["curves"], run_dir / PLOTS["curves"])
        plots["curves"] = PLOTS["curves"]
    if any(s.get("exact_match") is not None for s in report["stages"]):
        plot_stage_accuracy(report, run_dir / PLOTS["stages"])
        plots["stages"] = PLOTS["stages"]
    if any(s.get("pref_accuracy") is not None for s in report["stages"]):
        plot_preferences(report, run_dir / PLOTS["preferences"])
        plots["preferences"] = PLOTS["preferences"]
    return plots
