"""Preference pairs for DPO: JSONL loading with line-exact errors, and completion-only tokenization.

One object per line: ``{"prompt": ..., "chosen": ..., "rejected": ..., "task": ...}``. The
prompt is either a string (the user's message, as ``instruction + "\n" + input`` is in
``fedft.data``) or a list of chat messages (system/user/assistant turns, ending with the
user's). ``chosen`` and ``rejected`` are the two candidate answers, plain strings.
``task`` (optional) names the group a pair is scored in; other keys (the demo's ``flaw``)
are ignored. Prompts go through the
tokenizer's chat template exactly as SFT rows do (``fedft.data.prompt_and_completion``),
so a pair's answers are scored in the context the model was fine-tuned and evaluated in;
sequence log-probabilities are summed over the answer tokens only (``prompt_ids`` marks
where they start). Nothing here trains a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedft.data.files import DataError, json_lines
from fedft.data.rows import ROLES, prompt_and_completion

PAIR_KEYS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred and a dispreferred answer."""

    messages: tuple[dict, ...]  # the prompt as chat messages, never ending with the assistant
    chosen: str
    rejected: str
    task: str
    source: str  # file:line


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of prompt + chosen and prompt + rejected; labels start after ``prompt_len``."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_len: int
    task: str
    source: str


def _prompt_messages(prompt, where: str) -> tuple[dict, ...]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field 'prompt' is an empty string")
        return ({"role": "user", "content": prompt},)
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: field 'prompt' must be a string or a non-empty list of chat messages, "
                        f"got {type(prompt).__name__}")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field 'prompt': messages[{i}] must be "
                            f"{{'role': one of {ROLES}, 'content': str}}, got {m!r}")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: field 'prompt' ends with an assistant message; the answers go in "
                        "'chosen' and 'rejected'")
    if not any(m["role"] == "user" for m in prompt):
        raise DataError(f"{where}: field 'prompt' has no user message")
    return tuple({"role": m["role"], "content": m["content"]} for m in prompt)


def pair_from_row(raw, where: str) -> PreferencePair:
    """Validate one parsed JSON value as a preference pair; errors start with ``where``."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    missing = [k for k in PAIR_KEYS if k not in raw]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(repr(k) for k in missing)}; "
                        f"a preference row needs 'prompt', 'chosen' and 'rejected' (found {sorted(raw)})")
    messages = _prompt_messages(raw["prompt"], where)
    for key in ("chosen", "rejected"):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise DataError(f"{where}: field {key!r} must be a non-empty string, got {raw[key]!r}")
    if raw["chosen"] == raw["rejected"]:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are the same answer {raw['chosen']!r}; "
                        "a pair must differ")
    task = raw.get("task", "all")
    if not isinstance(task, str):
        raise DataError(f"{where}: field 'task' must be a string, got {task!r}")
    return PreferencePair(messages=messages, chosen=raw["chosen"], rejected=raw["rejected"],
                          task=task, source=where)


def read_preference_jsonl(path: str | Path) -> list[PreferencePair]:
    """Read a preference JSONL file; a bad row raises ``DataError`` naming file:line and field."""
    pairs = [pair_from_row(raw, where) for where, raw in json_lines(path, "preference file")]
    if not pairs:
        raise DataError(f"preference file {path} has no rows")
    return pairs


def _answer_ids(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids ending in EOS), tokenized as ``fedft.data.tokenize_row`` does."""
    prompt, completion = prompt_and_completion(messages, tokenizer)
    uses_template = bool(getattr(tokenizer, "chat_template", None))
    prompt_ids = tokenizer(prompt, add_special_tokens=not uses_template)["input_ids"]
    answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and (not answer_ids or answer_ids[-1] != tokenizer.eos_token_id):
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    return prompt_ids, answer_ids


def tokenize_pair(pair: PreferencePair, tokenizer, max_length: int) -> TokenizedPair:
    """Tokenize both answers after the same chat-formatted prompt, truncated to ``max_length``."""
    base = list(pair.messages)
    prompt_ids, chosen = _answer_ids(base + [{"role": "assistant", "content": pair.chosen}], tokenizer)
    prompt_again, rejected = _answer_ids(base + [{"role": "assistant", "content": pair.rejected}], tokenizer)
    if prompt_again != prompt_ids:  # pragma: no cover - a template that renders the prompt by answer
        raise DataError(f"{pair.source}: the chat template renders the prompt differently for the two answers")
    if len(prompt_ids) >= max_length:
        raise DataError(
            f"{pair.source}: the prompt is {len(prompt_ids)} tokens, not shorter than dpo.max_length = "
            f"{max_length}; raise dpo.max_length or shorten the row"
        )
    return TokenizedPair(
        chosen_ids=(prompt_ids + chosen)[:max_length], rejected_ids=(prompt_ids + rejected)[:max_length],
        prompt_len=len(prompt_ids), task=pair.task, source=pair.source,
    )


def trl_rows(pairs: list[PreferencePair]) -> list[dict]:
    """Pairs in TRL's conversational preference format (prompt messages, one-message answers)."""
    return [
        {"prompt": list(p.messages), "chosen": [{"role": "assistant", "content": p.chosen}],
         "rejected": [{"role": "assistant", "content": p.rejected}]}
        for p in pairs
    ]
