"""Institution data: rows from data files with place-exact errors, prompt formatting, completion-only labels.

``fedft.data.files`` reads the file formats (JSONL, JSON, CSV, Parquet, a saved dataset);
here each record becomes a row. Two row formats are accepted:
``{"instruction": ..., "input": ... (optional), "output": ...}`` and
``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` whose last
message is the assistant's answer. ``data.columns`` names the files' own columns for these
fields (``{instruction = "question", output = "answer"}``). Any other scalar columns
(``task``, ``institution``, ...) are kept for partitioning and per-task scoring; ``source``
is the row's place (``file:line`` or ``file row N``). Prompts go through the tokenizer's chat
template when it has one; the loss sees only the answer's tokens (prompt tokens are labelled
-100). Nothing here trains or talks to a server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedft.config import ROW_FIELDS
from fedft.data.files import DataError, records

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
FALLBACK_PROMPT = "### Instruction:\n{content}\n\n### Response:\n"
COLUMNS_EXAMPLE = 'data.columns = {instruction = "question", output = "answer"}'


def _renamed(raw: dict, columns: Mapping[str, str]) -> dict:
    """The record under the row fields' names: each column ``columns`` names becomes its field (a
    column already called like that field is then left out); a record without it keeps its own."""
    found = {field: column for field, column in columns.items() if column in raw}
    row = {k: v for k, v in raw.items() if k not in found and k not in found.values()}
    row.update((field, raw[column]) for field, column in found.items())
    return row


def _name(field: str, columns: Mapping[str, str]) -> str:
    """A row field as an error names it: its column, and the data.columns entry that chose it."""
    column = columns.get(field, field)
    return repr(field) if column == field else f"{column!r} (data.columns.{field})"


def _missing_fields(raw: dict, row: dict, where: str, columns: Mapping[str, str]) -> DataError:
    missing = [_name(f, columns) for f in ("instruction", "output") if f not in row]
    found = ", ".join(map(repr, raw)) or "nothing"
    fix = ("fix data.columns" if columns else
           f"if your columns are named otherwise, name them with data.columns, e.g. {COLUMNS_EXAMPLE}")
    return DataError(f"{where}: expected keys 'instruction' and 'output' (optionally 'input') or 'messages'; "
                     f"no column{'s' if len(missing) > 1 else ''} {' and '.join(missing)}; found {found}; {fix}")


def _row_to_messages(row: dict, where: str, columns: Mapping[str, str]) -> list[dict] | None:
    """The row's conversation; None when it has neither format's fields."""
    if "messages" in row:
        messages, name = row["messages"], _name("messages", columns)
        if not isinstance(messages, list) or not messages:
            text = isinstance(messages, str)  # e.g. from a CSV cell, which holds only text
            hint = "; a CSV file cannot hold chat rows: use JSONL, JSON or Parquet" if text else ""
            raise DataError(f"{where}: {name} must be a non-empty list of messages, got {messages!r}{hint}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(
                m.get("content"), str
            ):
                raise DataError(f"{where}: {columns.get('messages', 'messages')}[{i}] must be "
                                f"{{'role': one of {ROLES}, 'content': str}}, got {m!r}")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer")
        if not any(m["role"] == "user" for m in messages):
            raise DataError(f"{where}: {name} has no user message")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in row and "output" in row:
        for key in ("instruction", "input", "output"):
            if key in row and not isinstance(row[key], str) and not (key == "input" and row[key] is None):
                raise DataError(f"{where}: {_name(key, columns)} must be a string, got {row[key]!r}")
        user = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    return None


def normalise_row(raw: Any, where: str, columns: Mapping[str, str] | None = None) -> dict:
    """One record as a row: ``messages`` + its other scalar columns + ``source`` (its place)."""
    columns = columns or {}
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    row = _renamed(raw, columns)
    messages = _row_to_messages(row, where, columns)
    if messages is None:
        raise _missing_fields(raw, row, where, columns)
    out = {"messages": messages, "source": where}
    for key, value in row.items():
        if key not in ROW_FIELDS:
            if not isinstance(value, (str, int, float, bool)) and value is not None:
                raise DataError(f"{where}: extra column {key!r} must be a scalar (text, a number, a boolean or "
                                f"empty), got {type(value).__name__}")
            out[key] = value
    return out


def _check_columns(path: str | Path, present: set[str], columns: Mapping[str, str]) -> None:
    """A column data.columns names that no row of the file has (while the file does not use the field's
    own name either) is a misspelling, even for the optional 'input'."""
    chat = "messages" in present or columns.get("messages") in present
    for field, column in columns.items():
        if column in present or field in present or (field == "messages") != chat:
            continue  # found, not needed, or a field of the other row format
        raise DataError(f"{path}: no column {column!r} (data.columns.{field}); the file has columns "
                        f"{', '.join(map(repr, sorted(present)))}; fix data.columns")


def _rows(path: str | Path, found: Iterable[tuple[str, Any]], columns: Mapping[str, str]) -> list[dict]:
    rows, present = [], set()
    for where, raw in found:
        rows.append(normalise_row(raw, where, columns))
        present.update(raw)
    if not rows:
        raise DataError(f"data file {path} has no rows")
    _check_columns(path, present, columns)
    return rows


def read_rows(path: str | Path, columns: Mapping[str, str] | None = None) -> list[dict]:
    """Read and normalise one data file in any accepted format (``fedft.data.files``), its columns
    named by ``columns`` (``data.columns``); a bad record raises ``DataError`` naming its place."""
    return _rows(path, records(path), columns or {})


def load_row_files(paths: list[str] | tuple[str, ...], columns: Mapping[str, str] | None = None) -> list[dict]:
    """Read one or more data files into one list of rows, every row holding every column seen
    (``None`` where its file had none; metadata columns kept). Plain lists: no Arrow table is
    built and ``datasets`` is not imported, which a client's or the command's start-up would pay."""
    rows = [row for path in paths for row in read_rows(path, columns)]
    names = set().union(*(row.keys() for row in rows))
    for row in rows:
        for name in names:
            row.setdefault(name, None)
    return rows


def prompt_and_completion(messages: list[dict], tokenizer) -> tuple[str, str]:
    """Split a conversation into the prompt text and the final answer text (with EOS)."""
    answer = messages[-1]["content"]
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            messages[:-1], tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt):
            completion = full[len(prompt):]
            eos = tokenizer.eos_token or ""
            if eos and eos in completion:  # drop the template's whitespace after EOS
                completion = completion[: completion.rindex(eos) + len(eos)]
            return prompt, completion
        return prompt, answer + (tokenizer.eos_token or "")
    context = "\n\n".join(m["content"] for m in messages[:-1])
    return FALLBACK_PROMPT.format(content=context), answer + (tokenizer.eos_token or "")


@dataclass(frozen=True)
class Example:
    """One tokenized example: the training sequence, its labels, and what exact match needs."""

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]
    reference: str
    task: str
    source: str


class LongPrompt(DataError):
    """A prompt of ``data.max_length`` tokens or more (refused unless ``data.long_prompts = 'truncate'``)."""


class EmptyAnswer(DataError):
    """A row whose answer is blank (refused unless ``data.empty_answers = 'skip'``)."""


def tokenize_row(row: dict, tokenizer, max_length: int, task_column: str = "task",
                 long_prompts: str = "refuse") -> Example:
    """Tokenize one normalised row; prompt tokens get label -100, the answer keeps its ids.

    A blank answer raises ``EmptyAnswer``; a prompt of ``max_length`` tokens or more raises
    ``LongPrompt``, or with ``long_prompts = "truncate"`` keeps its last ``max_length // 2`` tokens.
    """
    source = row.get("source", "row")
    if not row["messages"][-1]["content"].strip():
        raise EmptyAnswer(f"{source}: the answer is empty")
    prompt, completion = prompt_and_completion(row["messages"], tokenizer)
    uses_template = bool(getattr(tokenizer, "chat_template", None))
    prompt_ids = tokenizer(prompt, add_special_tokens=not uses_template)["input_ids"]
    answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and (not answer_ids or answer_ids[-1] != tokenizer.eos_token_id):
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    if len(prompt_ids) >= max_length:
        if long_prompts != "truncate":
            raise LongPrompt(f"{source}: the prompt is {len(prompt_ids)} tokens, not shorter than "
                             f"data.max_length = {max_length}")
        prompt_ids = prompt_ids[-(max_length // 2):]
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    task = row.get(task_column)
    return Example(
        input_ids=input_ids, labels=labels, prompt_ids=prompt_ids,
        reference=row["messages"][-1]["content"], task="all" if task is None else str(task),
        source=str(row.get("source", "")),
    )


@dataclass
class TokenizeReport:
    """What tokenizing a data set left out or cut (each entry a row's file:line)."""

    truncated: list[str]
    skipped: list[str]

    def line(self) -> str:
        parts = []
        if self.truncated:
            parts.append(f"{len(self.truncated)} long prompts truncated (data.long_prompts = 'truncate')")
        if self.skipped:
            parts.append(f"{len(self.skipped)} rows with an empty answer skipped (data.empty_answers = 'skip')")
        return "; ".join(parts)


def _places(errors: list[DataError], limit: int = 5) -> str:
    shown = ", ".join(str(e) for e in errors[:limit])
    return shown + (f", and {len(errors) - limit} more" if len(errors) > limit else "")


def tokenize_dataset(dataset, tokenizer, data, report: TokenizeReport | None = None) -> list[Example]:
    """Tokenize every row of a list of rows (or a ``datasets.Dataset``) once, as ``data`` (a
    ``DataConfig``) says: its max_length, task column, long prompts and empty answers.

    Refused rows are all named in one ``DataError`` (the first few places and the count);
    ``report`` receives the places of truncated and skipped rows.
    """
    examples, long, empty = [], [], []
    for row in dataset:
        try:
            examples.append(tokenize_row(row, tokenizer, data.max_length, data.task_column, "refuse"))
        except LongPrompt as err:
            long.append(err)
            if data.long_prompts == "truncate":
                examples.append(tokenize_row(row, tokenizer, data.max_length, data.task_column, "truncate"))
        except EmptyAnswer as err:
            empty.append(err)
    if long and data.long_prompts == "refuse":
        raise DataError(f"{len(long)} prompts are not shorter than data.max_length = {data.max_length} tokens: "
                        f"{_places(long)}; raise data.max_length, shorten them, or set data.long_prompts = "
                        "'truncate'")
    if empty and data.empty_answers == "refuse":
        raise DataError(f"{len(empty)} rows have an empty answer: {_places(empty)}; fix them or set "
                        "data.empty_answers = 'skip'")
    if report is not None:
        report.truncated.extend(str(e).split(": ", 1)[0] for e in long)
        report.skipped.extend(str(e).split(": ", 1)[0] for e in empty)
    return examples


def collate(examples: list[Example], pad_id: int):
    """Right-pad a batch into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
