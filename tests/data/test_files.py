"""Data files in every accepted format: the same rows, data.columns, errors that name the file and the row,
and runs that train alike from JSONL, Parquet and CSV."""

from __future__ import annotations

import json

import pytest

from fedft.data.files import DataError
from fedft.data.rows import load_row_files, read_rows

ROWS = [
    {"instruction": "ISO date:", "input": "Jul 2 2047", "output": "2047-07-02", "task": "date", "institution": "a"},
    {"instruction": "As JSON:", "input": "name Ada, age 3", "output": '{"name": "Ada", "age": 3}', "task": "json",
     "institution": "b"},
    {"instruction": "Say NA.", "input": "", "output": "NA", "task": "echo", "institution": "a"},
]
RENAMED = {"instruction": "question", "input": "context", "output": "answer"}
MAPPING = RENAMED  # data.columns for files with RENAMED's columns


def _renamed(rows: list[dict]) -> list[dict]:
    return [{RENAMED.get(k, k): v for k, v in row.items()} for row in rows]


def write(path, rows: list[dict]):
    """``rows`` in the format ``path``'s suffix names; a path without one becomes a saved dataset folder."""
    import pandas as pd

    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path, index=False)
    else:
        from datasets import Dataset

        Dataset.from_list(rows).save_to_disk(str(path))
    return path


def _without_source(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "source"} for row in rows]


@pytest.mark.parametrize("name", ["d.json", "d.csv", "d.parquet", "saved"])
def test_every_format_gives_the_rows_jsonl_gives(tmp_path, name):
    expected = read_rows(write(tmp_path / "d.jsonl", ROWS))
    rows = read_rows(write(tmp_path / name, ROWS))
    assert _without_source(rows) == _without_source(expected)
    assert rows[2]["messages"] == [{"role": "user", "content": "Say NA."}, {"role": "assistant", "content": "NA"}]


def test_each_format_names_a_row_by_its_place(tmp_path):
    assert [r["source"] for r in read_rows(write(tmp_path / "d.jsonl", ROWS))] == [
        f"{tmp_path / 'd.jsonl'}:{n}" for n in (1, 2, 3)]
    for name in ("d.json", "d.parquet", "saved"):
        path = write(tmp_path / name, ROWS)
        assert [r["source"] for r in read_rows(path)] == [f"{path} row {n}" for n in (1, 2, 3)]
    # CSV: file:line, the header being line 1; a quoted cell over two lines moves the next row down
    csv = tmp_path / "d.csv"
    csv.write_text('instruction,output\n"Two\nlines",x\n\nOne line,y\n')
    rows = read_rows(csv)
    assert [r["source"] for r in rows] == [f"{csv}:2", f"{csv}:5"]
    assert rows[0]["messages"][0]["content"] == "Two\nlines"


def test_json_lines_in_a_json_file_keep_their_line_numbers(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert [r["source"] for r in read_rows(path)] == [f"{path}:{n}" for n in (1, 2, 3)]


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.parquet", "saved"])
def test_data_columns_name_the_files_own_columns(tmp_path, name):
    rows = read_rows(write(tmp_path / name, _renamed(ROWS)), MAPPING)
    assert _without_source(rows) == _without_source(read_rows(write(tmp_path / "plain.jsonl", ROWS)))
    assert "question" not in rows[0] and rows[0]["task"] == "date"


def test_a_mapped_messages_column_is_read_from_parquet(tmp_path):
    chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    path = write(tmp_path / "chat.parquet", [{"conversation": chat, "task": "greet"}])
    rows = read_rows(path, {"messages": "conversation"})
    assert rows == [{"messages": chat, "source": f"{path} row 1", "task": "greet"}]


def test_a_mapping_leaves_files_that_use_the_field_names_readable(tmp_path):
    # one data.columns serves every file: a held-out JSONL in fedft's names beside a renamed CSV
    rows = read_rows(write(tmp_path / "eval.jsonl", ROWS), MAPPING)
    assert _without_source(rows) == _without_source(read_rows(tmp_path / "eval.jsonl"))


def test_a_missing_column_names_the_file_the_row_the_columns_found_and_data_columns(tmp_path):
    path = write(tmp_path / "d.csv", _renamed(ROWS))
    with pytest.raises(DataError) as err:
        read_rows(path)
    assert str(err.value) == (
        f"{path}:2: expected keys 'instruction' and 'output' (optionally 'input') or 'messages'; no columns "
        "'instruction' and 'output'; found 'question', 'context', 'answer', 'task', 'institution'; if your columns "
        'are named otherwise, name them with data.columns, e.g. data.columns = {instruction = "question", '
        'output = "answer"}')
    with pytest.raises(DataError, match=rf"^{path}:2: .*no column 'query' \(data.columns.instruction\); "
                                        r"found 'question', .*; fix data.columns$"):
        read_rows(path, {**MAPPING, "instruction": "query"})


def test_a_misspelled_optional_column_is_an_error_not_a_silent_loss(tmp_path):
    path = write(tmp_path / "d.parquet", _renamed(ROWS))
    with pytest.raises(DataError, match=rf"^{path}: no column 'contxt' \(data.columns.input\); the file has "
                                        r"columns 'answer', 'context', .*; fix data.columns$"):
        read_rows(path, {**MAPPING, "input": "contxt"})


@pytest.mark.parametrize("name, rows, columns, fragment", [
    ("d.parquet", [{"instruction": "6*7?", "output": 42}], {}, "row 1: 'output' must be a string, got 42"),
    ("d.parquet", _renamed([*ROWS[:1], {**ROWS[0], "output": None}]), MAPPING,
     "row 2: 'answer' (data.columns.output) must be a string, got None"),
    ("saved", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
               {"messages": []}], {}, "row 2: 'messages' must be a non-empty list of messages, got []"),
    ("d.json", [ROWS[0], {"conversation": [{"role": "bot", "content": "x"}]}], {"messages": "conversation"},
     "row 2: conversation[0] must be {'role': one of"),
    ("d.json", [ROWS[0], [1, 2]], {}, "row 2: expected a JSON object, got list"),
    ("d.parquet", [{**ROWS[0], "tags": ["a"]}, {**ROWS[0], "tags": ["b"]}], {},
     "row 1: extra column 'tags' must be a scalar"),
])
def test_a_bad_row_is_named_by_file_and_row_in_every_format(tmp_path, name, rows, columns, fragment):
    path = write(tmp_path / name, rows)
    with pytest.raises(DataError) as err:
        read_rows(path, columns)
    assert str(err.value).startswith(f"{path} {fragment}")


def test_a_bad_csv_row_is_named_by_its_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\nq,a\n\n,\n")
    rows = load_row_files([str(path)])  # an empty answer is the tokenizer's to refuse or skip
    assert rows[1]["source"] == f"{path}:4" and rows[1]["messages"][1]["content"] == ""
    path.write_bytes(b"instruction,output\nq,a\ncaf\xe9,b\n")
    with pytest.raises(DataError, match=f"^{path}:3:4: byte 0xe9 is not valid UTF-8"):
        read_rows(path)
    path.write_text('messages,task\n"[{""role"": ""user"", ""content"": ""hi""}]",greet\n')
    with pytest.raises(DataError, match=f"^{path}:2: 'messages' must be a non-empty list of messages, got '.*'; "
                                        "a CSV file cannot hold chat rows"):
        read_rows(path)


def test_csv_cells_are_text_exactly_as_written(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeffinstruction,output,institution\nWhat is 6*7?,042,7\nNone?,None,\n".encode())
    rows = read_rows(path)  # a byte-order mark, numbers, 'None' and empty cells stay text
    assert [r["messages"][1]["content"] for r in rows] == ["042", "None"]
    assert [r["institution"] for r in rows] == ["7", ""]


@pytest.mark.parametrize("name, content, fragment", [
    ("d.txt", "{}", "unknown format '.txt'; expected .jsonl, .json, .csv, .parquet"),
    ("d.json", '[{"instruction": "a",\n "output": }]', ":2: not valid JSON (Expecting value at column 12)"),
    ("d.json", '{\n "data": []\n}', "one JSON object (keys 'data') over several lines; expected a list of objects"),
    ("d.csv", "", "is empty; a CSV file starts with a header row"),
    ("d.csv", "instruction,output\n", "has no rows"),
    ("d.parquet", "not parquet", "not a readable Parquet file"),
])
def test_a_file_that_cannot_be_read_names_the_file_and_what_is_wrong(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=r"\S") as err:
        read_rows(path)
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_a_folder_must_be_one_saved_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    with pytest.raises(DataError, match="is a folder but not a dataset saved by datasets' save_to_disk"):
        read_rows(tmp_path)
    splits = DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS)})
    splits.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"holds several splits \(train, test\).*e\.g\. .*/dict/train$"):
        read_rows(tmp_path / "dict")
    assert len(read_rows(tmp_path / "dict" / "train")) == 3
    with pytest.raises(DataError, match=r"data file .*/nothing\.csv does not exist"):
        read_rows(tmp_path / "nothing.csv")


def test_reading_writes_no_copy_of_the_data_into_the_datasets_cache(tmp_path, monkeypatch):
    import datasets.config

    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    for name in ("d.csv", "d.parquet", "d.json", "saved"):
        load_row_files([str(write(tmp_path / name, ROWS))])
    assert not cache.exists() or not any(cache.rglob("*.arrow"))


def _metrics_without_times(run_dir) -> list[dict]:
    from fedft.rundir import load_metrics

    return [{k: v for k, v in row.items() if k != "seconds"} for row in load_metrics(run_dir)]


@pytest.mark.slow
def test_parquet_and_a_csv_with_other_column_names_train_like_the_jsonl(tmp_path, tiny_model_dir):
    import pandas as pd

    from fedft.config import load_config
    from simulations.runner import simulate
    from tests.conftest import write_tiny_setup

    config = write_tiny_setup(tmp_path, tiny_model_dir)
    train = pd.read_json(tmp_path / "train.jsonl", lines=True, dtype=False)
    train.rename(columns={"instruction": "prompt", "output": "response"}).to_parquet(tmp_path / "train.parquet")
    train.rename(columns=RENAMED).to_csv(tmp_path / "train.csv", index=False)
    held_out = pd.read_json(tmp_path / "eval.jsonl", lines=True, dtype=False)
    held_out.rename(columns=RENAMED).to_csv(tmp_path / "eval.csv", index=False)
    base = ["strategy.name=local", "strategy.num_rounds=1", "train.local_steps=2"]
    runs = {
        "jsonl": [],
        "parquet": [f"data.train_files={tmp_path / 'train.parquet'}", "data.columns.instruction=prompt",
                    "data.columns.output=response"],  # the held-out file stays JSONL, in fedft's names
        "csv": [f"data.train_files={tmp_path / 'train.csv'}", f"data.eval_file={tmp_path / 'eval.csv'}",
                'data.columns={instruction = "question", input = "context", output = "answer"}'],
    }
    metrics = {}
    for name, overrides in runs.items():
        simulate(load_config(config, base + overrides), tmp_path / name)
        metrics[name] = _metrics_without_times(tmp_path / name)
    assert [row["round"] for row in metrics["jsonl"]] == [0, 1]
    assert {"train_loss", "eval_loss", "eval_exact_match"} <= metrics["jsonl"][1].keys()
    assert metrics["parquet"] == metrics["jsonl"]
    assert metrics["csv"] == metrics["jsonl"]
