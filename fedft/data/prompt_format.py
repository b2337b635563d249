"""Which prompt format a tokenizer gives fedft's rows, stated once and recorded in summary.json.

A tokenizer with a chat template formats every conversation through it; one without gets
the fallback ``### Instruction: ... ### Response:`` layout (``fedft.data.rows.FALLBACK_PROMPT``).
A tokenizer without a pad token pads with its eos token. Neither choice may pass unseen:
``prompt_format`` describes both, ``prompt_format_line`` says it in one console line.
"""

from __future__ import annotations

from fedft.data.rows import FALLBACK_PROMPT


def prompt_format(tokenizer) -> dict:
    """The prompt layout and the pad token ``tokenizer`` gives fedft's rows."""
    template = bool(getattr(tokenizer, "chat_template", None))
    return {
        "prompts": "chat template" if template else "fallback",
        "fallback_layout": None if template else FALLBACK_PROMPT,
        "pad_token": tokenizer.pad_token,
        "pad_is_eos": bool(getattr(tokenizer, "fedft_pad_from_eos", False))
        or (tokenizer.pad_token is not None and tokenizer.pad_token == tokenizer.eos_token),
        "eos_token": tokenizer.eos_token,
    }


def prompt_format_line(facts: dict) -> str:
    """One console line: how prompts are formatted and what pads them."""
    if facts["prompts"] == "chat template":
        prompts = "prompts: the tokenizer's chat template"
    else:
        prompts = "prompts: no chat template, so the fallback '### Instruction: ... ### Response:' layout"
    pad = f"pad token {facts['pad_token']!r}" + (" (the eos token: the tokenizer has no pad token)"
                                                  if facts["pad_is_eos"] else "")
    return f"{prompts}; {pad}"
