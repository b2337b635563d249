"""Data files in the formats institutions keep, read into (place, record) pairs.

Accepted: ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects, or one object per
line), ``.csv`` (a header row, then one row per record; every cell is read as text, exactly as
written), ``.parquet``, and a folder written by ``datasets``' ``save_to_disk`` (recognised by its
``state.json`` / ``dataset_info.json``). Each record comes with its place, for error messages and
reports: ``file:line`` for JSONL, JSON lines and CSV (the header is line 1), ``file row N`` for a
JSON list, Parquet and a saved dataset. Files are read in memory (pandas, pyarrow,
``datasets.load_from_disk``), never through ``datasets``' file builders, which would write a copy
of an institution's rows into the Hugging Face cache. What a record's columns mean is
``fedft.data.rows``' business: nothing here knows row fields, and nothing here trains.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FORMATS = ".jsonl, .json, .csv, .parquet, or a folder written by datasets' save_to_disk"
UTF8_HINT = "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
BOM = "\ufeff"


class DataError(ValueError):
    """A data file or row cannot be used; the message names the file and the row."""


def json_lines(path: str | Path, kind: str = "data file") -> Iterator[tuple[str, Any]]:
    """``(file:line, parsed value)`` for each non-blank line; a missing file or bad JSON raises
    ``DataError`` naming the place. ``kind`` names the file in messages."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{kind} {path} does not exist")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}:{err.start + 1}: byte 0x{raw[err.start]:02x} is not valid UTF-8; "
                                f"{UTF8_HINT}") from None
            if number == 1:
                line = line.removeprefix(BOM)
            if not line.strip():
                continue
            try:
                yield where, json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from err


def records(path: str | Path, kind: str = "data file") -> Iterator[tuple[str, Any]]:
    """``(place, record)`` for each row of a data file in any accepted format (see the module)."""
    path = Path(path)
    if path.is_dir():
        yield from _saved_dataset(path, kind)
        return
    if not path.is_file():
        raise DataError(f"{kind} {path} does not exist")
    readers = {".jsonl": json_lines, ".json": _json, ".csv": _csv, ".parquet": _parquet}
    suffix = path.suffix.lower()
    if suffix not in readers:
        raise DataError(f"{kind} {path}: unknown format {suffix or '(no suffix)'!r}; expected {FORMATS} "
                        "(a file of JSON lines should end in .jsonl)")
    yield from readers[suffix](path, kind)


def _text(path: Path) -> str:
    """The whole file as text; a byte that is not UTF-8 is named by file:line:column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}:{err.start - line_start + 1}: byte 0x{data[err.start]:02x} is not valid "
                        f"UTF-8; {UTF8_HINT}") from None


def _json(path: Path, kind: str) -> Iterator[tuple[str, Any]]:
    """A JSON list of records (``file row N``), or JSON lines in a .json file (``file:line``)."""
    text = _text(path)
    if not text.lstrip().startswith("["):
        try:  # JSON lines fail here at once ("Extra data" after the first line's object)
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict) and text.strip().count("\n"):
            raise DataError(f"{path}: one JSON object (keys {', '.join(map(repr, whole))}) over several lines; "
                            "expected a list of objects ([{...}, {...}]) or one object per line")
        yield from json_lines(path, kind)
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from err
    for number, item in enumerate(items, start=1):
        yield f"{path} row {number}", item


def _csv_record_lines(text: str) -> list[int]:
    """The line each non-blank CSV record starts on (the header first); a quoted cell may span lines."""
    starts, reader, line = [], csv.reader(io.StringIO(text, newline="")), 0
    for record in reader:
        if record:
            starts.append(line + 1)
        line = reader.line_num
    return starts


def _csv(path: Path, kind: str) -> Iterator[tuple[str, Any]]:
    import pandas as pd

    text = _text(path)
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{kind} {path} is empty; a CSV file starts with a header row naming its columns") from None
    except (pd.errors.ParserError, csv.Error) as err:
        raise DataError(f"{path}: not a valid CSV file ({err})") from err
    try:
        lines = _csv_record_lines(text)[1:]
    except csv.Error:
        lines = []
    exact = len(lines) == len(frame)  # else the rows are named by number
    for number, record in enumerate(frame.to_dict(orient="records"), start=1):
        yield (f"{path}:{lines[number - 1]}" if exact else f"{path} row {number}"), record


def _parquet(path: Path, kind: str) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{kind} {path}: not a readable Parquet file ({err})") from err
    for number, record in enumerate(table.to_pylist(), start=1):
        yield f"{path} row {number}", record


def _saved_dataset(path: Path, kind: str) -> Iterator[tuple[str, Any]]:
    """The rows of a ``Dataset.save_to_disk`` folder; a saved ``DatasetDict`` is refused, naming its splits."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{kind} {path} holds several splits ({', '.join(splits)}), saved by DatasetDict.save_to_disk; "
                        f"name one split's folder, e.g. {path / (splits[0] if splits else 'train')}")
    if not any((path / name).is_file() for name in ("state.json", "dataset_info.json")):
        raise DataError(f"{kind} {path} is a folder but not a dataset saved by datasets' save_to_disk (it has no "
                        f"state.json); expected {FORMATS}")
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(f"{kind} {path}: cannot load the saved dataset ({err})") from err
    for number, record in enumerate(dataset.to_list(), start=1):
        yield f"{path} row {number}", record
