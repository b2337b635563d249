"""Integration: real Flower Simulation Engine (Ray) runs with a tiny NF4 model on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedft.config import load_config
from fedft.rundir import load_metrics

pytestmark = pytest.mark.slow


def _run(config_path, out, overrides=()):
    from simulations.runner import simulate

    return simulate(load_config(config_path, list(overrides)), out)


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory, tiny_model_dir):
    # module-scoped copy of the tiny config so the Ray run happens once for several tests
    from fedft.demo.pairs import make_preference_rows
    from fedft.demo.tasks import write_jsonl
    from tests.conftest import write_tiny_setup

    d = tmp_path_factory.mktemp("sim")
    write_tiny_setup(d, tiny_model_dir)
    write_jsonl(make_preference_rows(4, seed=0), d / "prefs-train.jsonl")
    write_jsonl(make_preference_rows(2, seed=1), d / "prefs-eval.jsonl")
    # the whole pipeline: federated rounds, the DPO stage, every stage evaluated, the report
    summary = _run(d / "tiny.toml", d / "run", [
        "dpo.enabled=true", f"dpo.train_path={d / 'prefs-train.jsonl'}", f"dpo.eval_path={d / 'prefs-eval.jsonl'}",
        "dpo.steps=3", "dpo.batch_size=4", "dpo.rejected_from=model", "dpo.samples=2",
        "report.evaluate_stages=true", "report.samples=2"])
    return d, summary


def test_the_run_ends_with_dpo_every_stage_evaluated_and_a_report(fedavg_run):
    from fedft.report.markdown import build_report

    d, summary = fedavg_run
    run = d / "run"
    assert (run / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
    assert summary["dpo"]["steps"] == 3 and summary["evaluation_wall_s"] > 0
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["stage_order"] == ["base", "federated", "dpo"]
    # scored on the held-out pairs the DPO stage built from the federated model's own answers
    assert evaluation["preference_file"] == str(run / "dpo" / "pairs-eval.jsonl")
    assert summary["dpo"]["rejected_from"] == "model" and summary["dpo"]["eval_path"] == evaluation["preference_file"]
    for stage in evaluation["stages"].values():
        assert {"loss", "perplexity", "exact_match", "pref_accuracy", "reward_margin",
                "likelihood_accuracy"} <= stage.keys()
    assert evaluation["stages"]["federated"]["pref_accuracy"] == 0.5  # DPO's reference scores itself 50%
    report = json.loads((run / "report.json").read_text())
    text = (run / "report.md").read_text()
    for stage in ("base", "federated", "dpo"):
        assert stage in text
    assert build_report(run) == report  # `fedft report RUN_DIR` rebuilds the same from the files
    assert report["plots"]
    for plot in report["plots"].values():
        assert (run / plot).stat().st_size > 0


def test_two_clients_two_rounds_loss_falls_and_adapter_changes(fedavg_run):
    d, summary = fedavg_run
    run = d / "run"
    rows = load_metrics(run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["train_loss"] < rows[1]["train_loss"]
    assert rows[2]["eval_loss"] < rows[0]["eval_loss"]
    for key in ("eval_exact_match", "eval_exact_match_by_task", "bytes_up", "bytes_down", "seconds"):
        assert key in rows[2], key
    assert rows[1]["clients"] == 2
    final = load_file(run / "adapter" / "adapter_model.safetensors")
    first = load_file(run / "checkpoints" / "round-001" / "adapter_model.safetensors")
    assert final.keys() == first.keys()
    assert any(not torch.equal(final[k], first[k]) for k in final)
    assert json.loads((run / "summary.json").read_text())["rounds"] == 2
    assert (run / "curves.png").stat().st_size > 0


def test_bytes_are_logged_per_round_and_cover_the_adapter(fedavg_run):
    d, _ = fedavg_run
    for row in load_metrics(d / "run")[1:]:
        # each client received and sent the whole adapter plus per-tensor framing
        assert row["bytes_up_per_client"] >= row["adapter_bytes"]
        assert row["bytes_down"] / row["clients"] >= row["adapter_bytes"]
        assert row["bytes_up"] == row["clients"] * row["bytes_up_per_client"]


def test_svd_aggregation_with_heterogeneous_ranks_and_float16_on_the_wire(fedavg_run):
    d, _ = fedavg_run
    summary = _run(d / "tiny.toml", d / "svd", ["strategy.aggregation=svd", "lora.client_ranks=[2, 4]",
                                                "strategy.wire_dtype=float16"])
    rows = load_metrics(d / "svd")
    base_rows = load_metrics(d / "run")
    assert rows[2]["client_ranks"] == [2, 4]
    assert 0.0 <= rows[1]["svd_discarded_energy"] < 1.0
    assert rows[1]["aggregation_error"] > 0  # the clients' A factors differ after training
    # float16 halves the uplink; round 2 also sends the rank-2 client only its rank-2 share
    assert rows[1]["bytes_up_per_client"] < 0.8 * base_rows[1]["bytes_up_per_client"]
    assert rows[2]["bytes_down"] < rows[1]["bytes_down"]
    final = load_file(d / "svd" / "adapter" / "adapter_model.safetensors")
    assert all(v.shape[0] == 4 for k, v in final.items() if ".lora_A." in k)  # global rank lora.r
    assert summary["mean_svd_discarded_energy"] is not None


def _sections(run_dir) -> list[str]:
    return [line for line in (run_dir / "report.md").read_text().splitlines() if line.startswith("## ")]


@pytest.mark.parametrize("baseline", ["centralized", "local"])
def test_baselines_go_through_the_same_run_loop_to_the_same_report(fedavg_run, baseline):
    d, _ = fedavg_run
    out = d / baseline
    summary = _run(d / "tiny.toml", out, [
        f"strategy.name={baseline}", "dpo.enabled=true", f"dpo.train_path={d / 'prefs-train.jsonl'}",
        f"dpo.eval_path={d / 'prefs-eval.jsonl'}", "dpo.steps=2", "dpo.batch_size=4",
        "report.evaluate_stages=true", "report.samples=2"])
    rows = load_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2] and all("eval_loss" in r for r in rows)
    evaluation = json.loads((out / "evaluation.json").read_text())
    # the run's own round-0 and last-round answers are reused (a local run's clients are scored afresh)
    reused = {"centralized": "base, centralized", "local": "base"}[baseline]
    assert any(note.startswith(f"answers and held-out loss of {reused} taken") for note in evaluation["notes"])
    if baseline == "centralized":  # one adapter: checkpoints, DPO and the same report as federated
        assert (out / "checkpoints" / "round-002" / "round.json").is_file()
        assert evaluation["stage_order"] == ["base", "centralized", "dpo"] and summary["dpo"]["steps"] == 2
        assert _sections(out) == _sections(d / "run")
    else:  # one adapter per client: no single adapter for DPO, each client scored on its own
        assert sorted(p.name for p in (out / "adapter").iterdir()) == ["client0", "client1"]
        assert evaluation["stage_order"] == ["base", "local"] and "dpo" not in summary
        assert set(summary["final"]["eval_exact_match_by_client"]) == {"client0", "client1"}
        assert {s for s in _sections(out)} <= set(_sections(d / "run"))
