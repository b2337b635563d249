"""Finished runs side by side: ``fedft compare RUN_DIR ...`` as a markdown table and a bar chart.

One row per configuration (and one for the base model of the first run): exact match overall
and per task, bytes sent, the naive average's error, the SVD cut, seconds. Runs whose configs
differ only in their seed share one row: mean ± standard deviation over the seeds
(``fedft.report.seeds``), the other columns averaged. Reads summary.json only.
"""

from __future__ import annotations

from pathlib import Path

from fedft.rundir import load_summary

COMPARISON_FILE = "comparison.png"


def comparison_rows(run_dirs: list[Path]) -> list[dict]:
    """One row per configuration (and one for the base model of the first run); seeds pooled."""
    from fedft.report.seeds import same_config_groups, seed_statistics

    summaries = [load_summary(run_dir) for run_dir in run_dirs]
    rows = [{"run": "base model", **_em(summaries[0]["base"])}] if summaries else []
    for group in same_config_groups(summaries):
        members = [summaries[i] for i in group]
        names = ", ".join(Path(run_dirs[i]).name for i in group)

        def mean(key: str) -> float | None:
            values = [m.get(key) for m in members if m.get(key) is not None]
            return sum(values) / len(values) if values else None

        row = {"run": f"{_label(members[0])} ({names})",
               "bytes": mean("bytes_up_total") + mean("bytes_down_total"),
               "up_per_client": mean("mean_bytes_up_per_client"),
               "aggregation_error": mean("mean_aggregation_error"),
               "svd_cut": mean("mean_svd_discarded_energy"),
               "seconds": mean("wall_seconds")}
        if len(members) == 1:
            row.update(_em(members[0]["final"]))
        else:
            stats = seed_statistics(members)
            row.update({"exact_match": stats["exact_match"]["mean"], "exact_match_std": stats["exact_match"]["std"],
                        "by_task": {t: v["mean"] for t, v in stats["exact_match_by_task"].items()},
                        "by_task_std": {t: v["std"] for t, v in stats["exact_match_by_task"].items()},
                        "seeds": stats["seeds"]})
            row["run"] = f"{_label(members[0])}, {len(members)} seeds ({names})"
        rows.append(row)
    return rows


def _label(summary: dict) -> str:
    """'fedavg', or e.g. 'fedavg/svd+fedadam fp16' when a run changed the aggregation."""
    label = summary["strategy"]
    if summary.get("aggregation", "fedavg") != "fedavg":
        label += f"/{summary['aggregation']}"
    if summary.get("server_optimizer", "none") != "none":
        label += f"+{summary['server_optimizer']}"
    ranks = summary.get("config", {}).get("lora", {}).get("client_ranks")
    if ranks:
        label += " ranks " + ",".join(str(r) for r in ranks)
    if summary.get("wire_dtype", "float32") != "float32":
        label += f" {summary['wire_dtype']}"
    return label


def _em(metrics: dict) -> dict:
    return {"exact_match": metrics["eval_exact_match"], "by_task": metrics["eval_exact_match_by_task"]}


def comparison_markdown(rows: list[dict]) -> str:
    """A markdown table of ``comparison_rows``."""
    tasks = sorted({t for r in rows for t in r["by_task"]})
    lines = ["| run | exact match | " + " | ".join(tasks)
             + " | MB sent | KB up per client-round | naive-avg error | SVD cut | seconds |",
             "| --- | ---: | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: | ---: | ---: | ---: |"]

    def fmt(value, pattern: str) -> str:
        return pattern.format(value) if value else "-"

    for r in rows:
        spread = r.get("by_task_std", {})
        cells = [f"{100 * r['by_task'].get(t, 0):.0f}" + (f" ± {100 * spread[t]:.0f}" if t in spread else "") + "%"
                 for t in tasks]
        extra = [fmt(r.get("bytes", 0) / 1e6, "{:.0f}"), fmt((r.get("up_per_client") or 0) / 1e3, "{:.0f}"),
                 fmt(r.get("aggregation_error"), "{:.3f}"), fmt(r.get("svd_cut"), "{:.3f}"),
                 fmt(r.get("seconds"), "{:.0f}")]
        overall = f"{100 * r['exact_match']:.1f}" + (f" ± {100 * r['exact_match_std']:.1f}"
                                                     if "exact_match_std" in r else "")
        lines.append(f"| {r['run']} | **{overall}%** | " + " | ".join(cells + extra) + " |")
    return "\n".join(lines)


def plot_comparison(rows: list[dict], path: Path) -> None:
    """Grouped bars: exact match per task for every run."""
    from fedft.report.plots import pyplot

    plt = pyplot()

    tasks = sorted({t for r in rows for t in r["by_task"]}) + ["all"]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(8, 1.8 * len(tasks)), 4))
    for i, r in enumerate(rows):
        values = [100 * r["by_task"].get(t, 0) for t in tasks[:-1]] + [100 * r["exact_match"]]
        spread = [100 * r.get("by_task_std", {}).get(t, 0) for t in tasks[:-1]] + [100 * r.get("exact_match_std", 0)]
        ax.bar([x + i * width for x in range(len(tasks))], values, width, label=r["run"],
               yerr=spread if any(spread) else None, capsize=2)
    ax.set_xticks([x + width * (len(rows) - 1) / 2 for x in range(len(tasks))], tasks)
    ax.set(ylabel="held-out exact match (%)", ylim=(0, 105), title="exact match by task")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
