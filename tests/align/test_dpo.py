"""The DPO stage: the loss against hand arithmetic, a frozen reference, preference data, demo pairs."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from fedft.align.dpo import REFERENCE_ADAPTER, train_dpo
from fedft.align.stage import run_dpo_stage
from fedft.config import ConfigError, load_config
from fedft.data.preferences import read_preference_jsonl, tokenize_pair
from fedft.data.rows import DataError, tokenize_row
from fedft.demo.base import build_char_tokenizer
from fedft.demo.pairs import make_demo_preferences
from fedft.demo.tasks import TASKS, make_demo_rows, make_eval_rows
from fedft.score.preference import dpo_loss, pair_batch, pair_logps, preference_metrics, scored_logps, sequence_logps
from tests.conftest import REPO_ROOT

ROOT = REPO_ROOT
DEMO_DATA = ROOT / "simulations" / "data" / "demo"


def test_dpo_loss_matches_hand_computed_values():
    # beta = 0.5, two pairs (log-probs summed over answer tokens):
    # pair 1: chosen reward   = 0.5 * (-1.0 - -2.0) =  0.5,  rejected reward = 0.5 * (-3.0 - -2.0) = -0.5
    #         loss = -log sigmoid(0.5 - -0.5) = log(1 + e^-1)  = 0.3132616875182228
    # pair 2: chosen reward   = 0.5 * (-2.0 - -1.5) = -0.25, rejected reward = 0.5 * (-1.0 - -1.5) =  0.25
    #         loss = -log sigmoid(-0.25 - 0.25) = log(1 + e^0.5) = 0.9740769841801067
    # mean = (0.3132616875182228 + 0.9740769841801067) / 2 = 0.6436693358491647
    loss, chosen, rejected = dpo_loss(
        torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([-3.0, -1.0], dtype=torch.float64),
        torch.tensor([-2.0, -1.5], dtype=torch.float64), torch.tensor([-2.0, -1.5], dtype=torch.float64),
        beta=0.5,
    )
    assert loss.item() == pytest.approx(0.6436693358491647, abs=1e-12)
    assert chosen.tolist() == [0.5, -0.25] and rejected.tolist() == [-0.5, 0.25]
    # policy == reference: every reward is 0 and the loss is log 2
    same = torch.tensor([-4.0, -7.0])
    assert dpo_loss(same, same - 1, same, same - 1, beta=0.1)[0].item() == pytest.approx(math.log(2))


# ---------------------------------------------------------------------------------- data


@pytest.mark.parametrize("line, fragment", [
    ('{"prompt": "x", "chosen": "a"', "not valid JSON"),
    ('["x", "a", "b"]', "expected a JSON object"),
    ('{"prompt": "x", "chosen": "a"}', "missing field(s) 'rejected'"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "field 'prompt' must be a string or"),
    ('{"prompt": "", "chosen": "a", "rejected": "b"}', "field 'prompt' is an empty string"),
    ('{"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], '
     '"chosen": "a", "rejected": "b"}', "field 'prompt' ends with an assistant message"),
    ('{"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}',
     "field 'prompt': messages[0] must be"),
    ('{"prompt": "x", "chosen": "", "rejected": "b"}', "field 'chosen' must be a non-empty string"),
    ('{"prompt": "x", "chosen": "a", "rejected": 7}', "field 'rejected' must be a non-empty string"),
    ('{"prompt": "x", "chosen": "a", "rejected": "a"}', "'chosen' and 'rejected' are the same answer"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "task": 3}', "field 'task' must be a string"),
])
def test_bad_preference_rows_name_file_line_and_field(tmp_path, line, fragment):
    path = tmp_path / "prefs.jsonl"
    good = json.dumps({"prompt": "Say hi.", "chosen": "hi", "rejected": "bye", "task": "greet"})
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(DataError) as err:
        read_preference_jsonl(path)
    assert str(err.value).startswith(f"{path}:3:"), str(err.value)
    assert fragment in str(err.value)


def test_missing_or_empty_preference_file_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_preference_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        read_preference_jsonl(tmp_path / "empty.jsonl")


def test_pairs_are_tokenized_like_sft_rows_and_labels_cover_answers_only(tmp_path):
    tokenizer = build_char_tokenizer()
    path = tmp_path / "prefs.jsonl"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "ISO date:\nMay 3 1956"}]
    path.write_text(
        json.dumps({"prompt": "ISO date:\nMay 3 1956", "chosen": "1956-05-03", "rejected": "1956-03-05"}) + "\n"
        + json.dumps({"prompt": messages, "chosen": "1956-05-03", "rejected": "1956-03-05", "task": "date"}) + "\n"
    )
    plain, chat = [tokenize_pair(p, tokenizer, 64) for p in read_preference_jsonl(path)]
    sft = tokenize_row({"messages": [{"role": "user", "content": "ISO date:\nMay 3 1956"},
                                     {"role": "assistant", "content": "1956-05-03"}]}, tokenizer, 64)
    assert plain.chosen_ids == sft.input_ids and plain.prompt_len == len(sft.prompt_ids)
    assert tokenizer.decode(plain.rejected_ids[plain.prompt_len:]) == "1956-03-05</s>"
    assert tokenizer.decode(chat.chosen_ids) == "<s>Q: Hi\nA: Hello</s>Q: ISO date:\nMay 3 1956\nA: 1956-05-03</s>"
    assert chat.prompt_len == plain.prompt_len + len("Q: Hi\nA: Hello</s>") - len("</s>") + 1
    assert plain.task == "all" and chat.task == "date"
    batch = pair_batch([plain, chat], tokenizer.pad_token_id)
    answer_tokens = (batch["labels"] != -100).sum(dim=1).tolist()
    assert answer_tokens == [11, 11, 11, 11]  # 10 characters + EOS, for each of the four rows
    assert batch["input_ids"].shape[0] == 4 and batch["attention_mask"][0].sum() == len(plain.chosen_ids)


# ---------------------------------------------------------------------------------- demo pairs


def _prompt(row: dict) -> str:
    return row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")


def _correct_answer(task: str, source: str) -> str:
    from fedft.demo.tasks import MONTHS, UNITS

    if task == "date":
        month, day, year = source.split()
        return f"{int(year):04d}-{MONTHS.index(month) + 1:02d}-{int(day):02d}"
    if task == "units":
        value, big, _, small = source.split()
        zeros = next(z for b, s, z in UNITS if (b, s) == (big, small))
        return value + "0" * zeros
    if task == "json":
        _, name, _, age, _, city = source.split()
        return json.dumps({"name": name, "age": int(age), "city": city})
    return "_".join(source.lower().split())


FORMATS = {
    "date": re.compile(r"\d{4}-\d{2}-\d{2}"),
    "units": re.compile(r"[1-9]\d*"),
    "snake": re.compile(r"[a-z]+(_{1,2}[a-z]+)*"),
}


@pytest.mark.parametrize("name", ["prefs-train.jsonl", "prefs-eval.jsonl"])
def test_committed_demo_pairs_are_well_formed_near_misses(name):
    pairs = read_preference_jsonl(DEMO_DATA / name)
    flaws = [json.loads(line)["flaw"] for line in (DEMO_DATA / name).read_text().splitlines()]
    assert {p.task for p in pairs} == set(TASKS)
    for pair, flaw in zip(pairs, flaws, strict=True):
        instruction, source = pair.messages[-1]["content"].split("\n")
        assert pair.chosen == _correct_answer(pair.task, source), pair.source
        assert pair.rejected != pair.chosen, pair.source
        if pair.task == "json":
            chosen, rejected = json.loads(pair.chosen), json.loads(pair.rejected)
            assert list(rejected) == ["name", "age", "city"]
            assert sum(chosen[k] != rejected[k] for k in chosen) == 1, pair.source  # one wrong value
        else:
            assert FORMATS[pair.task].fullmatch(pair.rejected), (pair.source, pair.rejected)
        if flaw == "day_month_swap":
            y, m, d = pair.chosen.split("-")
            assert pair.rejected == f"{y}-{d}-{m}"
        if flaw.startswith("underscore"):
            assert pair.rejected.replace("_", "") == pair.chosen.replace("_", "")
        if flaw in ("zero_missing", "zero_extra"):
            assert pair.rejected.rstrip("0") == pair.chosen.rstrip("0")


def test_committed_demo_pairs_are_what_the_generator_writes_and_held_out_prompts_are_new():
    sft_rows, eval_rows = make_demo_rows(4, 400, 0.9, seed=0), make_eval_rows(100, seed=1)
    train, held_out = make_demo_preferences(sft_rows, eval_rows)
    for rows, name in ((train, "prefs-train.jsonl"), (held_out, "prefs-eval.jsonl")):
        assert "".join(json.dumps(r) + "\n" for r in rows) == (DEMO_DATA / name).read_text(), name
    # the SFT data is untouched by the pair generator (its RNG is separate)
    committed_eval = [json.loads(line) for line in (DEMO_DATA / "eval.jsonl").read_text().splitlines()]
    assert committed_eval == eval_rows
    train_prompts = {r["prompt"] for r in train}
    held_out_prompts = {r["prompt"] for r in held_out}
    assert len(held_out_prompts) == len(held_out) and len(train_prompts) == len(train)
    assert not held_out_prompts & (train_prompts | {_prompt(r) for r in sft_rows + eval_rows})
    assert not train_prompts & {_prompt(r) for r in eval_rows}


# ---------------------------------------------------------------------------------- training


def _dpo_config(tiny_config_path: Path, tmp_path: Path, *overrides: str):
    train, held_out = make_demo_preferences(make_demo_rows(2, 24, 0.9, seed=0), make_eval_rows(2, seed=1),
                                            train_per_task=4, eval_per_task=2)
    for rows, name in ((train, "p-train.jsonl"), (held_out, "p-eval.jsonl")):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_config(tiny_config_path, [
        "dpo.enabled=true", f"dpo.train_path={tmp_path / 'p-train.jsonl'}",
        f"dpo.eval_path={tmp_path / 'p-eval.jsonl'}", "dpo.steps=6", "dpo.batch_size=4",
        "dpo.learning_rate=0.01", "dpo.beta=0.5", "dpo.lr_schedule=constant", "dpo.log_every=3",
        "dpo.sft_weight=0", *overrides,
    ])


def _perturbed_adapter(model, seed: int = 1) -> dict[str, torch.Tensor]:
    """A non-trivial 'federated' adapter: the seeded init with random B (so policy != base)."""
    from fedft.model.adapter import get_adapter_state

    generator = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=generator) * 0.05 if "lora_B" in k else v)
            for k, v in get_adapter_state(model).items()}


def test_reference_is_the_frozen_start_adapter_while_the_policy_moves(tiny_config_path, tmp_path):
    from peft import get_peft_model_state_dict
    from trl.trainer.utils import use_adapter

    from fedft.model.adapter import get_adapter_state, set_adapter_state
    from fedft.model.load import load_peft_model, load_tokenizer, model_spec

    cfg = _dpo_config(tiny_config_path, tmp_path)
    spec = model_spec(cfg)
    model, tokenizer = load_peft_model(spec), load_tokenizer(spec)
    start = _perturbed_adapter(model)
    pairs = read_preference_jsonl(cfg.dpo.train_path)
    probe = pair_batch([tokenize_pair(p, tokenizer, 64) for p in pairs[:4]], tokenizer.pad_token_id)

    def logps() -> torch.Tensor:
        with torch.no_grad():
            return sequence_logps(model, probe)

    set_adapter_state(model, start)
    initial = logps()
    seen = []

    def on_step(step, row):
        reference_tensors = get_peft_model_state_dict(model, adapter_name=REFERENCE_ADAPTER)
        with use_adapter(model, REFERENCE_ADAPTER):
            reference = logps()
        seen.append((reference_tensors, reference, logps()))

    lines = []
    result = train_dpo(model, tokenizer, pairs, cfg.dpo, start, log=lines.append, on_step=on_step)
    assert len(seen) == cfg.dpo.steps == len(result.history)
    for reference_tensors, reference, _ in seen:
        assert reference_tensors.keys() == start.keys()
        assert all(torch.equal(reference_tensors[k], start[k]) for k in start)  # bit for bit
        # on the CPU the same 4-bit model + adapter scores slightly differently once adapters
        # were swapped (base parameters and buffers unchanged; cause not pinned down): these
        # sums of ~60 log-probs move by a few 1e-3; the policy moves far more
        torch.testing.assert_close(reference, initial, rtol=0, atol=2e-2)
    moved = (seen[-1][2] - initial).abs().max().item()
    assert moved > 0.5, moved  # the policy's log-probabilities did change
    # the policy starts equal to the reference (no bfloat16 rounding): zero margin, loss log 2
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    # the DPO loss over all training pairs fell
    everything = [tokenize_pair(p, tokenizer, 64) for p in pairs]
    policy_after = pair_logps(model, everything, tokenizer.pad_token_id)
    set_adapter_state(model, start)
    reference = pair_logps(model, everything, tokenizer.pad_token_id)
    loss_before = dpo_loss(*reference, *reference, beta=cfg.dpo.beta)[0].item()
    loss_after = dpo_loss(*policy_after, *reference, beta=cfg.dpo.beta)[0].item()
    assert loss_before == pytest.approx(math.log(2)) and loss_after < loss_before - 0.01, loss_after
    set_adapter_state(model, result.state)
    # afterwards: only the trained adapter is left, active, float32, holding the result
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    now = get_adapter_state(model)
    assert all(torch.equal(now[k], result.state[k]) for k in now)
    assert any(not torch.equal(result.state[k], start[k]) for k in start)
    assert any(line.startswith("dpo step 3/6") for line in lines)


def test_preference_metrics_base_is_chance_and_stage_writes_adapter_history_summary(tiny_config_path, tmp_path):
    from fedft.model.load import cached_peft_model, initial_adapter_state, model_spec

    cfg = _dpo_config(tiny_config_path, tmp_path)
    model, tokenizer = cached_peft_model(model_spec(cfg))
    pairs = [tokenize_pair(p, tokenizer, cfg.dpo.max_length) for p in read_preference_jsonl(cfg.dpo.eval_path)]
    from fedft.model.adapter import set_adapter_state

    set_adapter_state(model, initial_adapter_state(model_spec(cfg)))  # LoRA B = 0: the policy is the base
    base = preference_metrics(model, pairs, tokenizer.pad_token_id)
    assert base["pref_accuracy"] == 0.5 and base["reward_margin"] == 0.0 and base["pairs"] == 8

    start = _perturbed_adapter(model)
    summary = run_dpo_stage(cfg, start, tmp_path / "run", log=lambda line: None)
    from fedft.model.adapter import get_adapter_state

    held = get_adapter_state(model)
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    dpo_dir = tmp_path / "run" / "dpo"
    assert (dpo_dir / "adapter" / "adapter_config.json").is_file()
    assert (dpo_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not (dpo_dir / "adapter" / REFERENCE_ADAPTER).exists()  # only the trained adapter is saved
    history = [json.loads(line) for line in (dpo_dir / "history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == list(range(1, 7))
    assert summary["steps"] == 6 and summary["final_train_loss"] == history[-1]["loss"]
    assert json.loads((dpo_dir / "summary.json").read_text()) == summary
    set_adapter_state(model, start)
    reference = scored_logps(model, pairs, tokenizer.pad_token_id)  # DPO's reference: the start adapter
    assert summary["pref_accuracy_before"] == 0.5 and summary["reward_margin_before"] == 0.0
    before = preference_metrics(model, pairs, tokenizer.pad_token_id, beta=cfg.dpo.beta, reference=reference)
    assert summary["likelihood_accuracy_before"] == pytest.approx(before["likelihood_accuracy"])
    # the saved adapter is the DPO adapter the cached model holds now
    from safetensors.torch import load_file

    saved = load_file(dpo_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(saved[k].float(), held[k]) for k in held)
    set_adapter_state(model, {k: v.float() for k, v in saved.items()})
    after = preference_metrics(model, pairs, tokenizer.pad_token_id, beta=cfg.dpo.beta, reference=reference)
    assert summary["pref_accuracy_after"] == pytest.approx(after["pref_accuracy"])
    assert summary["reward_margin_after"] == pytest.approx(after["reward_margin"], abs=0.02)
    assert any(not torch.equal(held[k], start[k]) for k in start)


# ---------------------------------------------------------------------------------- config


def test_dpo_section_validates_and_resolves_paths(tiny_config_path):
    cfg = load_config(tiny_config_path)
    assert cfg.dpo.enabled is False
    with pytest.raises(ConfigError, match=r"dpo.train_path = '' is not allowed; expected a preference JSONL"):
        load_config(tiny_config_path, ["dpo.enabled=true"])
    with pytest.raises(ConfigError, match=r"dpo.beta = 0.0 is not allowed; expected a number > 0"):
        load_config(tiny_config_path, ["dpo.beta=0"])
    with pytest.raises(ConfigError, match="unknown field dpo.betta"):
        load_config(tiny_config_path, ["dpo.betta=0.1"])
    text = tiny_config_path.read_text() + (
        '\n[dpo]\nenabled = true\ntrain_path = "p.jsonl"\neval_path = "e.jsonl"\nsteps = 0\n')
    path = tiny_config_path.parent / "with-dpo.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}:\d+: dpo.steps = 0 is not allowed"):
        load_config(path)
    cfg = load_config(path, ["dpo.steps=3"])
    assert cfg.dpo.train_path == str(tiny_config_path.parent / "p.jsonl")
    assert dataclasses.asdict(cfg)["dpo"]["steps"] == 3


def test_sft_weight_adds_the_chosen_answers_nll_to_the_training_loss(tiny_config_path, tmp_path):
    from fedft.model.load import load_peft_model, load_tokenizer, model_spec

    cfg = _dpo_config(tiny_config_path, tmp_path, "dpo.steps=1", "dpo.sft_weight=1.0")
    spec = model_spec(cfg)
    model, tokenizer = load_peft_model(spec), load_tokenizer(spec)
    result = train_dpo(model, tokenizer, read_preference_jsonl(cfg.dpo.train_path), cfg.dpo,
                       _perturbed_adapter(model), log=lambda line: None)
    # step 1: the DPO term is log 2 (policy == reference) plus the random tiny model's
    # per-token NLL of the chosen answers, about log(vocabulary of ~100 characters) = 4.6
    assert result.history[0]["loss"] > math.log(2) + 3.0
