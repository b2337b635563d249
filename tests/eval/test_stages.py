"""Stage evaluation: every metric of base / federated / local states on a real tiny NF4 model.

References: the base's loss is recomputed with the adapter disabled; a local stage's numbers
are the mean of its clients' numbers; perplexities are exp of the losses they come from.
Losses are compared to 1e-4 relative: bitsandbytes' CPU NF4 path gives answer losses that
differ by ~1e-5 relative between calls separated by adapter loads (measured: 4.61071 vs
4.61069 for the same state), so exact float equality across calls is not a property here.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from fedft.config import config_to_dict, load_config
from fedft.data.rows import DataError, load_row_files, tokenize_dataset
from fedft.demo.base import pretraining_text
from fedft.demo.general import DEMO_PRETRAIN_LINES, DEMO_PRETRAIN_SEED, demo_general_texts
from fedft.demo.pairs import make_preference_rows
from fedft.demo.tasks import write_jsonl
from fedft.eval.held_out import load_eval_examples
from fedft.eval.inputs import evaluate_run, load_adapter_state, load_pairs, read_general_texts
from fedft.eval.stages import evaluate_stages, institution_tasks, own_model_scores, sample_indices
from fedft.model.adapter import get_adapter_state, save_adapter
from fedft.model.load import cached_peft_model, initial_adapter_state, model_spec
from fedft.rundir import EVALUATION_FILE, atomic_write_json
from fedft.score.answers import answer_loss
from fedft.score.preference import pair_logps
from fedft.train.local import train_local
from tests.conftest import REPO_ROOT, write_tiny_setup

TASKS = {"date", "units", "json", "snake"}


def _trained(cfg, model, tokenizer, initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A few real optimizer steps on the institutions' training rows."""
    examples = tokenize_dataset(load_row_files(cfg.data.train_files), tokenizer, cfg.data)
    train = dataclasses.replace(cfg.train, local_steps=8, learning_rate=2e-2)
    return train_local(model, examples, tokenizer.pad_token_id, train, global_state=initial,
                       round_index=1, total_rounds=1).state


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: tiny matmuls on a shared 2-core machine are far faster without OpenMP waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage-eval")
    cfg = load_config(write_tiny_setup(root, tiny_model_dir))
    model, tokenizer = cached_peft_model(model_spec(cfg))
    write_jsonl(make_preference_rows(2, seed=7), root / "prefs.jsonl")
    (root / "general.txt").write_text("\n".join(demo_general_texts(6)) + "\n")
    initial = initial_adapter_state(model_spec(cfg))
    return {
        "root": root, "cfg": cfg, "model": model, "tokenizer": tokenizer, "initial": initial,
        "examples": load_eval_examples(cfg, tokenizer),
        "pairs": load_pairs(root / "prefs.jsonl", tokenizer, 96, None, 0),
        "general": read_general_texts(root / "general.txt"),
        "trained": _trained(cfg, model, tokenizer, initial),
    }


@pytest.fixture(scope="module")
def evaluation(setup):
    s = setup
    before = get_adapter_state(s["model"])
    result = evaluate_stages(
        s["cfg"], {"federated": s["trained"], "base": None, "local": [s["initial"], s["trained"]]},
        eval_examples=s["examples"], pairs=s["pairs"], general_texts=s["general"], num_samples=3,
        out_dir=s["root"], progress=lambda line: None,
    )
    after = get_adapter_state(s["model"])
    return result, before, after


def test_stages_in_pipeline_order_and_written_atomically(setup, evaluation):
    result, before, after = evaluation
    assert result["stage_order"] == ["base", "local", "federated"]
    assert json.loads((setup["root"] / EVALUATION_FILE).read_text()) == json.loads(json.dumps(result))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model's adapter is restored


def test_perplexity_is_exp_of_loss(evaluation):
    for metrics in evaluation[0]["stages"].values():
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-12)
        assert metrics["general_perplexity"] == pytest.approx(math.exp(metrics["general_loss"]), rel=1e-12)


def test_base_is_the_model_with_its_adapter_disabled(setup, evaluation):
    base = evaluation[0]["stages"]["base"]
    model, pad = setup["model"], setup["tokenizer"].pad_token_id
    with model.disable_adapter():
        reference = answer_loss(model, setup["examples"], pad)
    assert base["loss"] == pytest.approx(reference, rel=1e-4)
    with model.disable_adapter():
        chosen, rejected = pair_logps(model, setup["pairs"], pad)
    gaps = chosen - rejected
    assert base["likelihood_accuracy"] == pytest.approx(((gaps > 0).float() + 0.5 * (gaps == 0).float()).mean().item())


def test_rewards_are_measured_against_the_sft_stage(evaluation):
    result = evaluation[0]
    assert result["preference_reference"] == "federated"
    federated = result["stages"]["federated"]
    assert federated["pref_accuracy"] == 0.5 and federated["reward_margin"] == 0.0  # the reference itself
    assert set(federated["pref_accuracy_by_task"].values()) == {0.5}


def test_a_trained_adapter_changes_the_metrics(evaluation):
    stages = evaluation[0]["stages"]
    base, trained = stages["base"], stages["federated"]
    assert trained["loss"] < base["loss"] - 0.05  # eight steps on the task rows: 4.61 -> 4.52 measured
    assert abs(trained["general_loss"] - base["general_loss"]) > 1e-2
    assert abs(stages["base"]["reward_margin"]) > 1e-3  # the base against the trained reference


def test_per_task_and_per_institution_keys(evaluation):
    result = evaluation[0]
    # write_tiny_setup: two institutions, inst0 mostly date, inst1 mostly units
    assert {i: v["task"] for i, v in result["institutions"].items()} == {"inst0": "date", "inst1": "units"}
    for metrics in result["stages"].values():
        assert set(metrics["exact_match_by_task"]) == TASKS
        assert set(metrics["pref_accuracy_by_task"]) == TASKS
        assert metrics["exact_match_by_institution"] == {
            "inst0": metrics["exact_match_by_task"]["date"], "inst1": metrics["exact_match_by_task"]["units"]}


def test_local_stage_is_the_mean_of_its_clients(evaluation):
    stages = evaluation[0]["stages"]
    local, base, trained = stages["local"], stages["base"], stages["federated"]
    for key in ("loss", "exact_match", "pref_accuracy", "reward_margin", "general_loss"):
        assert local[key] == pytest.approx((base[key] + trained[key]) / 2, rel=1e-4, abs=1e-4), key
    assert local["perplexity"] == pytest.approx(math.exp(local["loss"]))
    assert local["exact_match_by_client"] == {"client0": base["exact_match"], "client1": trained["exact_match"]}
    # client i is institution i (sorted), scored on the task that institution mostly holds
    assert local["exact_match_own_model_by_institution"] == {
        "inst0": base["exact_match_by_task"]["date"], "inst1": trained["exact_match_by_task"]["units"]}


def test_samples_cover_the_tasks(evaluation):
    samples = evaluation[0]["stages"]["federated"]["samples"]
    assert len(samples) == 3 and len({s["task"] for s in samples}) == 3
    assert all(set(s) == {"prompt", "reference", "prediction", "task"} for s in samples)


def test_evaluate_run_reads_adapters_and_baselines_from_run_dirs(setup, evaluation):
    s, stages = setup, evaluation[0]["stages"]
    run, local = s["root"] / "run", s["root"] / "local-run"
    save_adapter(s["model"], s["trained"], run / "adapter")
    for i, state in enumerate([s["initial"], s["trained"]]):
        save_adapter(s["model"], state, local / "adapter" / f"client{i}")
    for path, strategy in ((run, "fedavg"), (local, "local")):
        atomic_write_json(path / "summary.json", {"strategy": strategy, "config": config_to_dict(s["cfg"])})
    assert all(torch.equal(load_adapter_state(run / "adapter")[k], s["trained"][k]) for k in s["trained"])
    result = evaluate_run(run, compare=[local], general_text=s["root"] / "general.txt",
                          pairs_file=s["root"] / "prefs.jsonl", num_samples=3, progress=lambda line: None)
    assert result["stage_order"] == ["base", "local", "federated"]
    assert result["stage_sources"]["local"] == str(local)
    for name in ("base", "local", "federated"):
        assert result["stages"][name]["loss"] == pytest.approx(stages[name]["loss"], rel=1e-4)
    assert (run / EVALUATION_FILE).exists()


def test_institution_tasks_takes_the_majority_task():
    rows = [{"institution": "a", "task": "x"}] * 3 + [{"institution": "a", "task": "y"},
                                                       {"institution": "b", "task": "y"}, {"task": "x"}]
    assert institution_tasks(rows, "institution", "task") == {
        "a": {"task": "x", "share": 0.75, "rows": 4}, "b": {"task": "y", "share": 1.0, "rows": 1}}
    assert institution_tasks(rows, "hospital", "task") == {}


def test_own_model_scores_pair_client_i_with_institution_i():
    institutions = {"b": {"task": "y"}, "a": {"task": "x"}}
    per_client = [{"exact_match_by_institution": {"a": 0.9, "b": 0.1}},
                  {"exact_match_by_institution": {"a": 0.2, "b": 0.8}}]
    assert own_model_scores(per_client, institutions) == {"a": 0.9, "b": 0.8}
    assert own_model_scores(per_client[:1], institutions) == {}


def test_sample_indices_round_robin_over_tasks():
    class E:
        def __init__(self, task):
            self.task = task

    examples = [E(t) for t in "aaabbc"]
    assert sample_indices(examples, 4) == [0, 3, 5, 1]
    assert sample_indices(examples, 10) == [0, 3, 5, 1, 4, 2]


def test_general_text_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "g.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"g\.jsonl:2: expected an object with a string field 'text'"):
        read_general_texts(bad)
    with pytest.raises(DataError, match="does not exist"):
        read_general_texts(tmp_path / "missing.txt")


DEMO_GENERAL_FILE = REPO_ROOT / "simulations" / "data" / "demo" / "general.jsonl"


def test_demo_probe_is_held_out_from_the_base_pretraining_text():
    texts = read_general_texts(DEMO_GENERAL_FILE)
    assert texts == demo_general_texts(len(texts))
    assert not set(texts) & set(pretraining_text(DEMO_PRETRAIN_LINES, DEMO_PRETRAIN_SEED))
    with pytest.raises(ValueError, match="pretraining seed"):
        demo_general_texts(5, seed=DEMO_PRETRAIN_SEED)


def test_the_runs_own_held_out_answers_are_reused_only_for_the_same_examples(setup):
    """Answers the run's held-out evaluation already produced are not generated again.

    The reused answers are doctored (every reference, loss 0.125) so that reuse shows in the
    result; the base's record names other examples, so the base is scored afresh.
    """
    from fedft.eval.held_out import ANSWERS, evaluate_model
    from fedft.model.adapter import set_adapter_state

    s = setup
    set_adapter_state(s["model"], s["trained"])
    federated = evaluate_model(s["model"], s["tokenizer"], s["examples"])
    doctored = {**federated[ANSWERS], "predictions": [e.reference for e in s["examples"]], "loss": 0.125}
    base = evaluate_model(s["model"], s["tokenizer"], s["examples"][:3])
    result = evaluate_stages(
        s["cfg"], {"base": None, "federated": s["trained"]}, eval_examples=s["examples"], num_samples=1,
        scored={"federated": {ANSWERS: doctored}, "base": {ANSWERS: {**base[ANSWERS], "loss": 0.125}}},
        progress=lambda line: None,
    )
    assert result["stages"]["federated"]["exact_match"] == 1.0
    assert result["stages"]["federated"]["loss"] == 0.125
    assert result["stages"]["base"]["loss"] != 0.125
    assert any("answers and held-out loss of federated taken" in note for note in result["notes"])
    assert not any("base" in note and "taken" in note for note in result["notes"])
