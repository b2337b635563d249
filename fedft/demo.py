"""The embedded default: a small character-level Llama and synthetic institutions' data.

Everything here is deterministic from a seed and needs no network. ``build_base_model``
pretrains a tiny Llama on generic text "of the right shape" (dates, quantities, records,
names) that never pairs a question with its answer, so the base model knows the
characters but cannot solve the institutions' tasks; ``make_demo_rows`` writes the tasks;
``make_demo_preferences`` writes preference pairs for the DPO stage (the right answer
against a near miss in the same format), on prompts apart from the exact-match set.
The committed artifact under ``fedft/assets/demo-base`` is what ``build_base_model``
produces; ``fedft demo build-base`` rebuilds it. This module does no federated work.
"""

from __future__ import annotations

import json
import math
import random
import string
import time
from collections.abc import Callable, Iterator
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


def write_jsonl(rows: list[dict], path: Path) -> None:
    """Write rows as JSON lines (one object per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------------------
# The base model: generic text of the right shape, never a question with its answer.
# --------------------------------------------------------------------------------------

def _generic_line(rng: random.Random) -> str:
    """One line of pretraining text: general facts and text that repeats itself.

    Lines repeat names, numbers, dates and identifiers (so the base learns to copy) and
    state facts a real LLM knows (month numbers, unit factors, lower case), but never show
    a task's question next to its answer.
    """
    year, month, day = _date(rng)
    name, city = rng.choice(FIRST_NAMES), rng.choice(CITIES)
    w1, w2, w3 = rng.sample(WORDS, 3)
    big, small, zeros = rng.choice(UNITS)
    value = rng.randint(1, 999)
    age = rng.randint(18, 99)
    iso = f"{year:04d}-{month:02d}-{day:02d}"
    words = rng.sample(WORDS, rng.randint(1, 3))
    choices = [
        f"On {MONTHS[month - 1]} {day} {year} {name} moved to {city}. {name} liked {city}.",
        f"The {w1} dated {iso} was filed. The {iso} {w1} is closed.",
        f"{MONTHS[month - 1]} is month {month:02d} of the year.",
        f"Day {day} of {MONTHS[month - 1]} {year} was day {day} again for {name}.",
        f"1 {big} is 1{'0' * zeros} {small}, so {value} {big} is a lot of {small}.",
        f"The {w1} is {value} {small}. I said {value} {small}.",
        f"{name} is {age} and lives in {city}; {name} is {age}.",
        json.dumps({w1: name, w2: age}) + f" has {w1} {name} and {w2} {age}.",
        json.dumps({"city": city, w3: value}),
        f"The field {'_'.join(words)} is named {'_'.join(words)}.",
        f"{' '.join(w.capitalize() for w in words)} in lower case is {' '.join(words)}.",
        f"{name} wrote {value}{'0' * zeros} and then {value}{'0' * zeros} again.",
    ]
    return rng.choice(choices)


def pretraining_text(num_lines: int, seed: int) -> list[str]:
    """Generic lines for pretraining the base and for the forgetting probe."""
    rng = random.Random(seed)
    return [_generic_line(rng) for _ in range(num_lines)]


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'A: ' + m['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
)


def build_char_tokenizer():
    """A character-level tokenizer (printable ASCII + newline) with a short chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = ["\n"] + [c for c in string.printable if c.isprintable()]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _batches(ids: list[list[int]], batch_size: int, rng: random.Random) -> Iterator[list[list[int]]]:
    while True:
        order = list(range(len(ids)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [ids[i] for i in order[start:start + batch_size]]


def build_base_model(
    out_dir: Path,
    *,
    hidden_size: int = 256,
    num_layers: int = 4,
    steps: int = 1200,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """Pretrain the tiny Llama on generic text and save it in Hugging Face format.

    Every linear layer's input width is a multiple of 64 (bitsandbytes' NF4 block size),
    which its packed CPU inference kernel requires.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size,
        intermediate_size=-(-hidden_size * 8 // 3 // 64) * 64, num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64, num_key_value_heads=hidden_size // 64,
        max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    lines = pretraining_text(20000, seed=seed + 1)
    ids = [[tokenizer.bos_token_id] + tokenizer(line)["input_ids"] + [tokenizer.eos_token_id]
           for line in lines]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    batches = _batches(ids, 32, random.Random(seed))
    start = time.time()
    for step in range(steps):
        batch = next(batches)
        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for row, seq in enumerate(batch):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, : len(seq)] = torch.tensor(seq)
        loss = model(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"pretrain step {step + 1}/{steps}  loss {loss.item():.3f}  {time.time() - start:.0f}s")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
