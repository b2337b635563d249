"""The demo's institutions and their tasks: dates, units, JSON records, snake_case names.

``make_demo_rows`` writes each institution's training rows (mostly its own task, a share of
the others), ``make_eval_rows`` the held-out rows per task. Deterministic from a seed; no
network. Only the command line imports the demo package.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
FIRST_NAMES = [
    "Ada", "Alan", "Alice", "Amir", "Ana", "Ben", "Chen", "Clara", "Dev", "Eva", "Farah",
    "Gus", "Hana", "Ivan", "Jana", "Jon", "Kai", "Lea", "Liam", "Mia", "Nia", "Omar",
    "Pia", "Raj", "Rosa", "Sam", "Sara", "Tom", "Uma", "Vik", "Yara", "Zoe",
]
CITIES = [
    "Paris", "Lyon", "Oslo", "Rome", "Lima", "Kyiv", "Pune", "Cairo", "Quito", "Riga",
    "Bern", "Nice", "Turin", "Porto", "Delhi", "Seoul", "Accra", "Hanoi", "Perth", "Tunis",
]
WORDS = [
    "account", "patient", "record", "order", "claim", "loan", "visit", "rate", "total",
    "status", "owner", "branch", "ledger", "dose", "ward", "limit", "score", "date", "code",
    "batch", "item", "price", "unit", "note", "case", "file", "risk", "fee", "plan", "term",
]
UNITS = [("km", "m", 3), ("m", "cm", 2), ("kg", "g", 3), ("cm", "mm", 1), ("l", "ml", 3)]

# Each task: an instruction, a generator of (input, output), the checkable answer.
TASK_INSTRUCTIONS = {
    "date": "ISO date:",
    "units": "Convert:",
    "json": "As JSON:",
    "snake": "snake_case:",
}


def _date(rng: random.Random) -> tuple[int, int, int]:
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    return year, month, rng.randint(1, 28)


def _task_date(rng: random.Random) -> tuple[str, str]:
    year, month, day = _date(rng)
    return f"{MONTHS[month - 1]} {day} {year}", f"{year:04d}-{month:02d}-{day:02d}"


def _task_units(rng: random.Random) -> tuple[str, str]:
    big, small, zeros = rng.choice(UNITS)
    value = rng.randint(1, 999)
    return f"{value} {big} in {small}", f"{value}{'0' * zeros}"


def _task_json(rng: random.Random) -> tuple[str, str]:
    name, age, city = rng.choice(FIRST_NAMES), rng.randint(18, 99), rng.choice(CITIES)
    return f"name {name} age {age} city {city}", json.dumps(
        {"name": name, "age": age, "city": city}
    )


def _task_snake(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 3))
    return " ".join(w.capitalize() for w in words), "_".join(words)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "date": _task_date,
    "units": _task_units,
    "json": _task_json,
    "snake": _task_snake,
}


def make_demo_rows(
    num_institutions: int,
    rows_per_institution: int,
    own_task_share: float,
    seed: int,
) -> list[dict]:
    """Rows of ``{"instruction","input","output","task","institution"}``, non-IID by design.

    Institution ``i`` draws its own task (``TASKS`` in order, cycling) with probability
    ``own_task_share`` and any other task otherwise, so each mostly sees one task.
    """
    rng = random.Random(seed)
    names = list(TASKS)
    rows = []
    for inst in range(num_institutions):
        own = names[inst % len(names)]
        for _ in range(rows_per_institution):
            task = own if rng.random() < own_task_share else rng.choice(names)
            source, answer = TASKS[task](rng)
            rows.append(
                {
                    "instruction": TASK_INSTRUCTIONS[task],
                    "input": source,
                    "output": answer,
                    "task": task,
                    "institution": f"inst{inst}",
                }
            )
    return rows


def make_eval_rows(rows_per_task: int, seed: int) -> list[dict]:
    """A balanced held-out set over every task (the pooled evaluation set)."""
    rng = random.Random(seed)
    rows = []
    for task, make in TASKS.items():
        for _ in range(rows_per_task):
            source, answer = make(rng)
            rows.append(
                {"instruction": TASK_INSTRUCTIONS[task], "input": source, "output": answer,
                 "task": task}
            )
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    """Write rows as JSON lines (one object per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
