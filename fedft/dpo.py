"""The centralized DPO stage: preference-tune the federated SFT adapter against its frozen self.

After the federated rounds, one party holding preference pairs (a prompt, a preferred and a
dispreferred answer) runs Direct Preference Optimization (Rafailov et al., 2023,
arXiv:2305.18290) on the global LoRA adapter. The policy starts from the federated SFT
adapter; the reference is the same adapter frozen, a second PEFT adapter named ``"ref"``
on the same 4-bit base (no second copy of the model). Training runs through TRL's
``DPOTrainer`` (its sigmoid loss is ``dpo_loss`` below); scoring is our own:
``preference_scores`` gives DPO's implicit-reward accuracy against a reference (the
federated SFT adapter, so it scores 50% by definition, and any other stage is measured on
the same scale) and the reference-free likelihood accuracy (how often the model itself
ranks the chosen answer first). With ``dpo.rejected_from = "model"`` the pairs' rejected
answers are first replaced by the federated model's own mistakes (``fedft.model_pairs``).
``run_dpo_stage`` is the stage as the run loop calls it: (build pairs,) score, train,
score, save. Nothing here knows about Flower or the network, and the math stays pure.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fedft.config import DpoConfig, FedftConfig
from fedft.data import IGNORE_INDEX
from fedft.model import MissingExtraError, get_adapter_state, set_adapter_state
from fedft.preferences import PreferencePair, TokenizedPair, tokenize_pair, trl_rows

REFERENCE_ADAPTER = "ref"  # the frozen copy TRL adds beside the trained "default" adapter
POLICY_ADAPTER = "default"


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss and the implicit rewards of each answer (Rafailov et al., eq. 7).

    reward(y) = beta * (log pi(y|x) - log pi_ref(y|x)), summed over answer tokens;
    loss = mean over pairs of -log sigmoid(reward(chosen) - reward(rejected)).
    TRL's ``DPOTrainer`` with ``loss_type="sigmoid"`` and ``label_smoothing=0`` computes the
    same quantity (``-F.logsigmoid(beta * (chosen_logratios - rejected_logratios))``) and logs
    the same rewards (``rewards/chosen``, ``rewards/margins``). With ``dpo.sft_weight > 0``
    training adds TRL's ``"sft"`` term, sft_weight * the chosen answers' mean token NLL (RPO,
    Pang et al. 2024, arXiv:2404.19733), which this function leaves out.
    Returns (loss, chosen rewards, rejected rewards); the rewards carry no gradient.
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def pair_batch(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels``: every chosen row, then every rejected.

    Labels are -100 on the prompt and padding, so only answer tokens count.
    """
    sequences = [(p.chosen_ids, p.prompt_len) for p in pairs] + [(p.rejected_ids, p.prompt_len) for p in pairs]
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
        attention[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log-probabilities of each row's labelled (answer) tokens, shape (rows,), float32."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits
    targets = batch["labels"][:, 1:].to(device)
    mask = targets != IGNORE_INDEX
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logps = torch.gather(logps, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(dim=1)


@torch.no_grad()
def pair_logps(model, pairs: list[TokenizedPair], pad_id: int, batch_size: int = 32
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) answer log-probabilities under the model's active adapter(s)."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        logps = sequence_logps(model, pair_batch(chunk, pad_id)).cpu()
        chosen.append(logps[:len(chunk)])
        rejected.append(logps[len(chunk):])
    return torch.cat(chosen), torch.cat(rejected)


@contextlib.contextmanager
def eval_mode(model):
    """``model.eval()`` for the block, then the previous train/eval mode again."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def scored_logps(model, pairs: list[TokenizedPair], pad_id: int, *, base: bool = False,
                 batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``pair_logps`` in eval mode, under the active adapter or (``base``) with it disabled."""
    with eval_mode(model), (model.disable_adapter() if base else contextlib.nullcontext()):
        return pair_logps(model, pairs, pad_id, batch_size)


def preference_scores(policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
                      tasks: list[str], beta: float) -> dict:
    """Preference metrics from (chosen, rejected) answer log-probs of a policy and a reference.

    The implicit reward of an answer is beta * (log pi(y|x) - log pi_ref(y|x)) (DPO's own
    reward). ``pref_accuracy``: share of pairs whose chosen answer out-earns the rejected one,
    an exact tie counting one half (so the reference itself scores exactly 50%);
    ``reward_margin``: mean reward(chosen) - reward(rejected). ``likelihood_accuracy`` needs
    no reference: the share of pairs where the policy gives the chosen answer the higher
    log-probability, i.e. what the model itself would pick. Pure.
    """
    _, chosen_rewards, rejected_rewards = dpo_loss(policy[0], policy[1], reference[0], reference[1], beta)
    margins = chosen_rewards - rejected_rewards
    wins = (margins > 0).float() + 0.5 * (margins == 0).float()
    gaps = policy[0] - policy[1]
    likely = (gaps > 0).float() + 0.5 * (gaps == 0).float()
    by_task: dict[str, list[float]] = {}
    for task, win in zip(tasks, wins.tolist(), strict=True):
        by_task.setdefault(task, []).append(win)
    return {
        "pref_accuracy": wins.mean().item(),
        "reward_margin": margins.mean().item(),
        "likelihood_accuracy": likely.mean().item(),
        "pref_accuracy_by_task": {t: sum(w) / len(w) for t, w in sorted(by_task.items())},
        "pairs": len(tasks),
    }


def preference_metrics(model, pairs: list[TokenizedPair], pad_id: int, *, beta: float = 0.1,
                       reference: tuple[torch.Tensor, torch.Tensor] | None = None, batch_size: int = 32) -> dict:
    """``preference_scores`` of the model's active adapter on ``pairs``.

    ``reference`` is the reference model's (chosen, rejected) log-probs on the same pairs
    (``scored_logps``); without it the reference is the base model (adapter disabled).
    """
    policy = scored_logps(model, pairs, pad_id, batch_size=batch_size)
    if reference is None:
        reference = scored_logps(model, pairs, pad_id, base=True, batch_size=batch_size)
    return preference_scores(policy, reference, [p.task for p in pairs], beta)


@dataclass(frozen=True)
class DpoResult:
    """What ``train_dpo`` produced: the trained adapter and one history row per step."""

    state: dict[str, torch.Tensor]
    history: list[dict]
    wall_s: float


HISTORY_KEYS = {  # TRL log key -> history key
    "loss": "loss",
    "rewards/accuracies": "reward_accuracy",
    "rewards/margins": "reward_margin",
    "rewards/chosen": "chosen_reward",
    "rewards/rejected": "rejected_reward",
    "logps/chosen": "chosen_logps",
    "logps/rejected": "rejected_logps",
    "grad_norm": "grad_norm",
    "learning_rate": "learning_rate",
}


def _import_trl():
    try:
        import trl
        from trl import DPOConfig as TrlDpoConfig
        from trl import DPOTrainer
    except ImportError as err:  # pragma: no cover - trl is a core dependency
        raise MissingExtraError("the DPO stage (dpo.enabled) needs TRL: pip install 'trl>=1.16,<2'") from err
    return trl, TrlDpoConfig, DPOTrainer


def _drop_reference(model) -> None:
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.set_adapter(POLICY_ADAPTER)
        model.delete_adapter(REFERENCE_ADAPTER)


def train_dpo(
    model,
    tokenizer,
    pairs: list[PreferencePair],
    cfg: DpoConfig,
    start_state: dict[str, torch.Tensor],
    *,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, dict], None] | None = None,
) -> DpoResult:
    """DPO on ``pairs`` from ``start_state`` (the federated SFT adapter), against that adapter frozen.

    TRL's ``DPOTrainer`` sees a PEFT model whose ``default`` adapter holds ``start_state``
    and copies it into a second adapter ``"ref"`` with no gradient: the reference. Two
    things of TRL's are undone: it casts a quantized model's trainable LoRA tensors to
    bfloat16 (QLoRA-paper practice on GPUs; on the CPU it only loses precision, and the
    cached model must keep float32 for the later evaluation), and the ``"ref"`` adapter is
    deleted when training ends. ``on_step(step, row)`` is called after every optimizer
    step, with the ``ref`` adapter still present. Returns the trained adapter tensors and
    per-step history on the step's batch: ``loss`` (the DPO loss, plus sft_weight * NLL when
    ``dpo.sft_weight > 0``), ``reward_accuracy`` (TRL's: a tie counts as a miss),
    ``reward_margin`` (beta-scaled, against the frozen reference), ... The Trainer seeds
    Python's, NumPy's and torch's global RNGs with ``dpo.seed``.
    """
    if not pairs:
        raise ValueError("train_dpo: no preference pairs to train on")
    trl, TrlDpoConfig, DPOTrainer = _import_trl()
    import datasets
    from transformers import PrinterCallback, TrainerCallback

    set_adapter_state(model, start_state)
    device = next(model.parameters()).device
    history: list[dict] = []
    start = time.time()

    class _Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            row = {"step": state.global_step}
            row.update({ours: float(logs[theirs]) for theirs, ours in HISTORY_KEYS.items() if theirs in logs})
            row["elapsed_s"] = round(time.time() - start, 3)
            history.append(row)
            if on_step is not None:
                on_step(state.global_step, row)
            if state.global_step % cfg.log_every == 0 or state.global_step in (1, cfg.steps):
                log(f"dpo step {state.global_step}/{cfg.steps}  loss {row['loss']:.4f}  "
                    f"reward acc {row.get('reward_accuracy', 0):.2f}  margin {row.get('reward_margin', 0):.3f}  "
                    f"{row['elapsed_s']:.0f}s")

    progress_bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory(prefix="fedft-dpo-") as scratch:
            args = TrlDpoConfig(
                output_dir=scratch, max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
                gradient_accumulation_steps=1, learning_rate=cfg.learning_rate,
                lr_scheduler_type=cfg.lr_schedule, warmup_steps=cfg.warmup_steps, weight_decay=0.0,
                max_grad_norm=cfg.max_grad_norm,  # 0: no clipping (the Trainer clips only when > 0)
                beta=cfg.beta, loss_type=["sigmoid", "sft"] if cfg.sft_weight > 0 else ["sigmoid"],
                loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight > 0 else None, max_length=cfg.max_length,
                seed=cfg.seed, data_seed=cfg.seed, logging_steps=1, save_strategy="no",
                report_to="none", disable_tqdm=True, use_cpu=device.type == "cpu", bf16=False, fp16=False,
                gradient_checkpointing=False, dataloader_num_workers=0,
            )
            trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(trl_rows(pairs)),
                                 processing_class=tokenizer, callbacks=[_Progress()])
            trainer.remove_callback(PrinterCallback)
            for param in model.parameters():  # undo TRL's bfloat16 cast of the trainable LoRA tensors
                if param.requires_grad and param.dtype != torch.float32:
                    param.data = param.data.to(torch.float32)
            log(f"dpo: {len(pairs)} pairs, {cfg.steps} steps of {cfg.batch_size}, beta {cfg.beta}, "
                f"lr {cfg.learning_rate} (TRL {trl.__version__}, reference = the starting adapter, frozen)")
            trainer.train()
        state = get_adapter_state(model)
    finally:
        _drop_reference(model)
        model.eval()
        if progress_bars:
            datasets.utils.logging.enable_progress_bar()
    return DpoResult(state=state, history=history, wall_s=time.time() - start)


def _even_subset(n: int, max_items: int | None, seed: int) -> list[int]:
    """All of ``range(n)``, or ``max_items`` of them drawn evenly (sorted), reproducibly."""
    if max_items is None or n <= max_items:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), max_items))


def load_pairs(path: str, tokenizer, max_length: int, max_pairs: int | None = None, seed: int = 0
               ) -> tuple[list[PreferencePair], list[TokenizedPair]]:
    """Read a preference file (at most ``max_pairs`` rows, drawn evenly) and tokenize it."""
    from fedft.preferences import read_preference_jsonl

    pairs = read_preference_jsonl(path)
    pairs = [pairs[i] for i in _even_subset(len(pairs), max_pairs, seed)]
    return pairs, [tokenize_pair(p, tokenizer, max_length) for p in pairs]


MODEL_PAIR_FILES = ("pairs-train.jsonl", "pairs-eval.jsonl")  # in RUN_DIR/dpo/, rejected_from = "model"


def write_model_pairs(cfg: FedftConfig, model, tokenizer, dpo_dir: Path, log: Callable[[str], None] = print
                      ) -> tuple[Path, Path, dict]:
    """Rebuild the train and held-out pairs with the model's own wrong answers (``fedft.model_pairs``).

    The model's active adapter is the one sampled (the federated SFT adapter). Held-out
    pairs are first cut to ``dpo.eval_max_pairs`` (as ``load_pairs`` draws them) and get one
    wrong answer each; training prompts get up to ``dpo.negatives_per_prompt``. Writes
    ``dpo_dir/pairs-train.jsonl`` and ``pairs-eval.jsonl`` atomically; returns their paths
    and the counts of where the rejected answers came from.
    """
    from fedft.checkpoint import atomic_write_jsonl
    from fedft.data import json_lines
    from fedft.model_pairs import SamplingSettings, model_error_rows
    from fedft.preferences import pair_from_row

    d = cfg.dpo
    settings = SamplingSettings(samples=d.samples, temperature=d.temperature, seed=d.seed)
    paths, counts = [], {}
    for name, source, per_prompt, limit in (("train", d.train_path, d.negatives_per_prompt, None),
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
    from fedft.checkpoint import atomic_write_json, atomic_write_jsonl
    from fedft.model import cached_peft_model, save_adapter

    d = cfg.dpo
    dpo_dir = Path(out_dir) / "dpo"
    model, tokenizer = cached_peft_model(cfg)
    pad_id = tokenizer.pad_token_id
    start = time.time()
    set_adapter_state(model, sft_adapter_state)
    train_path, eval_path, origins = d.train_path, d.eval_path, None
    if d.rejected_from == "model":
        train_path, eval_path, origins = write_model_pairs(cfg, model, tokenizer, dpo_dir, log)
    train_pairs, _ = load_pairs(str(train_path), tokenizer, d.max_length)
    _, held_out = load_pairs(str(eval_path), tokenizer, d.max_length, d.eval_max_pairs, d.seed)
    tasks = [p.task for p in held_out]
    reference = scored_logps(model, held_out, pad_id)
    before = preference_scores(reference, reference, tasks, d.beta)
    log(f"dpo: the federated SFT adapter (the reference) ranks the chosen answer first on "
        f"{before['likelihood_accuracy']:.1%} of {len(held_out)} held-out pairs")
    result = train_dpo(model, tokenizer, train_pairs, d, sft_adapter_state, log=log)
    set_adapter_state(model, result.state)
    after = preference_scores(scored_logps(model, held_out, pad_id), reference, tasks, d.beta)
    log(f"dpo: held-out preference accuracy (implicit reward vs the reference) 50.0% -> "
        f"{after['pref_accuracy']:.1%}; chosen ranked first {before['likelihood_accuracy']:.1%} -> "
        f"{after['likelihood_accuracy']:.1%}")
    save_adapter(model, result.state, dpo_dir / "adapter")
    atomic_write_jsonl(dpo_dir / "history.jsonl", result.history)
    summary = {
        "steps": d.steps,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(held_out),
        "train_path": str(train_path),
        "eval_path": str(eval_path),
        "rejected_from": d.rejected_from,
        "beta": d.beta,
        "learning_rate": d.learning_rate,
        "batch_size": d.batch_size,
        "train_wall_s": round(result.wall_s, 2),
        "wall_s": round(time.time() - start, 2),
        "final_train_loss": result.history[-1]["loss"] if result.history else None,
        **{f"{key}_{when}": scores[key] for when, scores in (("before", before), ("after", after))
           for key in ("pref_accuracy", "reward_margin", "likelihood_accuracy", "pref_accuracy_by_task")},
        "reference": "the federated SFT adapter, frozen (TRL's 'ref' adapter)",
        "reward_scale": "implicit rewards against the reference, so the federated SFT adapter scores 50%",
    }
    if origins is not None:
        summary["model_pairs"] = origins
    atomic_write_json(dpo_dir / "summary.json", summary)
    return summary
