"""The GPU check's measurements (``simulations.gpu_check``): fedft's loop, a plain peft loop, DP-SGD, memory.

Each ``measure_*`` loads its model, times its steps after a warm-up and frees the GPU again;
``measure_model`` runs them all for one model shape and records a failing phase instead of stopping.
"""

from __future__ import annotations

import dataclasses
import gc
import secrets
import time
import traceback
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from fedft.config import FedftConfig, load_config
from fedft.data.rows import Example, collate
from fedft.model.load import (
    DTYPES,
    cached_peft_model,
    clear_model_cache,
    initial_adapter_state,
    model_spec,
    resolve_device,
)
from fedft.model.memory import GIB, DecoderShape, client_memory
from fedft.privacy.dpfedavg import secure_generator
from fedft.privacy.dpsgd import train_local_dp
from fedft.train.local import batch_indices, train_local


@dataclass(frozen=True)
class Target:
    """One model to measure: its shape and how many tokens each step trains."""

    key: str
    shape: DecoderShape
    batch: int
    seq: int
    warmup: int
    steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq


def random_examples(target: Target, count: int, seed: int = 0) -> list[Example]:
    """``count`` sequences of ``target.seq`` random token ids, every token trained (throughput needs no text)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, target.shape.vocab, (count, target.seq), generator=generator).tolist()
    return [Example(input_ids=row, labels=row, prompt_ids=[], reference="", task="gpu-check", source="random")
            for row in ids]


class TokenCountingExamples(list):
    """The examples, counting the tokens a loop takes out of them (DP-SGD's Poisson batches vary in size)."""

    tokens = 0

    def __getitem__(self, index):
        item = super().__getitem__(index)
        if isinstance(index, int):
            self.tokens += len(item.input_ids)
        return item


def with_steps(cfg: FedftConfig, steps: int) -> FedftConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, local_steps=steps))


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    """Wait for queued GPU work, so a clock read after it counts the step."""
    if cuda():
        torch.cuda.synchronize()


def release_memory() -> None:
    """Drop fedft's cached model and return freed GPU memory, so each phase starts from an empty GPU."""
    clear_model_cache()
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()


def reset_peak() -> None:
    if cuda():
        torch.cuda.reset_peak_memory_stats()


def peak_gib(cfg: FedftConfig) -> float | None:
    """Peak GPU memory since ``reset_peak`` (None when the model is not on a GPU)."""
    return torch.cuda.max_memory_allocated() / GIB if resolve_device(cfg.model.device).type == "cuda" else None


def measure_fedft(cfg: FedftConfig, examples: list[Example], target: Target) -> dict:
    """fedft's client loop: the cached 4-bit model and ``train_local``, timed per step after the warm-up."""
    release_memory()
    spec = model_spec(cfg)
    model, tokenizer = cached_peft_model(spec)
    start = initial_adapter_state(spec)
    ticks: list[float] = []

    def tick(step: int, loss: float) -> None:
        sync()
        ticks.append(time.perf_counter())

    reset_peak()
    result = train_local(model, examples, tokenizer.pad_token_id, cfg.train, global_state=start, round_index=1,
                         total_rounds=1, seed=cfg.seed, on_step=tick)
    seconds = ticks[-1] - ticks[target.warmup - 1]
    return {"tokens_per_s": target.steps * target.tokens_per_step / seconds, "step_s": seconds / target.steps,
            "peak_gib": peak_gib(cfg), "loss": result.train_loss}


def measure_peft(cfg: FedftConfig, examples: list[Example], target: Target) -> dict:
    """The reference: AutoModelForCausalLM in NF4, peft's QLoRA recipe, AdamW, the same batches and steps."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    release_memory()
    device, dtype = resolve_device(cfg.model.device), DTYPES[cfg.model.compute_dtype]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                               bnb_4bit_use_double_quant=cfg.model.double_quant)
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, quantization_config=quant, dtype=dtype,
                                                 device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.model.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    order = islice(batch_indices(len(examples), cfg.train.batch_size, cfg.seed), target.warmup + target.steps)
    batches = [collate([examples[i] for i in indices], model.config.pad_token_id) for indices in order]
    model.train()
    reset_peak()
    ticks = []
    for batch in batches:
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        ticks.append(time.perf_counter())
    seconds = ticks[-1] - ticks[target.warmup - 1]
    result = {"tokens_per_s": target.steps * target.tokens_per_step / seconds, "step_s": seconds / target.steps,
              "peak_gib": peak_gib(cfg), "loss": loss.item()}
    del model, optimizer, params, loss
    release_memory()
    return result


def timed_rounds(run, examples: TokenCountingExamples, target: Target) -> tuple[float, float]:
    """(seconds per step, tokens/s) of ``run(steps)`` after one ``run(target.warmup)`` round."""
    run(target.warmup)
    examples.tokens = 0
    sync()
    start = time.perf_counter()
    run(target.steps)
    sync()
    seconds = time.perf_counter() - start
    return seconds / target.steps, examples.tokens / seconds


def measure_dp(cfg: FedftConfig, examples: list[Example], target: Target) -> dict:
    """DP-SGD rounds (``train_local_dp``) against non-DP rounds (``train_local``) on the same record-level model.

    Both are timed as whole rounds (adapter in and out included) after a warm-up round, per token
    trained: DP-SGD's Poisson batches vary in size. The noise generator is fedft's own
    (``secure_generator``, as ``run_client_round`` passes it); when that fails on the GPU, the failure is
    reported as a blocker and the step is timed with a generator on the model's device.
    """
    release_memory()
    dp_cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, record_level=True))
    spec = model_spec(dp_cfg)
    model, tokenizer = cached_peft_model(spec)
    start, pad_id = initial_adapter_state(spec), tokenizer.pad_token_id
    counted = TokenCountingExamples(examples)
    device = resolve_device(cfg.model.device)

    def sft(steps: int) -> None:
        train_local(model, counted, pad_id, with_steps(dp_cfg, steps).train, global_state=start, round_index=1,
                    total_rounds=1, seed=cfg.seed)

    def dp_with(make_generator):
        def dp(steps: int) -> None:
            round_cfg = with_steps(dp_cfg, steps)
            train_local_dp(model, counted, pad_id, round_cfg.train, round_cfg.privacy, global_state=start,
                           round_index=1, total_rounds=round_cfg.strategy.num_rounds,
                           noise_generator=make_generator(), seed=cfg.seed)
        return dp

    sft_step, sft_tps = timed_rounds(sft, counted, target)
    reset_peak()
    generator, blocker = "fedft secure_generator()", None
    try:
        dp_step, dp_tps = timed_rounds(dp_with(secure_generator), counted, target)
    except RuntimeError as err:
        if "generator" not in str(err).lower():
            raise
        blocker = (f"train_local_dp with fedft.privacy.dpfedavg.secure_generator() (a CPU generator, as "
                   f"run_client_round passes it) fails with the model on {device}: {str(err).splitlines()[0]}")
        generator = f"torch.Generator(device='{device}') (workaround)"
        dp_step, dp_tps = timed_rounds(dp_with(
            lambda: torch.Generator(device=device).manual_seed(secrets.randbits(63))), counted, target)
    return {"step_s": dp_step, "tokens_per_s": dp_tps, "non_dp_step_s": sft_step, "non_dp_tokens_per_s": sft_tps,
            "per_token_ratio": sft_tps / dp_tps, "peak_gib": peak_gib(cfg), "noise_generator": generator,
            "blocker": blocker}


def estimate(cfg: FedftConfig, target: Target) -> dict:
    """fedft.model.memory's estimate for this client (GiB), for the batch, sequence and rank measured."""
    return client_memory(target.shape, rank=cfg.lora.r, batch=target.batch, seq=target.seq,
                         quantization=cfg.model.quantization, checkpointing=cfg.model.gradient_checkpointing)


def phase(name: str, errors: dict, run):
    """Run one measurement; a failure is printed and recorded, and the check goes on to the next one."""
    print(f"  {name} ...", flush=True)
    started = time.perf_counter()
    try:
        result = run()
    except Exception as err:  # noqa: BLE001 - every failure is a finding to report
        traceback.print_exc()
        errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        print(f"  {name} FAILED: {errors[name]}", flush=True)
        return None
    print(f"  {name} done in {time.perf_counter() - started:.1f}s", flush=True)
    return result


def measure_model(target: Target, model_dir: Path, config_path: Path) -> dict:
    """Every per-model figure for ``target`` (None where a phase failed; its error under "errors")."""
    cfg = load_config(config_path, [f"model.path={model_dir}", f"train.batch_size={target.batch}",
                                    f"train.local_steps={target.warmup + target.steps}"])
    examples = random_examples(target, count=8 * target.batch)
    errors: dict = {}
    result = {"model": target.shape.name, "batch": target.batch, "seq": target.seq, "warmup_steps": target.warmup,
              "timed_steps": target.steps, "lora_r": cfg.lora.r, "errors": errors}
    result["fedft"] = phase("fedft loop (cached_peft_model + train_local)", errors,
                            lambda: measure_fedft(cfg, examples, target))
    result["peft"] = phase("plain peft + bitsandbytes loop", errors, lambda: measure_peft(cfg, examples, target))
    result["dp_sgd"] = phase("DP-SGD (train_local_dp) and non-DP rounds", errors,
                             lambda: measure_dp(cfg, examples, target))
    result["estimate_gib"] = estimate(cfg, target)
    release_memory()
    return result
