"""What the stage evaluation reads from files, and ``evaluate_run`` for a finished run.

The general text of the forgetting probe (``report.general_text`` or a named file), the
held-out preference pairs (the run's model-built pairs, ``dpo.eval_path`` or a named file),
the stages a run directory holds (its adapter, the local-only clients' adapters, the DPO
adapter), and the check that a comparison run shares the base and adapter shape.
``evaluate_run`` scores a finished run (``fedft report RUN_DIR --evaluate``) and writes
RUN_DIR/evaluation.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from fedft.align.stage import MODEL_PAIR_FILES
from fedft.align.stage import load_pairs as load_preference_pairs
from fedft.config import FedftConfig
from fedft.data.rows import DataError
from fedft.eval.stages import StageState, evaluate_stages
from fedft.rundir import ADAPTER_DIR, ADAPTER_WEIGHTS, DPO_ADAPTER_DIR, write_evaluation

# ---------------------------------------------------------------------------------------
# The entry point the run loop calls
# ---------------------------------------------------------------------------------------


def read_general_texts(path: Path) -> list[str]:
    """Texts of a probe file: ``.jsonl`` rows with a "text" field, otherwise one text per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"general text file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        texts = [line for line in lines if line.strip()]
    else:
        texts = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{number}: expected an object with a string field 'text'")
            texts.append(row["text"])
    if not texts:
        raise DataError(f"general text file {path} has no text")
    return texts


def load_pairs(path: Path, tokenizer, max_length: int, max_pairs: int | None, seed: int) -> list:
    """Tokenized preference pairs of ``path`` (at most ``max_pairs``, drawn evenly, as DPO draws them)."""
    return load_preference_pairs(str(path), tokenizer, max_length, max_pairs, seed)[1]


def load_adapter_state(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """A PEFT adapter directory's tensors (float32, sorted keys), as ``get_adapter_state`` gives them."""
    from safetensors.torch import load_file

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: no adapter to evaluate in {adapter_dir}")
    return {k: v.to(torch.float32) for k, v in sorted(load_file(path).items())}


def run_states(run_dir: Path) -> dict[str, StageState]:
    """The stages a run directory holds: its final adapter (or local clients' adapters) and dpo/adapter."""
    from fedft.rundir import load_summary

    run_dir = Path(run_dir)
    strategy = load_summary(run_dir).get("strategy")
    adapter = run_dir / ADAPTER_DIR
    if strategy == "local":
        clients = sorted(adapter.glob("client*/"), key=lambda p: int(p.name[len("client"):] or 0))
        if not clients:
            raise FileNotFoundError(f"{adapter} has no clientN/ adapters: is {run_dir} a finished local-only run?")
        states: dict[str, StageState] = {"local": [load_adapter_state(c) for c in clients]}
    else:
        states = {"centralized" if strategy == "centralized" else "federated": load_adapter_state(adapter)}
    if (run_dir / DPO_ADAPTER_DIR).is_dir():
        states["dpo"] = load_adapter_state(run_dir / DPO_ADAPTER_DIR)
    return states


def check_same_model(cfg: FedftConfig, other: FedftConfig, other_dir: Path) -> None:
    """Refuse a comparison run whose adapters do not fit (or mean something else on) this base."""
    fields = {"model.path": (cfg.model.path, other.model.path),
              "model.quantization": (cfg.model.quantization, other.model.quantization),
              "lora.r": (cfg.lora.r, other.lora.r), "lora.alpha": (cfg.lora.alpha, other.lora.alpha),
              "lora.target_modules": (cfg.lora.target_modules, other.lora.target_modules)}
    for name, (ours, theirs) in fields.items():
        if ours != theirs:
            raise DataError(f"{other_dir}/summary.json: {name} = {theirs!r}, but the evaluated run has "
                            f"{ours!r}; only runs of the same base and adapter shape can be compared")


def default_general_texts(cfg: FedftConfig, path: Path | None) -> tuple[list[str], str | None]:
    """(texts, where from): the named file, else ``report.general_text``, else none."""
    if path is None and cfg.report.general_text:
        path = Path(cfg.report.general_text)
    if path is not None:
        return read_general_texts(path), str(path)
    return [], None


def run_pairs_path(run_dir: Path) -> Path | None:
    """The held-out pairs a run's DPO stage built from its model's answers, if it did."""
    path = Path(run_dir) / "dpo" / MODEL_PAIR_FILES[1]
    return path if path.is_file() else None


def default_pairs_path(cfg: FedftConfig, path: Path | None) -> Path | None:
    """The named pairs file, else ``dpo.eval_path``, else none."""
    if path is not None:
        return Path(path)
    return Path(cfg.dpo.eval_path) if cfg.dpo.eval_path else None


def stage_inputs(cfg: FedftConfig, tokenizer, *, general_text: Path | None = None,
                 pairs_file: Path | None = None) -> dict:
    """What ``evaluate_stages`` scores on, from the config's files (or the files named).

    Returns keyword arguments for ``evaluate_stages`` (``eval_examples``, ``pairs``,
    ``general_texts``, ``notes``) plus ``sources``: where the general text and pairs came from.
    """
    from fedft.eval.held_out import load_eval_examples

    notes: list[str] = []
    texts, text_source = default_general_texts(cfg, general_text)
    if not texts:
        notes.append("no general text for the forgetting probe: pass --general-text FILE")
    pairs_path, pairs = default_pairs_path(cfg, pairs_file), []
    if pairs_path is None:
        notes.append("no preference pairs: pass --pairs FILE (or set dpo.eval_path)")
    else:
        pairs = load_pairs(pairs_path, tokenizer, cfg.dpo.max_length, cfg.dpo.eval_max_pairs, cfg.dpo.seed)
    return {"eval_examples": load_eval_examples(cfg, tokenizer), "pairs": pairs, "general_texts": texts,
            "notes": notes, "sources": {"eval_file": cfg.data.eval_file, "general_text_source": text_source,
                                        "preference_file": str(pairs_path) if pairs_path else None}}


def evaluate_run(run_dir: Path, *, compare: list[Path] = (), general_text: Path | None = None,
                 pairs_file: Path | None = None, num_samples: int = 5,
                 progress: Callable[[str], None] = print) -> dict:
    """Evaluate a finished run's stages (plus ``compare`` runs' adapters) and write evaluation.json."""
    from fedft.model.load import cached_peft_model, model_spec
    from fedft.rundir import load_run_config

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    stages: dict[str, StageState] = {"base": None, **run_states(run_dir)}
    sources = {"base": "initial adapter (B = 0): the base model"}
    sources.update({name: str(run_dir) for name in stages if name != "base"})
    for other_dir in map(Path, compare):
        check_same_model(cfg, load_run_config(other_dir), other_dir)
        for name, state in run_states(other_dir).items():
            label = name if name not in stages else f"{name} ({other_dir.name})"
            stages[label], sources[label] = state, str(other_dir)
    _, tokenizer = cached_peft_model(model_spec(cfg))
    pairs_file = pairs_file or run_pairs_path(run_dir)
    inputs = stage_inputs(cfg, tokenizer, general_text=general_text, pairs_file=pairs_file)
    files = inputs.pop("sources")
    evaluation = evaluate_stages(cfg, stages, num_samples=num_samples, progress=progress, **inputs)
    evaluation.update({"stage_sources": sources, **files})
    write_evaluation(run_dir, evaluation)
    return evaluation
