"""Checking a base model's files before a run creates anything: a clear error naming the path.

``check_model_files(path)`` runs before any output exists. A local directory (an absolute or
``./`` path, or any path that exists) must hold ``config.json`` and weight files, and each
safetensors file must have a complete header; a hub id (``org/name`` that is not a local
path) is left to ``from_pretrained``. Reads file headers only; no torch.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from fedft.config import ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _looks_local(path: str) -> bool:
    candidate = Path(path).expanduser()
    return candidate.exists() or candidate.is_absolute() or path.startswith((".", "~")) or path.count("/") != 1


def check_safetensors_header(path: Path) -> None:
    """Raise ``ConfigError`` naming ``path`` when its header is cut short or is not JSON."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ConfigError(f"{path}: not a safetensors file ({size} bytes); copy the model again")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise ConfigError(f"{path}: incomplete safetensors file (header of {length} bytes, file of {size}); "
                              "the copy was cut short, copy the model again")
        try:
            json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"{path}: the safetensors header is not valid JSON; copy the model again") from None


def check_model_files(path: str, field: str = "model.path") -> None:
    """Refuse a local model directory that is missing, incomplete or has a truncated weight file."""
    if not _looks_local(path):
        return  # a hub id
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"{field} = {path!r}: no such directory (a local model directory with config.json "
                          "and weights, or a hub id such as 'org/name')")
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{field} = {path!r}: {directory} has no config.json; is it a Hugging Face model directory?")
    weights = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise ConfigError(f"{field} = {path!r}: {directory} has no weight files (*.safetensors, *.bin)")
    for weight in weights:
        if weight.suffix == ".safetensors":
            check_safetensors_header(weight)
