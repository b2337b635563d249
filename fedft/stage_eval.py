"""Evaluate every stage of a run (base, local, centralized, federated, DPO) on the same held-out data.

For each model state, ``evaluate_stages`` measures: answer loss and perplexity (exp of the
mean answer-token loss) on the held-out SFT set; exact match overall, per task and, when
the training data says which institution mostly holds which task, per institution;
preference accuracy and mean reward margin of DPO's implicit reward against one reference
for all stages (the run's federated or centralized SFT adapter, the DPO reference, which
so scores 50%; the base model when there is neither) and the reference-free likelihood
accuracy (``fedft.dpo.preference_scores``); a forgetting probe (perplexity on general
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

import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fedft.checkpoint import atomic_write_json
from fedft.config import FedftConfig
from fedft.data import DataError, Example
from fedft.dpo import MODEL_PAIR_FILES, preference_scores, scored_logps
from fedft.dpo import load_pairs as load_preference_pairs
from fedft.evaluate import answer_loss, exact_match, generate_answers

EVALUATION_FILE = "evaluation.json"
STAGE_ORDER = ("base", "local", "centralized", "federated", "dpo")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The demo base (``fedft.demo.build_base_model(seed=0)``) pretrained on pretraining_text(20000, seed=1).
DEMO_PRETRAIN_LINES, DEMO_PRETRAIN_SEED = 20000, 1
GENERAL_TEXT_SEED = 1001  # never used to train the demo base
DEMO_DATA_DIR = Path(__file__).resolve().parent.parent / "simulations" / "data" / "demo"
DEMO_GENERAL_FILE = DEMO_DATA_DIR / "general.jsonl"
DEMO_PAIRS_FILE = DEMO_DATA_DIR / "prefs-eval.jsonl"

StageState = dict[str, torch.Tensor] | list[dict[str, torch.Tensor]] | None


# ---------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------

def perplexity(loss: float) -> float:
    """exp(mean token loss); ``inf`` where that overflows a float."""
    return math.exp(loss) if loss < 700 else float("inf")


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

    Client i is the i-th institution in sorted order, as ``fedft.partition`` numbers a natural
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


def score_state(model, tokenizer, state: dict[str, torch.Tensor], data: EvalData) -> dict:
    """Every metric of one adapter state (loaded into ``model``).

    A state equal to the preference reference takes its log-probs, ``data.reference_logps``:
    on the CPU, re-scoring the same 4-bit model after other adapters were loaded can differ
    by a few hundredths, which would turn the reference's exact ties into wins and losses.
    """
    from fedft.model import set_adapter_state

    set_adapter_state(model, state)
    pad_id = tokenizer.pad_token_id
    predictions = generate_answers(model, tokenizer, data.examples)
    overall, by_task = exact_match(predictions, data.examples)
    loss = answer_loss(model, data.examples, pad_id)
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


def score_stage(model, tokenizer, state: StageState, initial: dict[str, torch.Tensor], data: EvalData) -> dict:
    """One stage: ``None`` is the base, a list is several adapters (metrics averaged)."""
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
        metrics = score_state(model, tokenizer, initial if state is None else state, data)
    metrics["seconds"] = time.time() - started
    return metrics


# ---------------------------------------------------------------------------------------
# The entry point the run loop calls
# ---------------------------------------------------------------------------------------

def training_institutions(cfg: FedftConfig) -> dict[str, dict]:
    """``institution_tasks`` of the configured training files; empty when they are not here."""
    from fedft.data import read_jsonl

    paths = [Path(p) for p in cfg.data.train_files]
    if not paths or not all(p.is_file() for p in paths):
        return {}
    column = cfg.data.partition_by if cfg.data.partition == "natural" else "institution"
    rows = [row for p in paths for row in read_jsonl(p)]
    return institution_tasks(rows, column, cfg.data.task_column)


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

    from fedft.model import set_adapter_state

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
                    notes: list[str] | None = None, progress: Callable[[str], None] = print) -> dict:
    """Score every stage on the same data; write ``out_dir/evaluation.json`` when given.

    ``stages`` maps a stage name to its adapter tensors, ``None`` (the base model) or a
    list of adapters (scored one by one, metrics averaged). ``pairs`` are tokenized
    preference pairs (``fedft.preferences.tokenize_pair``); ``general_texts`` plain texts
    for the forgetting probe. ``institutions`` defaults to what the training files say.
    """
    from fedft.model import cached_peft_model, get_adapter_state, initial_adapter_state, set_adapter_state

    if not eval_examples:
        raise DataError("evaluate_stages: no held-out examples to score (data.eval_file)")
    started = time.time()
    model, tokenizer = cached_peft_model(cfg)
    previous, initial = get_adapter_state(model), initial_adapter_state(cfg)
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
        for name in ordered_stage_names(stages):
            results[name] = score_stage(model, tokenizer, stages[name], initial, data)
            progress(stage_line(name, results[name]))
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


def write_evaluation(out_dir: Path, evaluation: dict) -> Path:
    """``out_dir/evaluation.json``, atomically."""
    path = Path(out_dir) / EVALUATION_FILE
    atomic_write_json(path, evaluation)
    return path


def load_evaluation(run_dir: Path) -> dict | None:
    """A run's evaluation.json, or None when it has none."""
    path = Path(run_dir) / EVALUATION_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); rerun the evaluation") from err


# ---------------------------------------------------------------------------------------
# Inputs from files
# ---------------------------------------------------------------------------------------

def demo_general_texts(num_lines: int = 200, seed: int = GENERAL_TEXT_SEED) -> list[str]:
    """Held-out generic text of the demo base's kind: ``pretraining_text`` lines it never saw."""
    from fedft.demo import pretraining_text

    if seed == DEMO_PRETRAIN_SEED:
        raise ValueError(f"seed {seed} is the demo base's pretraining seed; the probe must be held out")
    seen = set(pretraining_text(DEMO_PRETRAIN_LINES, DEMO_PRETRAIN_SEED))
    out: list[str] = []
    for line in pretraining_text(num_lines * 20, seed):
        if line not in seen and line not in out:
            out.append(line)
            if len(out) == num_lines:
                return out
    raise ValueError(f"could not draw {num_lines} unseen general lines")  # pragma: no cover


def write_demo_general_text(path: Path = DEMO_GENERAL_FILE, num_lines: int = 200) -> Path:
    """Write the demo's forgetting probe as ``{"text": ...}`` JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in demo_general_texts(num_lines)))
    return path


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
    from fedft.report import load_summary

    run_dir = Path(run_dir)
    strategy = load_summary(run_dir).get("strategy")
    adapter = run_dir / "adapter"
    if strategy == "local":
        clients = sorted(adapter.glob("client*/"), key=lambda p: int(p.name[len("client"):] or 0))
        if not clients:
            raise FileNotFoundError(f"{adapter} has no clientN/ adapters: is {run_dir} a finished local-only run?")
        states: dict[str, StageState] = {"local": [load_adapter_state(c) for c in clients]}
    else:
        states = {"centralized" if strategy == "centralized" else "federated": load_adapter_state(adapter)}
    if (run_dir / "dpo" / "adapter").is_dir():
        states["dpo"] = load_adapter_state(run_dir / "dpo" / "adapter")
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
    """(texts, where from): the named file, else the demo's probe for the demo base, else none."""
    if path is not None:
        return read_general_texts(path), str(path)
    if cfg.model.path == "demo":
        if DEMO_GENERAL_FILE.is_file():
            return read_general_texts(DEMO_GENERAL_FILE), str(DEMO_GENERAL_FILE)
        return demo_general_texts(), f"fedft.stage_eval.demo_general_texts(seed={GENERAL_TEXT_SEED})"
    return [], None


def run_pairs_path(run_dir: Path) -> Path | None:
    """The held-out pairs a run's DPO stage built from its model's answers, if it did."""
    path = Path(run_dir) / "dpo" / MODEL_PAIR_FILES[1]
    return path if path.is_file() else None


def default_pairs_path(cfg: FedftConfig, path: Path | None) -> Path | None:
    """The named pairs file, else dpo.eval_path, else the demo's held-out pairs for the demo base."""
    if path is not None:
        return Path(path)
    dpo = getattr(cfg, "dpo", None)
    if dpo is not None and dpo.eval_path:
        return Path(dpo.eval_path)
    if cfg.model.path == "demo" and DEMO_PAIRS_FILE.is_file():
        return DEMO_PAIRS_FILE
    return None


def stage_inputs(cfg: FedftConfig, tokenizer, *, general_text: Path | None = None,
                 pairs_file: Path | None = None) -> dict:
    """What ``evaluate_stages`` scores on, from the config's files (and the demo's defaults).

    Returns keyword arguments for ``evaluate_stages`` (``eval_examples``, ``pairs``,
    ``general_texts``, ``notes``) plus ``sources``: where the general text and pairs came from.
    """
    from fedft.evaluate import load_eval_examples

    notes: list[str] = []
    texts, text_source = default_general_texts(cfg, general_text)
    if not texts:
        notes.append("no general text for the forgetting probe: pass --general-text FILE")
    pairs_path, pairs = default_pairs_path(cfg, pairs_file), []
    if pairs_path is None:
        notes.append("no preference pairs: pass --pairs FILE (or set dpo.eval_path)")
    else:
        dpo = getattr(cfg, "dpo", None)
        pairs = load_pairs(pairs_path, tokenizer, dpo.max_length if dpo else cfg.data.max_length,
                           dpo.eval_max_pairs if dpo else None, dpo.seed if dpo else 0)
    return {"eval_examples": load_eval_examples(cfg, tokenizer), "pairs": pairs, "general_texts": texts,
            "notes": notes, "sources": {"eval_file": cfg.data.eval_file, "general_text_source": text_source,
                                        "preference_file": str(pairs_path) if pairs_path else None}}


def evaluate_run(run_dir: Path, *, compare: list[Path] = (), general_text: Path | None = None,
                 pairs_file: Path | None = None, num_samples: int = 5,
                 progress: Callable[[str], None] = print) -> dict:
    """Evaluate a finished run's stages (plus ``compare`` runs' adapters) and write evaluation.json."""
    from fedft.export import load_run_config
    from fedft.model import cached_peft_model

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
    _, tokenizer = cached_peft_model(cfg)
    pairs_file = pairs_file or run_pairs_path(run_dir)
    inputs = stage_inputs(cfg, tokenizer, general_text=general_text, pairs_file=pairs_file)
    files = inputs.pop("sources")
    evaluation = evaluate_stages(cfg, stages, num_samples=num_samples, progress=progress, **inputs)
    evaluation.update({"stage_sources": sources, **files})
    write_evaluation(run_dir, evaluation)
    return evaluation
