"""A config from TOML (paths resolved relative to the file) and ``--set`` overrides, checked at load time.

A wrong value fails with the file and line, the field, the bad value and what is allowed.
This module does no I/O beyond reading the TOML file and imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedft.config.fields import ConfigError
from fedft.config.sections import PATH_FIELDS, SECTIONS, FedftConfig


def where_in_file(source: str | None, lines: list[str], section: str | None, key: str,
                  given: dict[str, str] | None = None) -> str:
    """'file:line' of ``key`` inside ``[section]`` when it can be found, else the file; the
    ``--set`` argument instead when the value came from one (``given``: "section.key" -> argument)."""
    name = f"{section}.{key}" if section else key
    if given and name in given:
        return f"--set {given[name]}"
    if not source:
        return "config"
    current = None
    for number, line in enumerate(lines, start=1):
        header = re.match(r"\s*\[([^\]]+)\]", line)
        if header:
            current = header.group(1).strip()
        elif current == section and re.match(rf"\s*{re.escape(key)}\s*=", line):
            return f"{source}:{number}"
    return source


def _coerce(value: Any, annotation: str, name: str, where: str) -> Any:
    """Check a raw TOML value against a dataclass field's type; ints widen to floats."""
    ok: bool
    if annotation == "bool":
        ok = isinstance(value, bool)
    elif annotation == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif annotation == "str":
        ok = isinstance(value, str)
    elif annotation.startswith("tuple[int"):
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    elif annotation.startswith("tuple[str"):
        if isinstance(value, str):
            value = [value]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    elif annotation == "dict[str, str]":  # a TOML table: the section makes it a read-only FrozenTable
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    else:  # pragma: no cover - every field type is listed above
        raise TypeError(f"unsupported field type {annotation}")
    if not ok:
        expected = {"dict[str, str]": 'a table of strings, e.g. {instruction = "question"}'}.get(annotation, annotation)
        raise ConfigError(f"{where}: {name} = {value!r} has the wrong type: expected {expected}")
    return value


def build_section(cls: type, raw: dict, section: str, source: str | None, lines: list[str],
                  given: dict[str, str] | None = None):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        where = where_in_file(source, lines, section, key, given)
        if key not in fields:
            raise ConfigError(
                f"{where}: unknown field {section}.{key}; allowed: {', '.join(sorted(fields))}"
            )
        values[key] = _coerce(value, str(fields[key].type), f"{section}.{key}", where)
    return cls(**values)


def _problems(cfg: FedftConfig) -> Iterator[tuple[str, str]]:
    """("section.field", what is allowed) for every broken rule, in the order they are checked:
    each field's choices, then each field's other limit, then each section's rules, then
    the rules across sections."""
    sections = [(name, getattr(cfg, name)) for name in SECTIONS]
    for choices in (True, False):
        for name, section in sections:
            for f in dataclasses.fields(section):
                limit = f.metadata
                if limit and bool(limit["choices"]) == choices and not limit["check"](getattr(section, f.name)):
                    yield f"{name}.{f.name}", limit["allowed"]
    for name, section in sections:
        yield from ((f"{name}.{key}", allowed) for key, allowed in section.problems())
    yield from cfg.problems()


def _validate(cfg: FedftConfig, source: str | None, lines: list[str], given: dict[str, str] | None) -> None:
    """Raise for the first broken rule, naming the file and line of the field when it is there."""
    for name, allowed in _problems(cfg):
        section, key = name.split(".")
        where, value = where_in_file(source, lines, section, key, given), getattr(getattr(cfg, section), key)
        raise ConfigError(f"{where}: {name} = {value!r} is not allowed; expected {allowed}")


def config_from_dict(raw: dict, *, source: str | None = None, text: str = "",
                     given: dict[str, str] | None = None) -> FedftConfig:
    """Build and validate a config from a nested dict (parsed TOML or the wire form); errors in
    values that came from ``--set`` name that argument (``given``)."""
    lines = text.splitlines()
    raw = dict(raw)
    sections = {}
    for name, cls in SECTIONS.items():
        part = raw.pop(name, {})
        if not isinstance(part, dict):
            raise ConfigError(f"{source or 'config'}: [{name}] must be a table, got {part!r}")
        sections[name] = build_section(cls, part, name, source, lines, given)
    seed = raw.pop("seed", 0)
    if raw:
        unknown = ", ".join(sorted(raw))
        raise ConfigError(
            f"{source or 'config'}: unknown top-level key(s) {unknown}; allowed: seed, "
            + ", ".join(f"[{s}]" for s in SECTIONS)
        )
    seed = _coerce(seed, "int", "seed", where_in_file(source, lines, None, "seed", given))
    cfg = FedftConfig(seed=seed, **sections)
    _validate(cfg, source, lines, given)
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` (or ``section.table.key=value`` for a table field such as
    ``data.columns``); the value is read as TOML, else taken as a plain string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys) or len(keys) > 3:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return keys, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of ``raw`` with each ``section.key=value`` applied; ``section.table.key=value``
    sets one entry of a table field, keeping its other entries."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        keys, value = parse_override(item)
        if len(keys) == 1:
            merged[keys[0]] = value
            continue
        if keys[0] not in SECTIONS:
            raise ConfigError(f"--set {item!r}: unknown section {keys[0]!r}; allowed: {', '.join(SECTIONS)}")
        section = merged.setdefault(keys[0], {})
        if not isinstance(section, dict):
            section = merged[keys[0]] = {}
        if len(keys) == 3:
            table = section.get(keys[1])
            value = {**(table if isinstance(table, dict) else {}), keys[2]: value}
        section[keys[1]] = value
    return merged


def _resolve_paths(raw: dict, base: Path) -> dict:
    """Every field of ``PATH_FIELDS`` made absolute against ``base`` (a lone train file becomes a list)."""
    def resolve(value: Any) -> Any:
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return str((base / value).resolve()) if isinstance(value, str) and value else value

    raw = dict(raw)
    for name in PATH_FIELDS:
        section, key = name.split(".")
        part = raw.get(section)
        if not isinstance(part, dict) or key not in part:
            continue
        value = part[key]
        if name == "data.train_files" and isinstance(value, str):
            value = [value]
        raw[section] = {**part, key: resolve(value)}
    return raw


def read_toml(path: Path, missing: str, error: type[ConfigError] = ConfigError) -> tuple[dict, str]:
    """The parsed file and its text; ``error(missing)`` when it does not exist, ``error`` naming the
    file when it is not TOML."""
    if not path.is_file():
        raise error(missing)
    text = path.read_text()
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as err:
        raise error(f"{path}: not valid TOML: {err}") from err


def load_config(path: str | Path, overrides: list[str] | None = None) -> FedftConfig:
    """Load a TOML config file, apply ``--set`` overrides, resolve paths, validate."""
    path = Path(path)
    raw, text = read_toml(path, f"config file {path} does not exist")
    # Paths in the file are relative to the file; paths given with --set to the shell's cwd.
    raw = apply_overrides(_resolve_paths(raw, path.parent), overrides or [])
    given = _resolve_paths(apply_overrides({}, overrides or []), Path.cwd())
    for name in PATH_FIELDS:
        section, key = name.split(".")
        part = given.get(section)
        if isinstance(part, dict) and key in part:
            raw[section][key] = part[key]
    # an error names the --set argument that gave the field (a table's entry names its table)
    given = {".".join(parse_override(item)[0][:2]): item for item in overrides or []}
    return config_from_dict(raw, source=str(path), text=text, given=given)


def config_to_dict(cfg: FedftConfig) -> dict:
    """A plain, JSON-serialisable dict (tuples become lists) that round-trips."""
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return list(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))
