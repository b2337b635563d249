"""JSONL loading errors, prompt formatting and completion-only labels."""

from __future__ import annotations

import json

import pytest

from fedft.data.rows import IGNORE_INDEX, DataError, collate, load_row_files, read_rows, tokenize_row
from fedft.demo.base import build_char_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_both_row_formats_load_with_metadata(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"instruction": "Say hi.", "input": "", "output": "hi", "task": "greet"}) + "\n\n"
        + json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Say bye."},
                                   {"role": "assistant", "content": "bye"}]}) + "\n"
    )
    ds = load_row_files([str(path)])
    assert len(ds) == 2
    assert ds[0]["messages"][-1] == {"role": "assistant", "content": "hi"}
    assert ds[0]["task"] == "greet" and ds[1]["task"] is None
    assert ds[1]["source"] == f"{path}:3"


@pytest.mark.parametrize("line, fragment", [
    ('{"instruction": "x"', "not valid JSON (Expecting ',' delimiter at column 20)"),
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": "x", "completion": "y"}', "expected keys 'instruction' and 'output'"),
    ('{"instruction": "x", "output": 3}', "'output' must be a string"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "last message must be the assistant"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0] must be"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, fragment):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"})
    path.write_text(f"{good}\n{good}\n{line}\n")
    with pytest.raises(DataError) as err:
        read_rows(path)
    assert str(err.value).startswith(f"{path}:3:") and fragment in str(err.value)


def test_prompt_tokens_are_masked_and_answer_tokens_kept(tokenizer):
    row = {"messages": [{"role": "user", "content": "Write the date in ISO format.\nMar 5 2021"},
                        {"role": "assistant", "content": "2021-03-05"}], "task": "date"}
    ex = tokenize_row(row, tokenizer, max_length=128)
    prompt = tokenizer.decode(ex.prompt_ids)
    assert prompt.endswith("A: ") and "Mar 5 2021" in prompt
    n_prompt = len(ex.prompt_ids)
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    answer = ex.labels[n_prompt:]
    assert tokenizer.decode(answer) == "2021-03-05</s>"
    assert answer[-1] == tokenizer.eos_token_id
    assert ex.input_ids[n_prompt:] == answer and ex.task == "date"


def test_without_chat_template_the_fallback_prompt_is_used(tokenizer):
    plain = build_char_tokenizer()
    plain.chat_template = None
    row = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    ex = tokenize_row(row, plain, max_length=64)
    assert "### Response:" in plain.decode(ex.prompt_ids)
    assert [t for t in ex.labels if t != IGNORE_INDEX] == plain("A")["input_ids"] + [plain.eos_token_id]


def test_prompt_longer_than_max_length_is_an_error_naming_the_row(tokenizer):
    row = {"messages": [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y"}],
           "source": "f.jsonl:7"}
    with pytest.raises(DataError, match=r"f.jsonl:7: the prompt is \d+ tokens"):
        tokenize_row(row, tokenizer, max_length=20)


def test_long_prompts_and_empty_answers_are_refused_together_or_handled_as_configured(tokenizer):
    from fedft.config import DataConfig
    from fedft.data.rows import TokenizeReport, tokenize_dataset

    def row(prompt: str, answer: str, line: int) -> dict:
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                "source": f"f.jsonl:{line}"}

    rows = [row("ok", "fine", 1), row("x" * 50, "y", 2), row("z" * 60, "y", 3), row("ok", "  ", 4)]
    data = DataConfig(eval_file="e.jsonl", max_length=20)
    with pytest.raises(DataError, match=r"^2 prompts are not shorter than data.max_length = 20 tokens: f.jsonl:2: "
                                        r"the prompt is \d+ tokens.*f.jsonl:3: .*long_prompts = 'truncate'"):
        tokenize_dataset(rows, tokenizer, data)
    data = DataConfig(eval_file="e.jsonl", max_length=20, long_prompts="truncate")
    with pytest.raises(DataError, match=r"^1 rows have an empty answer: f.jsonl:4: the answer is empty"):
        tokenize_dataset(rows, tokenizer, data)
    report = TokenizeReport([], [])
    data = DataConfig(eval_file="e.jsonl", max_length=20, long_prompts="truncate", empty_answers="skip")
    examples = tokenize_dataset(rows, tokenizer, data, report)
    assert [e.source for e in examples] == ["f.jsonl:1", "f.jsonl:2", "f.jsonl:3"]
    assert all(len(e.prompt_ids) == 10 and len(e.input_ids) <= 20 for e in examples[1:])
    assert report.truncated == ["f.jsonl:2", "f.jsonl:3"] and report.skipped == ["f.jsonl:4"]


def test_a_byte_that_is_not_utf8_is_named_by_file_line_and_column(tmp_path):
    from fedft.data.rows import read_rows

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(DataError, match=f"{path}:2:21: byte 0xe9 is not valid UTF-8"):
        read_rows(path)


def test_collate_pads_right_and_masks_padding(tokenizer):
    rows = [{"messages": [{"role": "user", "content": c}, {"role": "assistant", "content": "ok"}]}
            for c in ("a", "abcdef")]
    batch = collate([tokenize_row(r, tokenizer, 64) for r in rows], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape
    short = batch["attention_mask"][0]
    assert short.sum() < short.numel() and (batch["labels"][0][short == 0] == IGNORE_INDEX).all()
