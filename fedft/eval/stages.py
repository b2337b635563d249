"""Evaluate every stage of a run (base, local, centralized, federated, DPO) on the same held-out data.

For each model state, ``evaluate_stages`` measures: answer loss and perplexity (exp of the
mean answer-token loss) on the held-out SFT set; exact match overall, per task and, when
the training data says which institution mostly holds which task, per institution;
preference accuracy and mean reward margin of DPO's implicit reward against one reference
for all stages (the run's federated or centralized SFT adapter, the DPO reference, which
so scores 50%; the base model when there is neither) and the reference-free likelihood
accuracy (``fedft.score.preference.preference_scores``); a forgetting probe (perplexity on general
text the base model knew); and a few generated samples. The result is written atomically
to ``RUN_DIR/evaluation.json``. ``evaluate_run`` does the same from a finished run's files.
A state of ``None`` is the base model: the seeded initial adapter, whose B = 0 makes it
compute exactly the base (as summary.json's "base" entry does). Weights are never trained
here, and the model's adapter is restored afterwards. Nothing here imports flwr.

At the end of a run loop (``state`` / ``dpo_state``: adapter tensors held in memory)::

    inputs = stage_inputs(cfg, tokenizer)
    sources = inputs.pop("sources")
    evaluate_stages(cfg, {"base": None, "federated": state, "dpo": dpo_state}, out_dir=run_dir, **inputs)
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fedft.config import FedftConfig
from fedft.data.rows import DataError, Example
from fedft.eval.held_out import examples_fingerprint, known_answers
from fedft.rundir import write_evaluation
from fedft.score.answers import answer_loss, exact_match, generate_answers, perplexity
from fedft.score.preference import preference_scores, scored_logps

STAGE_ORDER = ("base", "local", "centralized", "federated", "dpo")

StageState = dict[str, torch.Tensor] | list[dict[str, torch.Tensor]] | None


def institution_tasks(rows: list[dict], institution_column: str, task_column: str) -> dict[str, dict]:
    """For each institution: its most frequent task, that task's share of its rows, its row count.

    Empty when the rows lack either column.
    """
    counts: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        inst, task = row.get(institution_column), row.get(task_column)
        if inst is not None and task is not None:
            counts[str(inst)][str(task)] += 1
    out = {}
    for inst in sorted(counts):
        task, n = counts[inst].most_common(1)[0]
        total = sum(counts[inst].values())
        out[inst] = {"task": task, "share": n / total, "rows": total}
    return out


def by_institution(em_by_task: dict[str, float], institutions: dict[str, dict]) -> dict[str, float]:
    """Exact match on the task each institution mostly holds, keyed by institution."""
    return {inst: em_by_task[info["task"]] for inst, info in institutions.items()
            if info["task"] in em_by_task}


def text_examples(texts: list[str], tokenizer, max_length: int, source: str = "general") -> list[Example]:
    """Plain texts as language-modelling examples: every token after the first is scored.

    Token ids are BOS + text + EOS (as the demo base was pretrained), cut to ``max_length``.
    """
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:max_length]
        if len(ids) >= 2:
            out.append(Example(input_ids=ids, labels=list(ids), prompt_ids=ids[:1], reference=text,
                               task="general", source=f"{source}:{i + 1}"))
    return out


def sample_indices(examples: list[Example], n: int) -> list[int]:
    """``n`` example indices, taken round-robin over tasks in first-seen order (deterministic)."""
    by_task: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_task.setdefault(e.task, []).append(i)
    queues = list(by_task.values())
    picked: list[int] = []
    depth = 0
    while len(picked) < min(n, len(examples)):
        picked += [q[depth] for q in queues if depth < len(q)][: n - len(picked)]
        depth += 1
    return picked


def mean_metrics(per_client: list[dict]) -> dict:
    """Metrics of several adapters (a local-only run's clients) averaged key by key.

    Numbers are averaged, dicts of numbers averaged per key; perplexities are re-derived
    from the mean losses; samples come from the first client.
    """
    out: dict = {}
    for key, first in per_client[0].items():
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            out[key] = sum(m[key] for m in per_client) / len(per_client)
        elif isinstance(first, dict):
            out[key] = {k: sum(m[key][k] for m in per_client) / len(per_client) for k in first}
    out["perplexity"] = perplexity(out["loss"])
    if "general_loss" in out:
        out["general_perplexity"] = perplexity(out["general_loss"])
    out["exact_match_by_client"] = {f"client{i}": m["exact_match"] for i, m in enumerate(per_client)}
    out["clients"] = len(per_client)
    out["samples"] = per_client[0]["samples"]
    return out


def own_model_scores(per_client: list[dict], institutions: dict[str, dict]) -> dict[str, float]:
    """Client i's exact match on institution i's task: each institution's own local-only adapter.

    Client i is the i-th institution in sorted order, as ``fedft.data.partition`` numbers a natural
    partition; empty unless there is one adapter per institution.
    """
    if len(per_client) != len(institutions):
        return {}
    return {inst: m["exact_match_by_institution"][inst]
            for inst, m in zip(sorted(institutions), per_client, strict=True)
            if inst in m.get("exact_match_by_institution", {})}


def ordered_stage_names(names) -> list[str]:
    """Known stages in pipeline order (base, local, centralized, federated, dpo), others after."""
    known = [s for s in STAGE_ORDER if s in names]
    return known + [s for s in names if s not in STAGE_ORDER]


# ---------------------------------------------------------------------------------------
# Scoring one state
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalData:
    """Everything a stage is scored on; ``pairs`` / ``general`` may be empty."""

    examples: list[Example]
    pairs: list
    general: list[Example]
    institutions: dict[str, dict]
    beta: float
    num_samples: int
    reference: str = "base"  # the stage whose log-probs define the implicit reward
    reference_state: dict[str, torch.Tensor] | None = None  # its adapter tensors
    reference_logps: tuple | None = None  # its (chosen, rejected) log-probs on ``pairs``


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor] | None) -> bool:
    """Whether two adapter states hold the same tensors (names and values)."""
    return b is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def score_state(model, tokenizer, state: dict[str, torch.Tensor], data: EvalData,
                known: dict | None = None) -> dict:
    """Every metric of one adapter state (loaded into ``model``).

    A state equal to the preference reference takes its log-probs, ``data.reference_logps``:
    on the CPU, re-scoring the same 4-bit model after other adapters were loaded can differ
    by a few hundredths, which would turn the reference's exact ties into wins and losses.
    ``known`` (``fedft.eval.held_out.known_answers``): this state's greedy answers and loss
    on ``data.examples``, already computed by the run's held-out evaluation.
    """
    from fedft.model.adapter import set_adapter_state

    set_adapter_state(model, state)
    pad_id = tokenizer.pad_token_id
    if known is not None:
        predictions, loss = known["predictions"], known["loss"]
    else:
        predictions = generate_answers(model, tokenizer, data.examples)
        loss = answer_loss(model, data.examples, pad_id)
    overall, by_task = exact_match(predictions, data.examples)
    metrics = {"loss": loss, "perplexity": perplexity(loss), "exact_match": overall,
               "exact_match_by_task": by_task}
    if data.institutions:
        metrics["exact_match_by_institution"] = by_institution(by_task, data.institutions)
    if data.pairs:
        is_reference = same_state(state, data.reference_state)
        policy = data.reference_logps if is_reference else scored_logps(model, data.pairs, pad_id)
        prefs = preference_scores(policy, data.reference_logps, [p.task for p in data.pairs], data.beta)
        metrics.update({k: prefs[k] for k in ("pref_accuracy", "reward_margin", "likelihood_accuracy",
                                              "pref_accuracy_by_task")})
    if data.general:
        general = answer_loss(model, data.general, pad_id)
        metrics.update({"general_loss": general, "general_perplexity": perplexity(general)})
    metrics["samples"] = [
        {"prompt": tokenizer.decode(data.examples[i].prompt_ids, skip_special_tokens=True),
         "reference": data.examples[i].reference, "prediction": predictions[i],
         "task": data.examples[i].task}
        for i in sample_indices(data.examples, data.num_samples)
    ]
    return metrics


def score_stage(model, tokenizer, state: StageState, initial: dict[str, torch.Tensor], data: EvalData,
                known: dict | None = None) -> dict:
    """One stage: ``None`` is the base, a list is several adapters (metrics averaged).

    ``known``: a single state's answers and loss from the run's held-out evaluation.
    """
    started = time.time()
    if isinstance(state, list):
        if not state:
            raise ValueError("a stage given as a list of adapters needs at least one adapter")
        per_client = [score_state(model, tokenizer, s, data) for s in state]
        metrics = mean_metrics(per_client)
        own = own_model_scores(per_client, data.institutions)
        if own:
            metrics["exact_match_own_model_by_institution"] = own
    else:
        metrics = score_state(model, tokenizer, initial if state is None else state, data, known)
    metrics["seconds"] = time.time() - started
    return metrics


def reference_stage(stages: dict[str, StageState]) -> str:
    """The stage implicit rewards are measured against: the SFT model DPO starts from, else the base."""
    for name in ("federated", "centralized"):
        if isinstance(stages.get(name), dict):
            return name
    return "base"


def with_reference(model, tokenizer, stages: dict[str, StageState], initial: dict[str, torch.Tensor],
                   data: EvalData) -> EvalData:
    """``data`` with the reference stage's log-probs on the pairs (unchanged without pairs)."""
    import dataclasses

    from fedft.model.adapter import set_adapter_state

    if not data.pairs:
        return data
    name = reference_stage(stages)
    state = initial if name == "base" else stages[name]
    set_adapter_state(model, state)
    logps = scored_logps(model, data.pairs, tokenizer.pad_token_id)
    return dataclasses.replace(data, reference=name, reference_state=state, reference_logps=logps)


def evaluate_stages(cfg: FedftConfig, stages: dict[str, StageState], *, eval_examples: list[Example],
                    pairs: list | None = None, general_texts: list[str] | None = None, num_samples: int = 5,
                    institutions: dict[str, dict] | None = None, out_dir: Path | None = None,
                    notes: list[str] | None = None, progress: Callable[[str], None] = print,
                    scored: dict[str, dict] | None = None) -> dict:
    """Score every stage on the same data; write ``out_dir/evaluation.json`` when given.

    ``stages`` maps a stage name to its adapter tensors, ``None`` (the base model) or a
    list of adapters (scored one by one, metrics averaged). ``pairs`` are tokenized
    preference pairs (``fedft.data.preferences.tokenize_pair``); ``general_texts`` plain texts
    for the forgetting probe. ``institutions`` defaults to what the training files say.
    ``scored`` maps a stage to the run's held-out evaluation of that very state
    (``fedft.eval.held_out.evaluate_model``); its answers and loss are reused when they answer
    ``eval_examples`` (a note in the result says which stages).
    """
    from fedft.model.adapter import get_adapter_state, set_adapter_state
    from fedft.model.load import cached_peft_model, initial_adapter_state, model_spec

    if not eval_examples:
        raise DataError("evaluate_stages: no held-out examples to score (data.eval_file)")
    started = time.time()
    spec = model_spec(cfg)
    model, tokenizer = cached_peft_model(spec)
    previous, initial = get_adapter_state(model), initial_adapter_state(spec)
    notes = list(notes or [])
    data = EvalData(
        examples=eval_examples, pairs=list(pairs or []),
        general=text_examples(general_texts or [], tokenizer, cfg.data.max_length),
        institutions=training_institutions(cfg) if institutions is None else institutions,
        beta=cfg.dpo.beta if hasattr(cfg, "dpo") else 0.1, num_samples=num_samples,
    )
    results = {}
    try:
        data = with_reference(model, tokenizer, stages, initial, data)
        reused, fingerprint = [], examples_fingerprint(eval_examples)
        for name in ordered_stage_names(stages):
            known = None if isinstance(stages[name], list) else known_answers((scored or {}).get(name), fingerprint)
            results[name] = score_stage(model, tokenizer, stages[name], initial, data, known)
            reused += [name] if known is not None else []
            progress(stage_line(name, results[name]))
        if reused:
            notes.append(f"answers and held-out loss of {', '.join(reused)} taken from the run's own held-out "
                         "evaluation of the same adapter on the same examples (round 0 / the last round)")
    finally:
        set_adapter_state(model, previous)
    evaluation = {
        "stages": results,
        "stage_order": list(results),
        "eval_examples": len(eval_examples),
        "preference_pairs": len(data.pairs),
        "preference_reference": data.reference if data.pairs else None,
        "general_texts": len(data.general),
        "institutions": data.institutions,
        "beta": data.beta,
        "notes": notes,
        "wall_s": time.time() - started,
    }
    if out_dir is not None:
        write_evaluation(Path(out_dir), evaluation)
    return evaluation


def stage_line(name: str, m: dict) -> str:
    """One progress line for a scored stage."""
    parts = [f"eval {name:<12} loss {m['loss']:.3f} (ppl {m['perplexity']:.2f})",
             f"exact match {100 * m['exact_match']:.1f}%"]
    if "pref_accuracy" in m:
        parts.append(f"pref acc {100 * m['pref_accuracy']:.1f}% margin {m['reward_margin']:.3f} "
                     f"chosen first {100 * m['likelihood_accuracy']:.1f}%")
    if "general_perplexity" in m:
        parts.append(f"general ppl {m['general_perplexity']:.2f}")
    parts.append(f"{m['seconds']:.1f}s")
    return "  ".join(parts)


def training_institutions(cfg: FedftConfig) -> dict[str, dict]:
    """``institution_tasks`` of the configured training files; empty when they are not here."""
    from fedft.data.rows import read_rows

    paths = [Path(p) for p in cfg.data.train_files]
    if not paths or not all(p.exists() for p in paths):
        return {}
    column = cfg.data.partition_by if cfg.data.partition == "natural" else "institution"
    rows = [row for p in paths for row in read_rows(p, cfg.data.columns)]
    return institution_tasks(rows, column, cfg.data.task_column)
