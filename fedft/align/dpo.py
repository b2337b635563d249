"""DPO training of a LoRA adapter against its frozen self, on TRL's ``DPOTrainer``.

The policy starts from the federated SFT adapter; the reference is the same adapter frozen,
a second PEFT adapter named ``"ref"`` on the same 4-bit base (no second copy of the model),
which scores every training pair once before the first step (TRL's ``precompute_ref_log_probs``).
``train_dpo`` undoes two TRL habits that do not suit this setting (its bfloat16 cast of the
trainable LoRA tensors, and keeping the reference adapter afterwards) and returns the
trained adapter with the loss history. TRL is imported only here, with an error naming the
missing extra. Scoring lives in ``fedft.score.preference``.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedft.config import DpoConfig
from fedft.data.preferences import PreferencePair, trl_rows
from fedft.model.adapter import get_adapter_state, set_adapter_state
from fedft.model.load import MissingExtraError

REFERENCE_ADAPTER = "ref"  # the frozen copy TRL adds beside the trained "default" adapter
POLICY_ADAPTER = "default"


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
    from transformers import PrinterCallback

    set_adapter_state(model, start_state)
    device = next(model.parameters()).device
    history: list[dict] = []
    start = time.time()
    with _datasets_progress_bars_off():
        try:
            with tempfile.TemporaryDirectory(prefix="fedft-dpo-") as scratch:
                trainer = DPOTrainer(
                    model=model, args=_trl_args(TrlDpoConfig, cfg, scratch, device),
                    train_dataset=datasets.Dataset.from_list(trl_rows(pairs)), processing_class=tokenizer,
                    callbacks=[_progress_callback(cfg, history, start, log, on_step)])
                trainer.remove_callback(PrinterCallback)
                _trainable_to_float32(model)
                log(f"dpo: {len(pairs)} pairs, {cfg.steps} steps of {cfg.batch_size}, beta {cfg.beta}, "
                    f"lr {cfg.learning_rate} (TRL {trl.__version__}, reference = the starting adapter, frozen)")
                trainer.train()
            state = get_adapter_state(model)
        finally:  # also when TRL's constructor failed after its bfloat16 cast (e.g. out of memory)
            _drop_reference(model)
            _trainable_to_float32(model)
            model.eval()
    return DpoResult(state=state, history=history, wall_s=time.time() - start)


def _trl_args(TrlDpoConfig, cfg: DpoConfig, output_dir: str, device: torch.device):
    """TRL's ``DPOConfig`` for ``dpo``: max_steps, schedule, beta, the loss terms; no saving, no bf16."""
    return TrlDpoConfig(
        output_dir=output_dir, max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_schedule, warmup_steps=cfg.warmup_steps, weight_decay=0.0,
        max_grad_norm=cfg.max_grad_norm,  # 0: no clipping (the Trainer clips only when > 0)
        beta=cfg.beta, loss_type=["sigmoid", "sft"] if cfg.sft_weight > 0 else ["sigmoid"],
        loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight > 0 else None, max_length=cfg.max_length,
        seed=cfg.seed, data_seed=cfg.seed, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=device.type == "cpu", bf16=False, fp16=False,
        gradient_checkpointing=False, dataloader_num_workers=0,
        # the reference is frozen: score every pair under it once, before the first step,
        # instead of once per step it is drawn in (80 steps of 16 draw each pair ~3 times)
        precompute_ref_log_probs=True, precompute_ref_batch_size=2 * cfg.batch_size,
    )


def _progress_callback(cfg: DpoConfig, history: list[dict], start: float, log: Callable[[str], None],
                       on_step: Callable[[int, dict], None] | None):
    """A ``TrainerCallback`` that appends each logged step to ``history``, calls ``on_step`` and logs."""
    from transformers import TrainerCallback

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

    return _Progress()


def _trainable_to_float32(model) -> None:
    """Undo TRL's bfloat16 cast of the trainable LoRA tensors."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)


@contextlib.contextmanager
def _datasets_progress_bars_off():
    """No ``datasets`` progress bars in the block (TRL's tokenization), as they were afterwards."""
    import datasets

    enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            datasets.utils.logging.enable_progress_bar()
