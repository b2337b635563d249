"""``fedft privacy report RUN_DIR``: the ledger as a table and a plot, every epsilon re-derived.

The auditor's view: it reads ``privacy_ledger.jsonl``, recomputes every epsilon from the
recorded parameters (q, z, C, delta, sampling scheme, DP-SGD steps) with fedft's own
accountant, and flags each recorded value that differs from its recomputation. It does not
trust the run's numbers and needs nothing but the ledger (and, for the remaining budget,
the target in ``summary.json`` when present).
"""

from __future__ import annotations

import json
from pathlib import Path

from fedft.privacy.bookkeeping import LEDGER_FILE
from fedft.privacy.ledger import LedgerRow, Mismatch, audit, read_ledger, recompute
from fedft.rundir import CANARY_AUDIT_FILE

PLOT_FILE = "privacy_epsilon.png"


def _target(run_dir: Path) -> float | None:
    summary = run_dir / "summary.json"
    if not summary.exists():
        return None
    return json.loads(summary.read_text()).get("privacy", {}).get("target_epsilon")


def load_run_ledger(run_dir: Path) -> list[LedgerRow]:
    path = Path(run_dir) / LEDGER_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: was {run_dir} run with privacy.user_level = true?")
    return read_ledger(path)


def privacy_report(run_dir: Path) -> dict:
    """Rows, their recomputation and every mismatch, as one JSON-ready dict."""
    run_dir = Path(run_dir)
    rows = load_run_ledger(run_dir)
    target = _target(run_dir)
    canary_file = run_dir / CANARY_AUDIT_FILE
    return {
        "canary_audit": json.loads(canary_file.read_text()) if canary_file.exists() else None,
        "run_dir": str(run_dir),
        "target_epsilon": target,
        "rows": [r.to_dict() for r in rows],
        "recomputed": recompute(rows, target),
        "mismatches": [m._asdict() for m in audit(rows, target_epsilon=target)],
    }


def _fmt(value, pattern: str = "{:.3f}") -> str:
    return "-" if value is None else pattern.format(value)


def _record_cell(row: dict, bad: dict) -> str:
    """The largest per-client record-level epsilon of the round, red if any client's mismatches."""
    values = [e["epsilon"] for e in row["record_level"].values() if e["epsilon"] is not None]
    text = _fmt(max(values)) if values else "-"
    if any(key[0] == row["round"] and key[1].startswith("record_level[") for key in bad):
        return f"[red]{text} (mismatch)[/red]"
    return text


def print_table(report: dict) -> None:
    """A rich table, one line per round; mismatching cells in red with the recomputed value."""
    from rich.console import Console
    from rich.table import Table

    bad = {(m["round"], m["field"]): m for m in report["mismatches"]}

    def cell(row: dict, name: str) -> str:
        text = _fmt(row[name])
        miss = bad.get((row["round"], name))
        return f"[red]{text} (recomputed {_fmt(miss['recomputed'])})[/red]" if miss else text

    table = Table(title=f"privacy ledger: {report['run_dir']}")
    for header in ("round", "sampled", "replied", "q", "z", "C", "delta", "eps round",
                   "eps user (RDP)", "eps user (PLD)", "clipped", "remaining", "eps record (max)", "declined"):
        table.add_column(header, justify="right")
    for row in report["rows"]:
        table.add_row(
            str(row["round"]), str(len(row["sampled_clients"])), str(len(row["participating_clients"])),
            f"{row['sampling_rate']:.3g}", f"{row['noise_multiplier']:g}", f"{row['clip_norm']:g}",
            f"{row['delta']:g}", cell(row, "epsilon_round"), cell(row, "epsilon_user_rdp"),
            cell(row, "epsilon_user_pld"), _fmt(row["clipped_fraction"], "{:.0%}"),
            cell(row, "remaining_budget"), _record_cell(row, bad), str(len(row["refusals"])))
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the columns into 80
        console = Console(width=160)
    console.print(table)
    if report["mismatches"]:
        console.print(f"[red bold]{len(report['mismatches'])} recorded value(s) differ from the "
                      "recomputation:[/red bold]")
        for m in report["mismatches"]:
            console.print(f"  {Mismatch(**m)}")
    else:
        console.print(f"[green]every epsilon in the ledger matches its recomputation "
                      f"({len(report['rows'])} rounds)[/green]")
    canary = report.get("canary_audit")
    if canary:
        console.print(
            f"canary audit ({canary['canaries']} canaries, {canary['inserted']} inserted x{canary['repeats']} "
            f"at client {canary['client']}): {canary['correct_guesses']}/{canary['guesses']} membership guesses "
            f"right, empirical epsilon >= {canary['epsilon_lower_bound']:.2f} (a lower bound at "
            f"{canary['significance']:.0%} significance, never an estimate); mean exposure "
            f"{canary['mean_exposure_bits'] or 0:.2f} of {canary['max_possible_exposure_bits']:.0f} bits")


def plot_epsilon(report: dict, path: Path) -> Path:
    """Cumulative user-level epsilon (RDP, and PLD where defined) against the round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in report["recomputed"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    record = [max(r["record_level"].values(), default=None) for r in report["recomputed"]]
    if any(v is not None for v in record):
        ax.plot(rounds, [float("nan") if v is None else v for v in record], marker="s",
                label="record-level, most-charged client (RDP)")
    for key, label in (("epsilon_user_rdp", "user-level, RDP"), ("epsilon_user_pld", "user-level, PLD")):
        values = [r[key] for r in report["recomputed"]]
        if any(v is not None for v in values):
            ax.plot(rounds, [float("nan") if v is None else v for v in values], marker="o", label=label)
    if report.get("target_epsilon"):
        ax.axhline(report["target_epsilon"], color="red", linestyle="--", label="target epsilon")
    delta = report["rows"][0]["delta"] if report["rows"] else None
    ax.set(xlabel="round", ylabel="epsilon (cumulative)", title=f"privacy spent (delta = {delta:g})"
           if delta else "privacy spent")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
