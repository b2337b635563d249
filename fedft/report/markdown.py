"""The run report: RUN_DIR/report.md, report.json and plots, built only from the run's files.

``build_report`` reads summary.json (required), metrics.jsonl, evaluation.json (from
``fedft.eval.stages``), dpo/summary.json and dpo/history.jsonl, and privacy_ledger.jsonl
when present, and writes: a stage table (loss, perplexity, exact match overall and per
institution, preference accuracy, reward margin, general-text perplexity), training curves
(federated rounds, DPO steps), per-institution exact match by stage, preference accuracy by
stage, the audited privacy summary, bytes communicated, wall times and generated samples.
The figures are drawn by ``fedft.report.plots``. A missing optional part is omitted with a
line saying so. The same files always give the same report.json. Nothing here loads a
model, trains or imports flwr.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedft.report.plots import federated_curves, write_plots
from fedft.rundir import (
    RunDirError,
    atomic_write_json,
    atomic_write_text,
    read_jsonl_rows,
)

REPORT_MD, REPORT_JSON = "report.md", "report.json"
STAGE_METRICS = ("loss", "perplexity", "exact_match", "pref_accuracy", "reward_margin", "likelihood_accuracy",
                 "general_perplexity")


class ReportError(ValueError):
    """A run file cannot be read; the message names the file."""


# ---------------------------------------------------------------------------------------
# Reading the run's files
# ---------------------------------------------------------------------------------------

def read_json(path: Path, *, required: bool = False) -> dict | None:
    """A JSON file's content; None when absent and optional."""
    if not path.exists():
        if required:
            raise FileNotFoundError(f"{path} does not exist: is {path.parent} a finished fedft run directory?")
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err


def read_rows(path: Path) -> list[dict] | None:
    """A JSON-lines file's rows (``fedft.rundir.read_jsonl_rows``); None when absent."""
    if not path.exists():
        return None
    try:
        return read_jsonl_rows(path)
    except RunDirError as err:
        raise ReportError(str(err)) from err


def privacy_summary(run_dir: Path) -> dict | None:
    """Epsilon per mechanism, delta and the audit (every epsilon recomputed); None without a ledger."""
    from fedft.privacy.audit import privacy_report
    from fedft.privacy.bookkeeping import LEDGER_FILE
    from fedft.privacy.ledger import LedgerError

    if not (run_dir / LEDGER_FILE).exists():
        return None
    try:
        report = privacy_report(run_dir)
    except LedgerError as err:
        raise ReportError(f"the privacy ledger cannot be audited: {err}") from err
    rows, recomputed = report["rows"], report["recomputed"]
    mechanisms = sorted({m for r in rows for m in r.get("mechanisms", [])})
    last = recomputed[-1] if recomputed else {}
    record = [e for r in recomputed for e in (r.get("record_level") or {}).values() if e is not None]
    epsilon = {}
    if last.get("epsilon_user_rdp") is not None:
        epsilon["user-level (RDP)"] = last["epsilon_user_rdp"]
    if last.get("epsilon_user_pld") is not None:
        epsilon["user-level (PLD)"] = last["epsilon_user_pld"]
    if record:
        epsilon["record-level, largest client (DP-SGD)"] = max(record)
    mismatches = report["mismatches"]
    return {
        "mechanisms": mechanisms, "epsilon": epsilon, "delta": rows[-1].get("delta") if rows else None,
        "target_epsilon": report["target_epsilon"], "rounds": len(rows),
        "audit": {"passed": not mismatches, "mismatches": len(mismatches),
                  "first": [f"round {m['round']}: {m['field']} recorded {m['recorded']!r}, recomputed "
                            f"{m['recomputed']!r}" for m in mismatches[:3]]},
        "canary_audit": report["canary_audit"],
    }


# ---------------------------------------------------------------------------------------
# Pure assembly
# ---------------------------------------------------------------------------------------

def _perplexity(loss: float | None) -> float | None:
    from fedft.score.answers import perplexity

    return None if loss is None else perplexity(loss)


def final_stage_name(summary: dict) -> str:
    """What a run's final adapter is: local, centralized or federated."""
    strategy = summary.get("strategy")
    return strategy if strategy in ("local", "centralized") else "federated"


def stages_from_evaluation(evaluation: dict) -> list[dict]:
    """One row per evaluated stage, in evaluation order."""
    sources = evaluation.get("stage_sources", {})
    rows = []
    for name in evaluation.get("stage_order", list(evaluation["stages"])):
        metrics = evaluation["stages"][name]
        row = {"stage": name, "source": sources.get(name)}
        row.update({k: v for k, v in metrics.items() if k != "samples"})
        rows.append(row)
    return rows


def stages_from_summary(summary: dict, dpo_summary: dict | None) -> list[dict]:
    """Base and final stage from summary.json (and DPO's preference scores when present)."""
    def row(stage: str, m: dict) -> dict:
        return {"stage": stage, "source": "summary.json", "loss": m.get("eval_loss"),
                "perplexity": _perplexity(m.get("eval_loss")), "exact_match": m.get("eval_exact_match"),
                "exact_match_by_task": m.get("eval_exact_match_by_task", {})}

    rows = [row("base", summary["base"]), row(final_stage_name(summary), summary["final"])]
    if dpo_summary:  # its rewards are measured against the final stage, DPO's reference
        keys = ("pref_accuracy", "reward_margin", "likelihood_accuracy")
        rows[1].update({k: dpo_summary.get(f"{k}_before") for k in keys})
        rows.append({"stage": "dpo", "source": "dpo/summary.json",
                     **{k: dpo_summary.get(f"{k}_after") for k in keys}})
    return rows


def preference_reference(summary: dict, evaluation: dict | None) -> str | None:
    """The stage whose log-probs the implicit rewards are measured against."""
    if evaluation:
        return evaluation.get("preference_reference") or ("base" if evaluation.get("preference_pairs") else None)
    return final_stage_name(summary)


def group_columns(stages: list[dict], institutions: dict | None) -> list[dict]:
    """Per-institution columns ('inst0 (date)') when known, else one per task."""
    if institutions:
        return [{"label": f"{inst} ({info['task']})", "key": "exact_match_by_institution", "name": inst}
                for inst, info in institutions.items()]
    tasks = sorted({t for s in stages for t in s.get("exact_match_by_task") or {}})
    return [{"label": t, "key": "exact_match_by_task", "name": t} for t in tasks]


def dpo_curves(history: list[dict]) -> dict:
    """Per-step DPO loss, reward accuracy and reward margin."""
    return {key: [r.get(key) for r in history] for key in ("step", "loss", "reward_accuracy", "reward_margin")}


def wall_times(summary: dict, dpo_summary: dict | None, history: list[dict] | None,
               evaluation: dict | None) -> dict:
    """Seconds spent federated, in DPO and evaluating (None where unknown)."""
    dpo = (dpo_summary or {}).get("wall_s")
    if dpo is None and history:
        dpo = history[-1].get("elapsed_s")
    return {"federated": summary.get("wall_seconds"), "dpo": dpo,
            "evaluation": (evaluation or {}).get("wall_s")}


def assemble_report(run_name: str, summary: dict, metrics: list[dict] | None, evaluation: dict | None,
                    dpo_summary: dict | None, history: list[dict] | None, privacy: dict | None) -> dict:
    """report.json's content from the run's parsed files."""
    omitted = []
    if evaluation:
        stages, institutions = stages_from_evaluation(evaluation), evaluation.get("institutions") or None
    else:
        stages, institutions = stages_from_summary(summary, dpo_summary), None
        omitted.append("no evaluation.json: stage table from summary.json (no perplexity on general text, "
                       "no per-institution scores); run `fedft report RUN_DIR --evaluate` for every metric")
    if not metrics:
        omitted.append("no metrics.jsonl: no federated training curves")
    if not history:
        omitted.append("no dpo/history.jsonl: no DPO stage curves")
    if privacy is None:
        omitted.append("no privacy_ledger.jsonl: this run was not differentially private")
    if not any(s.get("pref_accuracy") is not None for s in stages):
        omitted.append("no preference scores: no preference pairs were evaluated")
    cfg = summary.get("config", {})
    return {
        "run": run_name,
        "strategy": summary.get("strategy"),
        "rounds": summary.get("rounds"),
        "clients": cfg.get("simulation", {}).get("num_supernodes"),
        "base_model": cfg.get("model", {}).get("path"),
        "base_model_facts": model_fact_lines(summary.get("model")),
        "stage_table_source": "evaluation.json" if evaluation else "summary.json",
        "preference_reference": preference_reference(summary, evaluation),
        "stages": stages,
        "institutions": institutions,
        "columns": group_columns(stages, institutions),
        "curves": {"federated": federated_curves(metrics) if metrics else None,
                   "dpo": dpo_curves(history) if history else None},
        "privacy": privacy,
        "communication": {"bytes_up": summary.get("bytes_up_total", 0),
                          "bytes_down": summary.get("bytes_down_total", 0)},
        "wall_seconds": wall_times(summary, dpo_summary, history, evaluation),
        "samples": sample_sets(evaluation, summary),
        "notes": list((evaluation or {}).get("notes", [])),
        "omitted": omitted,
        "plots": {},
    }


def model_fact_lines(facts: dict | None) -> list[str]:
    """What the base was computed with (effective quantization) and how prompts were formatted."""
    if not facts:
        return []
    q, p = facts["quantization"], facts["prompt_format"]
    lines = [f"Effective quantization: {q['effective']} (asked: {q['requested']}; {q['quantized_layers']} "
             f"quantized layers, {100 * q['quantized_share']:.0f}% of the weight-layer weights)"
             + ("; in full precision: " + ", ".join(f"{v['layers']} {k}" for k, v in q["unquantized"].items())
                if q["unquantized"] else "") + "."]
    prompts = "the tokenizer's chat template" if p["prompts"] == "chat template" else (
        "no chat template: the fallback '### Instruction: ... ### Response:' layout")
    lines.append(f"Prompts: {prompts}; pad token {p['pad_token']!r}" + (" (the eos token)" if p["pad_is_eos"] else "")
                 + ".")
    return lines


def sample_sets(evaluation: dict | None, summary: dict) -> dict[str, list[dict]]:
    """Generated samples per stage (from evaluation.json, else the final ones in summary.json)."""
    if evaluation:
        return {name: m.get("samples", []) for name, m in evaluation["stages"].items() if m.get("samples")}
    final = summary.get("final", {}).get("samples")
    return {final_stage_name(summary): final} if final else {}


# ---------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------

def _fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _pct(value) -> str:
    return _fmt(None if value is None else 100 * value, "{:.1f}%")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ⏎ ")


def stage_table(report: dict) -> list[str]:
    """The markdown stage table."""
    columns = report["columns"]
    head = ["stage", "loss", "perplexity", "exact match", *[c["label"] for c in columns],
            "pref. accuracy", "reward margin", "chosen ranked first", "general-text perplexity"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for s in report["stages"]:
        groups = [_pct((s.get(c["key"]) or {}).get(c["name"])) for c in columns]
        cells = [s["stage"], _fmt(s.get("loss"), "{:.3f}"), _fmt(s.get("perplexity"), "{:.2f}"),
                 f"**{_pct(s.get('exact_match'))}**", *groups, _pct(s.get("pref_accuracy")),
                 _fmt(s.get("reward_margin"), "{:.3f}"), _pct(s.get("likelihood_accuracy")),
                 _fmt(s.get("general_perplexity"), "{:.2f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def privacy_lines(privacy: dict | None) -> list[str]:
    """The privacy section's lines."""
    if privacy is None:
        return ["Not differentially private (no privacy_ledger.jsonl)."]
    lines = [f"Mechanisms: {', '.join(privacy['mechanisms']) or '-'}; delta = {privacy['delta']}; "
             f"{privacy['rounds']} rounds accounted"
             + (f"; target epsilon {privacy['target_epsilon']}" if privacy.get("target_epsilon") else "") + ".", ""]
    lines += [f"- epsilon, {name}: **{value:.3f}**" for name, value in privacy["epsilon"].items()]
    audit = privacy["audit"]
    lines.append("- audit: " + ("passed, every recorded epsilon matches its recomputation" if audit["passed"]
                                else f"**FAILED**, {audit['mismatches']} mismatch(es): " + "; ".join(audit["first"])))
    if privacy.get("canary_audit"):
        lines.append(f"- canary audit: `{json.dumps(privacy['canary_audit'], sort_keys=True)[:300]}`")
    return lines


def sample_lines(samples: dict[str, list[dict]]) -> list[str]:
    """One small table of generated samples per stage."""
    if not samples:
        return ["No generated samples recorded."]
    from fedft.eval.stages import ordered_stage_names

    lines = []
    for stage in ordered_stage_names(samples):
        rows = samples[stage]
        lines += [f"**{stage}**", "", "| prompt | reference | prediction |", "| --- | --- | --- |"]
        lines += [f"| {_cell(r.get('prompt', r.get('prompt_source', '')))} | `{_cell(r['reference'])}` "
                  f"| `{_cell(r['prediction'])}` |" for r in rows]
        lines.append("")
    return lines


def report_markdown(report: dict) -> str:
    """report.md from report.json's content."""
    comm, wall, plots = report["communication"], report["wall_seconds"], report["plots"]
    lines = [f"# fedft run report: {report['run']}", "",
             f"Strategy {report['strategy']}, {report['rounds']} rounds, {report['clients']} clients, "
             f"base model `{report['base_model']}`. Stage table from {report['stage_table_source']}.", "",
             *[f"{line}" for line in report.get("base_model_facts") or []],
             *([""] if report.get("base_model_facts") else []),
             "## Stages", "", *stage_table(report), ""]
    if any(s.get("pref_accuracy") is not None for s in report["stages"]):
        lines += [f"Preference accuracy: share of held-out pairs whose implicit reward beta * log(pi / pi_ref) "
                  f"prefers the chosen answer, with pi_ref the {report['preference_reference']} model (which "
                  "therefore scores 50%, ties counting one half); reward margin: the mean reward difference. "
                  "Chosen ranked first: share of pairs where the model itself gives the chosen answer the "
                  "higher log-probability (no reference).", ""]
    if report["institutions"]:
        lines += ["Per-institution columns: exact match on the task the institution mostly holds ("
                  + ", ".join(f"{i}: {v['task']} {100 * v['share']:.0f}% of {v['rows']} rows"
                              for i, v in report["institutions"].items()) + ").", ""]
    for s in report["stages"]:
        if s.get("exact_match_own_model_by_institution"):
            lines += [f"{s['stage']}: the mean over its {s.get('clients', '')} adapters; each institution's own "
                      "adapter on its own task: " + ", ".join(
                          f"{inst} {_pct(v)}" for inst, v in s["exact_match_own_model_by_institution"].items())
                      + ".", ""]
    for key, title in (("curves", "Training curves"), ("stages", "Exact match per institution by stage"),
                       ("preferences", "Preference accuracy by stage")):
        lines += [f"## {title}", "", f"![{title}]({plots[key]})" if key in plots else "Not plotted (no data).", ""]
    lines += ["## Privacy", "", *privacy_lines(report["privacy"]), "",
              "## Communication and time", "",
              f"- bytes up {comm['bytes_up'] / 1e6:.2f} MB, down {comm['bytes_down'] / 1e6:.2f} MB, "
              f"total {(comm['bytes_up'] + comm['bytes_down']) / 1e6:.2f} MB",
              *[f"- wall time, {k}: {_fmt(v, '{:.1f} s')}" for k, v in wall.items()], "",
              "## Samples", "", *sample_lines(report["samples"])]
    if report["omitted"] or report["notes"]:
        lines += ["## Omitted", "", *[f"- {line}" for line in report["omitted"] + report["notes"]], ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------

def build_report(run_dir: Path) -> dict:
    """Write RUN_DIR/report.md, report.json and the plots; return report.json's content."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory: expected a fedft run directory")
    summary = read_json(run_dir / "summary.json", required=True)
    for key in ("base", "final"):
        if not isinstance(summary.get(key), dict):
            raise ReportError(f"{run_dir / 'summary.json'}: no {key!r} metrics; was it written by fedft?")
    report = assemble_report(
        run_dir.resolve().name, summary, read_rows(run_dir / "metrics.jsonl"),
        read_json(run_dir / "evaluation.json"), read_json(run_dir / "dpo" / "summary.json"),
        read_rows(run_dir / "dpo" / "history.jsonl"), privacy_summary(run_dir),
    )
    report["plots"] = write_plots(report, run_dir)
    atomic_write_json(run_dir / REPORT_JSON, report)
    atomic_write_text(run_dir / REPORT_MD, report_markdown(report))
    return report
