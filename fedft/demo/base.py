"""The demo's base model: a tiny character-level Llama pretrained on generic text.

``build_base_model`` pretrains it on ``pretraining_text``: lines "of the right shape"
(dates, quantities, records, names) that never pair a question with its answer, so the
base knows the characters but cannot solve the institutions' tasks. The committed artifact
under ``fedft/assets/demo-base`` is what ``build_base_model`` produces; ``fedft demo
build-base`` rebuilds it.
"""

from __future__ import annotations

import json
import math
import random
import string
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from fedft.demo.tasks import CITIES, FIRST_NAMES, MONTHS, UNITS, WORDS, _date

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
