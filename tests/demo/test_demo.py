"""The embedded demo: reproducible data, non-IID institutions, a base that cannot solve the tasks."""

from __future__ import annotations

from collections import Counter

from fedft.config import load_config
from fedft.data.rows import read_rows
from fedft.demo.base import build_char_tokenizer
from fedft.demo.tasks import make_demo_rows, make_eval_rows
from tests.conftest import REPO_ROOT

ROOT = REPO_ROOT
DEMO_DATA = ROOT / "simulations" / "data" / "demo"


def test_committed_demo_data_is_what_the_generator_writes(tmp_path):
    from simulations.commands import main

    assert main(["demo", "data", "--out", str(tmp_path)]) == 0
    for name in ("train.jsonl", "eval.jsonl", "prefs-train.jsonl", "prefs-eval.jsonl"):
        assert (tmp_path / name).read_text() == (DEMO_DATA / name).read_text(), name


def test_institutions_are_non_iid():
    rows = read_rows(DEMO_DATA / "train.jsonl")
    by_inst: dict[str, Counter] = {}
    for row in rows:
        by_inst.setdefault(row["institution"], Counter())[row["task"]] += 1
    assert len(by_inst) == 4
    tops = {inst: counts.most_common(1)[0] for inst, counts in by_inst.items()}
    assert len({task for task, _ in tops.values()}) == 4  # each institution has its own task
    for inst, (task, n) in tops.items():
        assert n / sum(by_inst[inst].values()) > 0.85, inst


def test_answers_are_checkable():
    rows = make_demo_rows(4, 10, 1.0, seed=3)
    for row in rows:
        if row["task"] == "date":
            assert len(row["output"]) == 10 and row["output"][4] == "-"
        if row["task"] == "units":
            assert row["output"].startswith(row["input"].split()[0])
    assert len(make_eval_rows(5, seed=1)) == 20


def test_tokenizer_round_trips_text_and_saves(tmp_path):
    from transformers import AutoTokenizer

    tok = build_char_tokenizer()
    text = '{"name": "Ada", "age": 36}\nrisk_limit'
    assert tok.decode(tok(text)["input_ids"]) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == tok(text)["input_ids"] and again.chat_template


def test_the_demo_base_does_not_solve_the_tasks():
    import dataclasses

    from fedft.eval.held_out import HeldOutEvaluator

    cfg = load_config(ROOT / "simulations" / "demo.toml")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_max_examples=48))
    evaluator = HeldOutEvaluator(cfg)
    metrics = evaluator(evaluator.initial_state)
    assert metrics["eval_exact_match"] < 0.10
