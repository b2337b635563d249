"""The centralized DPO stage as a run calls it: (build pairs,) score, train, score, save.

``load_pairs`` reads and tokenizes a preference file (at most N pairs, drawn evenly).
With ``dpo.rejected_from = "model"`` ``write_model_pairs`` first replaces each rejected
answer by the federated model's own most probable wrong answer (``fedft.align.pairs``)
and writes RUN_DIR/dpo/pairs-train.jsonl and pairs-eval.jsonl atomically.
``run_dpo_stage`` trains (``fedft.align.dpo``), scores before and after, and saves the
adapter to RUN_DIR/dpo/adapter with dpo/summary.json. Nothing here knows about Flower.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fedft.align.dpo import DpoResult, train_dpo
from fedft.config import DpoConfig, FedftConfig
from fedft.data.preferences import PreferencePair, TokenizedPair, tokenize_pair
from fedft.model.adapter import set_adapter_state
from fedft.score.preference import preference_scores, scored_logps


def _even_subset(n: int, max_items: int | None, seed: int) -> list[int]:
    """All of ``range(n)``, or ``max_items`` of them drawn evenly (sorted), reproducibly."""
    if max_items is None or n <= max_items:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), max_items))


def load_pairs(path: str, tokenizer, max_length: int, max_pairs: int | None = None, seed: int = 0
               ) -> tuple[list[PreferencePair], list[TokenizedPair]]:
    """Read a preference file (at most ``max_pairs`` rows, drawn evenly) and tokenize it."""
    from fedft.data.preferences import read_preference_jsonl

    pairs = read_preference_jsonl(path)
    pairs = [pairs[i] for i in _even_subset(len(pairs), max_pairs, seed)]
    return pairs, [tokenize_pair(p, tokenizer, max_length) for p in pairs]


MODEL_PAIR_FILES = ("pairs-train.jsonl", "pairs-eval.jsonl")  # in RUN_DIR/dpo/, rejected_from = "model"


def write_model_pairs(cfg: FedftConfig, model, tokenizer, dpo_dir: Path, log: Callable[[str], None] = print
                      ) -> tuple[Path, Path, dict]:
    """Rebuild the train and held-out pairs with the model's own wrong answers (``fedft.align.pairs``).

    The model's active adapter is the one sampled (the federated SFT adapter). Held-out
    pairs are first cut to ``dpo.eval_max_pairs`` (as ``load_pairs`` draws them) and get one
    wrong answer each; training prompts (at most ``dpo.train_max_pairs``, drawn evenly) get up to
    ``dpo.negatives_per_prompt``. Writes
    ``dpo_dir/pairs-train.jsonl`` and ``pairs-eval.jsonl`` atomically; returns their paths
    and the counts of where the rejected answers came from.
    """
    from fedft.align.pairs import SamplingSettings, model_error_rows
    from fedft.data.files import json_lines
    from fedft.data.preferences import pair_from_row
    from fedft.rundir import atomic_write_jsonl

    d = cfg.dpo
    settings = SamplingSettings(samples=d.samples, temperature=d.temperature, seed=d.seed,
                                batch_size=d.generation_batch_size)
    paths, counts = [], {}
    for name, source, per_prompt, limit in (("train", d.train_path, d.negatives_per_prompt, d.train_max_pairs or None),
                                            ("eval", d.eval_path, 1, d.eval_max_pairs)):
        lines = list(json_lines(source, "preference file"))
        lines = [lines[i] for i in _even_subset(len(lines), limit, d.seed)]
        pairs = [pair_from_row(raw, where) for where, raw in lines]
        started = time.time()
        rows, counts[name] = model_error_rows(model, tokenizer, [raw for _, raw in lines], pairs,
                                              max_length=d.max_length, settings=settings, per_prompt=per_prompt)
        path = Path(dpo_dir) / MODEL_PAIR_FILES[0 if name == "train" else 1]
        atomic_write_jsonl(path, rows)
        paths.append(path)
        c = counts[name]
        log(f"dpo: {name} pairs from the federated model's own answers ({time.time() - started:.0f} s): "
            f"{len(rows)} pairs; its greedy answer was wrong on {c['greedy_wrong']} of {len(pairs)} prompts, "
            f"only a sampled one on {c['sampled_wrong']}, none on {c['never_wrong']} (file's rejected kept)")
    return paths[0], paths[1], counts


def run_dpo_stage(cfg: FedftConfig, sft_adapter_state: dict[str, torch.Tensor], out_dir: Path,
                  *, log: Callable[[str], None] = print) -> dict:
    """Score, train and save the DPO stage of a run; return its summary.

    Uses the process's cached model (``fedft.model.cached_peft_model``, loaded exactly as
    for training). With ``dpo.rejected_from = "model"`` the pairs are first rebuilt from
    the federated model's own wrong answers (``write_model_pairs``). Preference scores use
    the DPO reference, the federated SFT adapter, so it scores 50% by definition; the
    reference-free ``likelihood_accuracy`` is given before and after too. Writes
    ``out_dir/dpo/adapter`` (PEFT format, one atomic rename), ``out_dir/dpo/history.jsonl``
    and ``out_dir/dpo/summary.json``. On return the cached model has only its ``default``
    adapter, active, holding the DPO adapter.
    """
    from fedft.model.adapter import save_adapter
    from fedft.model.load import cached_peft_model, model_spec
    from fedft.rundir import atomic_write_json, atomic_write_jsonl

    d = cfg.dpo
    dpo_dir = Path(out_dir) / "dpo"
    model, tokenizer = cached_peft_model(model_spec(cfg))
    pad_id = tokenizer.pad_token_id
    start = time.time()
    set_adapter_state(model, sft_adapter_state)
    pairs = stage_pairs(cfg, model, tokenizer, dpo_dir, log)
    tasks = [p.task for p in pairs.held_out]
    reference = scored_logps(model, pairs.held_out, pad_id)
    before = preference_scores(reference, reference, tasks, d.beta)
    log(f"dpo: the federated SFT adapter (the reference) ranks the chosen answer first on "
        f"{before['likelihood_accuracy']:.1%} of {len(pairs.held_out)} held-out pairs")
    result = train_dpo(model, tokenizer, pairs.train, d, sft_adapter_state, log=log)
    set_adapter_state(model, result.state)
    after = preference_scores(scored_logps(model, pairs.held_out, pad_id), reference, tasks, d.beta)
    log(f"dpo: held-out preference accuracy (implicit reward vs the reference) 50.0% -> "
        f"{after['pref_accuracy']:.1%}; chosen ranked first {before['likelihood_accuracy']:.1%} -> "
        f"{after['likelihood_accuracy']:.1%}")
    save_adapter(model, result.state, dpo_dir / "adapter")
    atomic_write_jsonl(dpo_dir / "history.jsonl", result.history)
    summary = stage_summary(d, pairs, result, before, after, wall_s=time.time() - start)
    atomic_write_json(dpo_dir / "summary.json", summary)
    return summary


@dataclass(frozen=True)
class StagePairs:
    """The DPO stage's training pairs and tokenized held-out pairs, with where they came from."""

    train: list[PreferencePair]
    held_out: list[TokenizedPair]
    train_path: Path | str
    eval_path: Path | str
    origins: dict | None  # write_model_pairs' counts, with dpo.rejected_from = "model"


def stage_pairs(cfg: FedftConfig, model, tokenizer, dpo_dir: Path, log: Callable[[str], None] = print
                ) -> StagePairs:
    """The pairs of ``dpo.train_path`` and ``dpo.eval_path``, or (rejected_from = "model") rebuilt first."""
    d = cfg.dpo
    train_path, eval_path, origins = d.train_path, d.eval_path, None
    if d.rejected_from == "model":
        train_path, eval_path, origins = write_model_pairs(cfg, model, tokenizer, dpo_dir, log)
    # model-built training pairs were drawn from at most dpo.train_max_pairs prompts already
    train_limit = None if origins is not None else (d.train_max_pairs or None)
    train, _ = load_pairs(str(train_path), tokenizer, d.max_length, train_limit, d.seed)
    _, held_out = load_pairs(str(eval_path), tokenizer, d.max_length, d.eval_max_pairs, d.seed)
    return StagePairs(train, held_out, train_path, eval_path, origins)


def stage_summary(d: DpoConfig, pairs: StagePairs, result: DpoResult, before: dict, after: dict,
                  *, wall_s: float) -> dict:
    """dpo/summary.json: the settings, the pairs, the scores before and after, the times."""
    summary = {
        "steps": d.steps,
        "train_pairs": len(pairs.train),
        "eval_pairs": len(pairs.held_out),
        "train_path": str(pairs.train_path),
        "eval_path": str(pairs.eval_path),
        "rejected_from": d.rejected_from,
        "beta": d.beta,
        "learning_rate": d.learning_rate,
        "batch_size": d.batch_size,
        "train_wall_s": round(result.wall_s, 2),
        "wall_s": round(wall_s, 2),
        "final_train_loss": result.history[-1]["loss"] if result.history else None,
        **{f"{key}_{when}": scores[key] for when, scores in (("before", before), ("after", after))
           for key in ("pref_accuracy", "reward_margin", "likelihood_accuracy", "pref_accuracy_by_task")},
        "reference": "the federated SFT adapter, frozen (TRL's 'ref' adapter)",
        "reward_scale": "implicit rewards against the reference, so the federated SFT adapter scores 50%",
    }
    if pairs.origins is not None:
        summary["model_pairs"] = pairs.origins
    return summary
