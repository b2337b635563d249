"""The demo's preference pairs for the DPO stage: the right answer against a near miss.

``make_demo_preferences`` draws prompts apart from the exact-match sets and pairs each
correct answer with a wrong one in the same format (a changed digit, a swapped field).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from fedft.demo.tasks import CITIES, FIRST_NAMES, MONTHS, TASK_INSTRUCTIONS, UNITS, WORDS, _date, write_jsonl

# --------------------------------------------------------------------------------------
# Preference pairs for the DPO stage: the right answer against a near miss in its format.
# --------------------------------------------------------------------------------------

def _other(rng: random.Random, choices: list, current):
    return rng.choice([c for c in choices if c != current])


def _pair_date(rng: random.Random) -> tuple[str, str, str, str]:
    year, month, day = _date(rng)
    near_month = month + rng.choice([-1, 1]) if 1 < month < 12 else (2 if month == 1 else 11)
    near_day = day + rng.choice([-1, 1]) if day > 1 else 2
    flaws = {
        "month_off_by_one": (year, near_month, day),
        "day_off_by_one": (year, month, near_day),
        "year_off_by_one": (year + rng.choice([-1, 1]), month, day),
    }
    if day <= 12 and day != month:
        flaws["day_month_swap"] = (year, day, month)
    flaw = rng.choice(sorted(flaws))
    y, m, d = flaws[flaw]
    return (f"{MONTHS[month - 1]} {day} {year}", f"{year:04d}-{month:02d}-{day:02d}",
            f"{y:04d}-{m:02d}-{d:02d}", flaw)


def _change_digit(rng: random.Random, number: int) -> int:
    """``number`` with one digit replaced (never a leading zero): a copying slip."""
    digits = list(str(number))
    i = rng.randrange(len(digits))
    digits[i] = rng.choice([d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0")])
    return int("".join(digits))


def _pair_units(rng: random.Random) -> tuple[str, str, str, str]:
    big, small, zeros = rng.choice(UNITS)
    value = rng.randint(1, 999)
    flaws = {
        "zero_missing": f"{value}{'0' * (zeros - 1)}",
        "zero_extra": f"{value}{'0' * (zeros + 1)}",
        "digit_changed": f"{_change_digit(rng, value)}{'0' * zeros}",
    }
    flaw = rng.choice(sorted(flaws))
    return f"{value} {big} in {small}", f"{value}{'0' * zeros}", flaws[flaw], flaw


def _pair_json(rng: random.Random) -> tuple[str, str, str, str]:
    name, age, city = rng.choice(FIRST_NAMES), rng.randint(18, 99), rng.choice(CITIES)
    record = {"name": name, "age": age, "city": city}
    wrong_age = _change_digit(rng, age)
    flaws = {
        "wrong_name": {**record, "name": _other(rng, FIRST_NAMES, name)},
        "age_digit_changed": {**record, "age": wrong_age},
        "wrong_city": {**record, "city": _other(rng, CITIES, city)},
    }
    flaw = rng.choice(sorted(flaws))
    return f"name {name} age {age} city {city}", json.dumps(record), json.dumps(flaws[flaw]), flaw


def _pair_snake(rng: random.Random) -> tuple[str, str, str, str]:
    words = rng.sample(WORDS, rng.randint(2, 3))
    gap = rng.randrange(len(words) - 1)  # the word boundary an underscore slip hits
    slot = rng.randrange(len(words))  # the word a word slip hits
    flaws = {
        "underscore_missing": "_".join(words[:gap + 1]) + "_".join([""] + words[gap + 1:])[1:],
        "underscore_doubled": "_".join(words[:gap + 1]) + "__" + "_".join(words[gap + 1:]),
        "word_repeated": "_".join(words[:slot] + [words[slot - 1 if slot else 1]] + words[slot + 1:]),
        "word_replaced": "_".join(words[:slot] + [_other(rng, WORDS, words[slot])] + words[slot + 1:]),
    }
    flaw = rng.choice(sorted(flaws))
    return " ".join(w.capitalize() for w in words), "_".join(words), flaws[flaw], flaw


PAIR_TASKS: dict[str, Callable[[random.Random], tuple[str, str, str, str]]] = {
    "date": _pair_date,
    "units": _pair_units,
    "json": _pair_json,
    "snake": _pair_snake,
}


def preference_prompt(task: str, source: str) -> str:
    """The user message of a demo task, exactly as ``fedft.data`` builds it from a row."""
    return f"{TASK_INSTRUCTIONS[task]}\n{source}"


def make_preference_rows(pairs_per_task: int, seed: int, exclude_prompts: set[str] | frozenset = frozenset()
                         ) -> list[dict]:
    """``{"prompt","chosen","rejected","task","flaw"}`` rows, ``pairs_per_task`` per task, interleaved.

    ``chosen`` is the task's correct answer; ``rejected`` a near miss in the same format
    (``flaw`` names which: a day/month swap, a missing zero, a wrong JSON value, a missing
    or extra underscore, ...). Prompts are distinct and none is in ``exclude_prompts``.
    """
    rng = random.Random(seed)
    by_task: dict[str, list[dict]] = {task: [] for task in PAIR_TASKS}
    seen = set(exclude_prompts)
    for task, make in PAIR_TASKS.items():
        for _ in range(pairs_per_task * 1000):
            if len(by_task[task]) == pairs_per_task:
                break
            source, chosen, rejected, flaw = make(rng)
            prompt = preference_prompt(task, source)
            if prompt in seen or chosen == rejected:
                continue
            seen.add(prompt)
            by_task[task].append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                                  "task": task, "flaw": flaw})
        if len(by_task[task]) < pairs_per_task:  # pragma: no cover - the prompt spaces are large
            raise ValueError(f"could not draw {pairs_per_task} distinct new {task} prompts")
    return [by_task[task][i] for i in range(pairs_per_task) for task in PAIR_TASKS]


def _row_prompt(row: dict) -> str:
    return row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")


def make_demo_preferences(sft_rows: list[dict], eval_rows: list[dict], *, train_per_task: int = 128,
                          eval_per_task: int = 50, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out pairs) for the demo's DPO stage.

    Training pairs never use a prompt of ``eval_rows`` (the exact-match set); held-out
    pairs use none of ``sft_rows``, ``eval_rows`` or the training pairs' prompts. Their
    RNGs (``seed + 2`` and ``seed + 3``) are apart from the SFT data's (``seed`` and
    ``seed + 1``), so adding pairs never changes train.jsonl or eval.jsonl.
    """
    eval_prompts = {_row_prompt(r) for r in eval_rows}
    train = make_preference_rows(train_per_task, seed + 2, exclude_prompts=eval_prompts)
    taken = eval_prompts | {_row_prompt(r) for r in sft_rows} | {r["prompt"] for r in train}
    held_out = make_preference_rows(eval_per_task, seed + 3, exclude_prompts=taken)
    return train, held_out


def write_demo_preferences(out_dir: Path, sft_rows: list[dict], eval_rows: list[dict], *,
                           train_per_task: int = 128, eval_per_task: int = 50, seed: int = 0
                           ) -> tuple[Path, Path]:
    """Write ``prefs-train.jsonl`` and ``prefs-eval.jsonl`` beside the demo's SFT data."""
    train, held_out = make_demo_preferences(sft_rows, eval_rows, train_per_task=train_per_task,
                                            eval_per_task=eval_per_task, seed=seed)
    paths = (Path(out_dir) / "prefs-train.jsonl", Path(out_dir) / "prefs-eval.jsonl")
    write_jsonl(train, paths[0])
    write_jsonl(held_out, paths[1])
    return paths
