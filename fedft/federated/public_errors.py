"""What a failing client may tell the coordinator: an error class and a fixed sentence, nothing else.

An exception raised while an institution trains can carry its data (a malformed row's
text), its paths (a file name) or library text quoting either. ``public_reason`` maps the
exception to its class name, when it is one of the classes below, and to a sentence written
here, so no exception text ever leaves. The full message stays in the institution's own
log. Pure: no I/O.
"""

from __future__ import annotations

from fedft.federated import wire

# Class name -> what the coordinator is told. Anything else is reported as "Error".
PUBLIC_REASONS = {
    "DataError": "its training data could not be read or tokenized",
    "PolicyError": "its policy file or --node-config is invalid",
    "ConfigError": "the round's config could not be applied",
    "QuantizationError": "its base model cannot be quantized as asked on its machine",
    "OutOfMemoryError": "it ran out of accelerator memory",
    "MemoryError": "it ran out of memory",
    "FileNotFoundError": "a file it needs is missing",
    "PermissionError": "a file it needs is not readable",
    "UnicodeDecodeError": "a file it reads is not valid UTF-8",
    "KeyboardInterrupt": "it was interrupted",
}


def public_reason(error: BaseException) -> str:
    """``fedft-failed: <Class>: <fixed sentence>``: safe to send to the coordinator."""
    name = type(error).__name__
    if name not in PUBLIC_REASONS:
        return f"{wire.FAILED}: Error: an unexpected error; details are in the institution's own log"
    return f"{wire.FAILED}: {name}: {PUBLIC_REASONS[name]}; details are in the institution's own log"
