"""The run report: built from a run's files only, every stage present, regenerated identically.

One run directory is evaluated for real (tiny NF4 model, ``fedft report --evaluate`` with a
local-only comparison run and a DPO stage); the other cases are hand-written files, so the
numbers in report.json can be checked against the numbers that went in.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedft.config import config_to_dict, load_config
from fedft.demo.general import demo_general_texts
from fedft.demo.pairs import make_preference_rows
from fedft.demo.tasks import write_jsonl
from fedft.model.adapter import save_adapter
from fedft.model.load import cached_peft_model, initial_adapter_state, model_spec
from fedft.privacy.ledger import USER_LEVEL, LedgerRow, append_row, recompute, with_epsilons
from fedft.report.markdown import REPORT_JSON, REPORT_MD, ReportError, build_report
from fedft.report.plots import PLOTS
from fedft.rundir import atomic_write_json, atomic_write_jsonl
from simulations.commands import main
from tests.conftest import write_tiny_setup

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BY_TASK = {"date": 0.0, "json": 0.0, "snake": 0.0, "units": 0.0}


def _summary(cfg_dict: dict | None = None, strategy: str = "fedavg") -> dict:
    return {
        "strategy": strategy, "rounds": 2, "wall_seconds": 12.5, "bytes_up_total": 3_000_000,
        "bytes_down_total": 4_000_000, "config": cfg_dict or {"simulation": {"num_supernodes": 2}},
        "base": {"eval_loss": 2.0, "eval_exact_match": 0.0, "eval_exact_match_by_task": BY_TASK},
        "final": {"eval_loss": 0.5, "eval_exact_match": 0.5,
                  "eval_exact_match_by_task": {**BY_TASK, "date": 1.0, "units": 1.0},
                  "samples": [{"prompt_source": "eval.jsonl:1", "reference": "a|b", "prediction": "a|b"}]},
    }


def _metrics() -> list[dict]:
    return [{"round": 0, "train_loss": None, "eval_loss": 2.0, "eval_exact_match": 0.0, "seconds": 0.0},
            {"round": 1, "train_loss": 1.5, "seconds": 1.0},
            {"round": 2, "train_loss": 0.7, "eval_loss": 0.5, "eval_exact_match": 0.5, "seconds": 1.0}]


def _dpo_files(run_dir) -> None:
    atomic_write_jsonl(run_dir / "dpo" / "history.jsonl", [
        {"step": 1, "loss": 0.69, "reward_accuracy": 0.5, "reward_margin": 0.0, "elapsed_s": 1.0},
        {"step": 2, "loss": 0.60, "reward_accuracy": 0.75, "reward_margin": 0.2, "elapsed_s": 2.0}])
    atomic_write_json(run_dir / "dpo" / "summary.json", {
        "wall_s": 3.5, "pref_accuracy_before": 0.6, "pref_accuracy_after": 0.9,
        "reward_margin_before": 0.1, "reward_margin_after": 0.4})


def _files_run(tmp_path, *, dpo: bool = False, strategy: str = "fedavg"):
    run = tmp_path / "run"
    atomic_write_json(run / "summary.json", _summary(strategy=strategy))
    atomic_write_jsonl(run / "metrics.jsonl", _metrics())
    if dpo:
        _dpo_files(run)
    return run


# --- a real evaluation through the CLI ---------------------------------------------------

@pytest.fixture(scope="module")
def evaluated_run(tiny_model_dir, tmp_path_factory):
    """``fedft report RUN --evaluate --compare LOCAL``: base, local, federated and dpo stages."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core machine: no OpenMP waits
    root = tmp_path_factory.mktemp("run-report")
    cfg = load_config(write_tiny_setup(root, tiny_model_dir))
    model, _ = cached_peft_model(model_spec(cfg))
    initial = initial_adapter_state(model_spec(cfg))
    gen = torch.Generator().manual_seed(0)
    perturbed = [{k: 0.2 * torch.randn(v.shape, generator=gen) for k, v in initial.items()} for _ in range(3)]
    run, local = root / "run", root / "local"
    save_adapter(model, perturbed[0], run / "adapter")
    save_adapter(model, perturbed[1], run / "dpo" / "adapter")
    for i in range(2):
        save_adapter(model, perturbed[2 - i], local / "adapter" / f"client{i}")
    atomic_write_json(run / "summary.json", _summary(config_to_dict(cfg)))
    atomic_write_json(local / "summary.json", _summary(config_to_dict(cfg), strategy="local"))
    atomic_write_jsonl(run / "metrics.jsonl", _metrics())
    _dpo_files(run)
    write_jsonl(make_preference_rows(1, seed=7), root / "prefs.jsonl")
    (root / "general.txt").write_text("\n".join(demo_general_texts(4)) + "\n")
    status = main(["report", str(run), "--evaluate", "--compare", str(local), "--samples", "2",
                   "--general-text", str(root / "general.txt"), "--pairs", str(root / "prefs.jsonl")])
    torch.set_num_threads(threads)
    assert status == 0
    return run


def test_report_has_every_stage_in_every_output(evaluated_run):
    report = json.loads((evaluated_run / REPORT_JSON).read_text())
    stages = ["base", "local", "federated", "dpo"]
    assert [s["stage"] for s in report["stages"]] == stages
    assert set(report["samples"]) == set(stages)
    markdown = (evaluated_run / REPORT_MD).read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    for stage in stages:
        assert any(line.startswith(f"| {stage} |") for line in table), stage
    assert "inst0 (date)" in markdown and "inst1 (units)" in markdown
    assert "local: the mean over its 2 adapters; each institution's own adapter on its own task" in markdown
    for key in ("curves", "stages", "preferences"):
        assert (evaluated_run / PLOTS[key]).read_bytes()[:8] == PNG_MAGIC
    for s in report["stages"]:
        assert s["perplexity"] == pytest.approx(math.exp(s["loss"]))
        assert set(s["exact_match_by_institution"]) == {"inst0", "inst1"}
    assert report["wall_seconds"]["dpo"] == 3.5 and report["wall_seconds"]["evaluation"] > 0
    assert report["curves"]["dpo"]["loss"] == [0.69, 0.60]


def test_report_regenerates_identically_from_files(evaluated_run, capsys):
    first = (evaluated_run / REPORT_JSON).read_bytes(), (evaluated_run / REPORT_MD).read_bytes()
    (evaluated_run / REPORT_JSON).unlink()
    (evaluated_run / REPORT_MD).unlink()
    assert main(["report", str(evaluated_run)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert ((evaluated_run / REPORT_JSON).read_bytes(), (evaluated_run / REPORT_MD).read_bytes()) == first


# --- hand-written files --------------------------------------------------------------------

def test_without_evaluation_the_table_comes_from_the_summary(tmp_path):
    report = build_report(_files_run(tmp_path, dpo=True))
    rows = {s["stage"]: s for s in report["stages"]}
    assert list(rows) == ["base", "federated", "dpo"]
    assert rows["base"]["perplexity"] == pytest.approx(math.exp(2.0))
    assert rows["federated"]["exact_match_by_task"]["date"] == 1.0
    assert (rows["federated"]["pref_accuracy"], rows["dpo"]["pref_accuracy"]) == (0.6, 0.9)
    assert any("no evaluation.json" in line for line in report["omitted"])
    assert report["communication"] == {"bytes_up": 3_000_000, "bytes_down": 4_000_000}
    assert report["wall_seconds"] == {"federated": 12.5, "dpo": 3.5, "evaluation": None}
    markdown = (tmp_path / "run" / REPORT_MD).read_text()
    assert "total 7.00 MB" in markdown and "a\\|b" in markdown  # pipes escaped in sample cells


def test_optional_parts_are_omitted_with_a_line(tmp_path):
    report = build_report(_files_run(tmp_path, strategy="centralized"))
    assert [s["stage"] for s in report["stages"]] == ["base", "centralized"]
    assert report["curves"]["dpo"] is None and report["privacy"] is None
    assert "preferences" not in report["plots"]
    markdown = (tmp_path / "run" / REPORT_MD).read_text()
    for line in ("no dpo/history.jsonl", "no privacy_ledger.jsonl", "no preference scores"):
        assert line in markdown


def test_missing_summary_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "run" / "summary.json")):
        build_report(tmp_path / "run")
    assert main(["report", str(tmp_path / "run")]) == 2
    assert f"{tmp_path / 'run' / 'summary.json'} does not exist" in capsys.readouterr().err


def test_broken_json_names_file_and_line(tmp_path, capsys):
    run = _files_run(tmp_path)
    (run / "metrics.jsonl").write_text('{"round": 0}\n{"round": \n')
    with pytest.raises(ReportError, match=r"metrics\.jsonl:2: not valid JSON"):
        build_report(run)
    assert main(["report", str(run)]) == 2
    assert "metrics.jsonl:2" in capsys.readouterr().err


def test_compare_needs_evaluate(tmp_path, capsys):
    assert main(["report", str(_files_run(tmp_path)), "--compare", str(tmp_path)]) == 2
    assert "need --evaluate" in capsys.readouterr().err


def _ledger(run, tamper: bool = False) -> list[LedgerRow]:
    rows: list[LedgerRow] = []
    for number in (1, 2):
        row = with_epsilons(rows, LedgerRow(
            round=number, mechanisms=[USER_LEVEL], sampled_clients=["a", "b"],
            participating_clients=["a", "b"], num_clients=2, sampling="fixed", sampling_rate=1.0,
            noise_multiplier=1.5, clip_norm=1.0, delta=1e-5))
        if tamper and number == 2:
            row = LedgerRow.from_dict({**row.to_dict(), "epsilon_user_rdp": 0.1})
        append_row(run / "privacy_ledger.jsonl", row)
        rows.append(row)
    return rows


def test_privacy_summary_is_the_audited_ledger(tmp_path):
    run = _files_run(tmp_path)
    rows = _ledger(run)
    privacy = build_report(run)["privacy"]
    assert privacy["mechanisms"] == [USER_LEVEL] and privacy["delta"] == 1e-5
    assert privacy["epsilon"]["user-level (RDP)"] == pytest.approx(recompute(rows)[-1]["epsilon_user_rdp"])
    assert privacy["audit"] == {"passed": True, "mismatches": 0, "first": []}
    assert "audit: passed" in (run / REPORT_MD).read_text()


def test_a_tampered_ledger_fails_the_audit(tmp_path):
    run = _files_run(tmp_path)
    _ledger(run, tamper=True)
    privacy = build_report(run)["privacy"]
    assert not privacy["audit"]["passed"] and "epsilon_user_rdp recorded 0.1" in privacy["audit"]["first"][0]
    assert "**FAILED**" in (run / REPORT_MD).read_text()
