"""A GPU check of fedft's client path on the shapes of Llama-3.2-1B and Llama-3.1-8B (random weights, no download).

Run: ``python -m simulations.gpu_check [--models 1b,8b] [--out results.json]`` on a machine with one CUDA GPU
(a few minutes on an H200), or ``python -m simulations.gpu_check --dry-run`` anywhere: the same code path on
the CPU with tiny models of the same family, a couple of steps, GPU-only figures printed as "n/a (no CUDA)".

Per model it measures: tokens/s of fedft's local loop (``cached_peft_model`` + ``train_local``) and of a plain
peft + bitsandbytes loop on the same batches; the loop's peak GPU memory against
``fedft.model.memory.client_memory`` (the estimate ``python -m fedft.model.memory`` tabulates); the DP-SGD step
(``train_local_dp``, ``privacy.record_level``) against the non-DP step on the same model. Then it runs
``fedft simulate`` (2 clients x 2 rounds) on the 1B shape. It prints a table and one verdict per figure, writes
the results as JSON with ``--out``, and changes nothing in fedft: a failing figure is reported, not fixed.
docs/gpu-check.md explains each figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from fedft.config import FedftConfig, load_config
from fedft.data.rows import Example, collate
from fedft.demo.base import build_char_tokenizer
from fedft.demo.tasks import make_demo_rows, make_eval_rows, write_jsonl
from fedft.model.load import (
    DTYPES,
    cached_peft_model,
    clear_model_cache,
    initial_adapter_state,
    model_spec,
    resolve_device,
)
from fedft.model.memory import COMMON_MODELS, GIB, DecoderShape, client_memory
from fedft.privacy.dpfedavg import secure_generator
from fedft.privacy.dpsgd import train_local_dp
from fedft.rundir import load_metrics, load_summary
from fedft.train.local import batch_indices, train_local
from simulations import console

REPO_ROOT = Path(__file__).resolve().parent.parent
ROPE_THETA = 500000.0  # both Llama 3.x releases
NA = "n/a (no CUDA)"
MIN_THROUGHPUT_RATIO = 0.9  # fedft's loop may be at most 10% slower than plain peft


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


PUBLISHED = {s.name: s for s in COMMON_MODELS}
GPU_TARGETS = {
    "1b": Target("1b", PUBLISHED["Llama-3.2-1B"], batch=4, seq=512, warmup=3, steps=10),
    "8b": Target("8b", PUBLISHED["Llama-3.1-8B"], batch=4, seq=512, warmup=2, steps=6),
}
# The same family in miniature: GQA, tied (1B) or untied (8B) embeddings, every linear width a multiple
# of 64 (bitsandbytes' NF4 CPU kernel), the character tokenizer's 100-token vocabulary.
DRY_TARGETS = {
    "1b": Target("1b", DecoderShape("tiny Llama-3.2-1B", 128, 512, 2, 2, 1, 100, True), 2, 64, 1, 2),
    "8b": Target("8b", DecoderShape("tiny Llama-3.1-8B", 128, 448, 2, 2, 1, 100, False), 2, 64, 1, 2),
}

CHECK_TOML = """\
# fedft GPU check: the measured client's settings and the 2-client, 2-round simulation
seed = 0
[model]
path = "{model}"
quantization = "nf4"
double_quant = true
compute_dtype = "{dtype}"
device = "{device}"
gradient_checkpointing = true
[lora]
r = 16
alpha = 32
target_modules = ["all-linear"]
[data]
train_files = ["train.jsonl"]
eval_file = "eval.jsonl"
partition = "natural"
partition_by = "institution"
max_length = 128
eval_max_examples = {eval_examples}
[train]
local_steps = {sim_steps}
batch_size = 8
learning_rate = 1e-4
lr_schedule = "constant"
max_grad_norm = 1.0
[strategy]
name = "fedavg"
num_rounds = 2
min_train_nodes = 2
eval_every = 1
[simulation]
num_supernodes = 2
num_cpus = 1
num_gpus = {num_gpus}
[privacy]
dp_sgd_noise_multiplier = 1.0
dp_sgd_clip_norm = 1.0
[report]
evaluate_stages = false
"""


# ---------------------------------------------------------------------------------------------------------
# Building the models and the inputs
# ---------------------------------------------------------------------------------------------------------

def build_random_model(shape: DecoderShape, out_dir: Path, device: torch.device, dtype: torch.dtype) -> Path:
    """A seeded random-weight Llama of ``shape`` with the character tokenizer, saved in Hugging Face format.

    Built directly on ``device`` (an 8B initialised on the CPU takes minutes and 16 GB of RAM).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied_embeddings, rope_theta=ROPE_THETA, rms_norm_eps=1e-5,
        max_position_embeddings=131072 if shape.vocab > 1000 else 256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out_dir, max_shard_size="4GB")  # shards bound the host memory saving takes
    tokenizer.save_pretrained(out_dir)
    del model
    release_memory()
    return out_dir


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


def write_check_setup(directory: Path, model_dir: Path, dry_run: bool) -> Path:
    """Two institutions' demo rows, held-out rows and check.toml (the simulation's config)."""
    write_jsonl(make_demo_rows(2, 16 if dry_run else 32, 0.9, seed=0), directory / "train.jsonl")
    write_jsonl(make_eval_rows(2 if dry_run else 4, seed=1), directory / "eval.jsonl")
    path = directory / "check.toml"
    path.write_text(CHECK_TOML.format(
        model=model_dir, dtype="float32" if dry_run else "bfloat16", device="cpu" if dry_run else "cuda",
        eval_examples=4 if dry_run else 16, sim_steps=2 if dry_run else 5, num_gpus=0 if dry_run else 0.5))
    return path


def with_steps(cfg: FedftConfig, steps: int) -> FedftConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, local_steps=steps))


# ---------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------

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
    model, tokenizer = cached_peft_model(model_spec(cfg))
    start = initial_adapter_state(model_spec(cfg))
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
    model, tokenizer = cached_peft_model(model_spec(dp_cfg))
    start, pad_id = initial_adapter_state(model_spec(dp_cfg)), tokenizer.pad_token_id
    counted = TokenCountingExamples(examples)
    device = resolve_device(cfg.model.device)

    def sft(steps: int) -> None:
        train_local(model, counted, pad_id, with_steps(dp_cfg, steps).train, global_state=start, round_index=1,
                    total_rounds=1, seed=cfg.seed)

    def dp_with(make_generator):
        def dp(steps: int) -> None:
            train_local_dp(model, counted, pad_id, with_steps(dp_cfg, steps), global_state=start, round_index=1,
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


def run_simulation(config_path: Path, out_dir: Path, timeout_s: float) -> dict:
    """``fedft simulate`` on check.toml as a subprocess, its output echoed; its process group is killed at
    ``timeout_s`` (a Ray cluster that cannot place the clients would otherwise wait for ever)."""
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--config", str(config_path),
               "--out", str(out_dir)]
    print("  $ " + " ".join(command), flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    echo = threading.Thread(target=lambda: [print("  | " + line.rstrip(), flush=True) for line in process.stdout],
                            daemon=True)
    echo.start()
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise RuntimeError(f"fedft simulate did not finish in {timeout_s:.0f}s and was killed; its output is above")
    finally:
        echo.join(timeout=5)
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"fedft simulate failed with exit code {code}; its output is above")
    summary, rows = load_summary(out_dir), load_metrics(out_dir)
    return {"rounds": summary["rounds"], "clients": 2, "wall_s": wall, "run_wall_s": summary["wall_seconds"],
            "train_loss": rows[-1].get("train_loss"), "eval_loss": summary["final"].get("eval_loss")}


# ---------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------

def number(value, digits: int = 2, na: bool = False) -> str:
    """A cell: the value; "n/a (no CUDA)" for a GPU-only figure measured on the CPU (``na``), else "failed"."""
    if value is None:
        return NA if na else "failed"
    return f"{value:.{digits}f}"


def get(result: dict, section: str, key: str):
    part = result.get(section)
    return None if part is None else part.get(key)


def ratio(a, b):
    return a / b if a is not None and b else None


def figure_rows(results: dict, on_gpu: bool) -> list[tuple[str, list[str]]]:
    """(label, one cell per model) for the table; the labels are what a reader (and the test) looks for."""
    models = list(results.values())

    def row(label, values, digits=2, gpu_only=False):
        return label, [number(v, digits, gpu_only and not on_gpu) for v in values]

    return [
        row("tokens/s fedft", [get(m, "fedft", "tokens_per_s") for m in models], 1),
        row("tokens/s peft", [get(m, "peft", "tokens_per_s") for m in models], 1),
        row("ratio fedft/peft", [ratio(get(m, "fedft", "tokens_per_s"), get(m, "peft", "tokens_per_s"))
                                 for m in models], 3),
        row("memory peak GiB (fedft)", [get(m, "fedft", "peak_gib") for m in models], 2, True),
        row("memory peak GiB (peft)", [get(m, "peft", "peak_gib") for m in models], 2, True),
        row("memory estimate GiB", [m["estimate_gib"]["total"] for m in models], 3),
        row("memory peak/estimate", [ratio(get(m, "fedft", "peak_gib"), m["estimate_gib"]["total"])
                                     for m in models], 3, True),
        row("DP-SGD step s", [get(m, "dp_sgd", "step_s") for m in models], 3),
        row("non-DP step s", [get(m, "dp_sgd", "non_dp_step_s") for m in models], 3),
        row("DP-SGD step ratio", [get(m, "dp_sgd", "per_token_ratio") for m in models], 3),
    ]


def print_table(results: dict, simulation: dict | None, sim_error: str | None, on_gpu: bool) -> None:
    rows = figure_rows(results, on_gpu)
    names = [m["model"] for m in results.values()]
    width = max(len(label) for label, _ in rows) + 2
    cells = [max([len(n)] + [len(r[1][i]) for r in rows]) + 2 for i, n in enumerate(names)]
    print("\n" + "figure".ljust(width) + "".join(n.rjust(c) for n, c in zip(names, cells)))
    for label, values in rows:
        print(label.ljust(width) + "".join(v.rjust(c) for v, c in zip(values, cells)))
    print(f"simulation result: {simulation_text(simulation, sim_error)}")


def simulation_text(simulation: dict | None, error: str | None) -> str:
    if simulation is None:
        return f"failed: {error}" if error else "skipped (--skip-simulation)"
    return (f"{simulation['rounds']} rounds x {simulation['clients']} clients in {simulation['wall_s']:.1f} s "
            f"(run {simulation['run_wall_s']:.1f} s), train loss {number(simulation['train_loss'], 3)}, "
            f"eval loss {number(simulation['eval_loss'], 3)}")


def verdicts(results: dict, simulation: dict | None, sim_error: str | None, on_gpu: bool) -> dict[str, str]:
    """One line per figure: OK / SLOW / OVER / BLOCKED / FAILED and the numbers behind it."""
    keys = list(results)
    where = "" if on_gpu else " (CPU dry run: not a GPU figure)"
    out = {}
    ratios = [ratio(get(results[k], "fedft", "tokens_per_s"), get(results[k], "peft", "tokens_per_s")) for k in keys]
    if any(r is None for r in ratios):
        out["throughput"] = "FAILED  a loop did not run (see its error above)"
    else:
        word = "OK" if min(ratios) >= MIN_THROUGHPUT_RATIO else "SLOW"
        out["throughput"] = (f"{word}  fedft at {' / '.join(f'{r:.2f}x' for r in ratios)} of plain peft "
                             f"({' / '.join(keys)}); OK at >= {MIN_THROUGHPUT_RATIO:.2f}x{where}")
    peaks = [ratio(get(results[k], "fedft", "peak_gib"), results[k]["estimate_gib"]["total"]) for k in keys]
    if not on_gpu:
        totals = " / ".join(number(results[k]["estimate_gib"]["total"], 3) for k in keys)
        out["memory"] = f"{NA}; the estimate alone: {totals} GiB ({' / '.join(keys)})"
    elif any(p is None for p in peaks):
        out["memory"] = "FAILED  fedft's loop did not run"
    else:
        word = "OK" if max(peaks) <= 1.0 else "OVER"
        out["memory"] = (f"{word}  peak at {' / '.join(f'{p:.2f}x' for p in peaks)} of the estimate "
                         f"({' / '.join(keys)}); OK when the estimate is not exceeded")
    dp = [results[k].get("dp_sgd") for k in keys]
    if any(d is None for d in dp):
        out["dp_sgd"] = "FAILED  a DP-SGD round did not run (see its error above)"
    else:
        word = "BLOCKED" if any(d["blocker"] for d in dp) else "OK"
        costs = " / ".join(f"{d['per_token_ratio']:.2f}x" for d in dp)
        blockers = "".join(f"; {d['blocker']}" for d in dp if d["blocker"])
        out["dp_sgd"] = f"{word}  a DP-SGD token costs {costs} a non-DP token ({' / '.join(keys)}){where}{blockers}"
    if simulation is None:
        out["simulation"] = f"FAILED  {sim_error}" if sim_error else "SKIPPED"
    else:
        ok = simulation["rounds"] == 2 and all(
            v is not None and math.isfinite(v) for v in (simulation["train_loss"], simulation["eval_loss"]))
        out["simulation"] = f"{'OK' if ok else 'FAILED'}  {simulation_text(simulation, None)}"
    return out


def header(targets: list[Target], dry_run: bool) -> str:
    import bitsandbytes
    import peft
    import transformers

    device = "CPU" if dry_run else torch.cuda.get_device_name(0)
    lines = [
        "fedft GPU check" + (" -- DRY RUN on the CPU: tiny models of the same family, GPU-only figures n/a"
                             if dry_run else ""),
        f"device {device}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}",
        "What it measures, per model (random weights with the published shapes, NF4 double-quant base, LoRA r=16 "
        "on all linear layers, gradient checkpointing):",
        "  tokens/s      fedft's client loop (cached_peft_model + train_local) and a plain peft + bitsandbytes "
        "loop on the same batches, and their ratio",
        "  memory        peak GPU memory of fedft's loop (torch.cuda.max_memory_allocated) against "
        "fedft.model.memory's estimate (python -m fedft.model.memory)",
        "  DP-SGD        a record-level DP-SGD round (train_local_dp) against a non-DP round on the same model, "
        "per token",
        "then: fedft simulate, 2 clients x 2 rounds on the 1B shape (Flower's Simulation Engine)",
    ]
    for target in targets:
        lines.append(f"  {target.shape.name}: batch {target.batch} x {target.seq} tokens, {target.warmup} warm-up + "
                     f"{target.steps} timed steps")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulations.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="1b,8b", help="comma-separated: 1b, 8b (default: both)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same code path on the CPU with tiny models of the same family")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    parser.add_argument("--steps", type=int, help="timed steps per loop (default: 10 for 1B, 6 for 8B, 2 dry)")
    parser.add_argument("--warmup", type=int, help="warm-up steps before timing (default: 3 / 2, 1 dry)")
    parser.add_argument("--skip-simulation", action="store_true", help="do not run fedft simulate")
    parser.add_argument("--simulation-timeout", type=float, default=300.0,
                        help="seconds before the simulation is killed (default 300)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show third-party warnings, logs and progress bars")
    parser.add_argument("--workdir", help="where the random models are written (default: a temporary directory; "
                                          "the 8B needs 16 GB of disk)")
    args = parser.parse_args(argv)
    args.models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in GPU_TARGETS]
    if unknown or not args.models:
        parser.error(f"--models {','.join(unknown) or '(empty)'}: choose from {', '.join(GPU_TARGETS)}")
    if args.warmup is not None and args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step is never timed)")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    if not args.dry_run and not cuda():
        parser.error("no CUDA device here: run on a GPU machine, or use --dry-run for the CPU code path")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with console.quiet_third_party(args.verbose):  # before transformers and Ray start
        return check(args)


def check(args: argparse.Namespace) -> int:
    """Build, measure, simulate, report; 1 when a figure could not be measured."""
    table = DRY_TARGETS if args.dry_run else GPU_TARGETS
    targets = [dataclasses.replace(table[k], **{name: getattr(args, name) for name in ("steps", "warmup")
                                                if getattr(args, name) is not None}) for k in args.models]
    device = torch.device("cpu" if args.dry_run else "cuda:0")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    print(header(targets, args.dry_run), flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedft-gpu-check-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        sim_model = tmp / "1b"  # the simulation always runs on the 1B shape
        config_path = write_check_setup(tmp, sim_model, args.dry_run)
        results = {}
        for target in targets:
            print(f"\n[{target.shape.name}] building random weights on {device} ...", flush=True)
            t0 = time.perf_counter()
            build_random_model(target.shape, tmp / target.key, device, dtype)
            print(f"  built and saved in {time.perf_counter() - t0:.1f}s", flush=True)
            results[target.key] = measure_model(target, tmp / target.key, config_path)
        simulation, sim_error = None, None
        if not args.skip_simulation:
            print(f"\n[simulation] fedft simulate: 2 clients x 2 rounds on {table['1b'].shape.name} ...", flush=True)
            if not (sim_model / "config.json").is_file():
                build_random_model(table["1b"].shape, sim_model, device, dtype)
            try:
                simulation = run_simulation(config_path, tmp / "run", args.simulation_timeout)
            except Exception as err:  # noqa: BLE001 - reported as the figure's failure
                sim_error = str(err)
                print(f"  simulation FAILED: {sim_error}", flush=True)
    print_table(results, simulation, sim_error, on_gpu=not args.dry_run)
    found = verdicts(results, simulation, sim_error, on_gpu=not args.dry_run)
    print()
    for name, line in found.items():
        print(f"verdict {name + ':':<12} {line}")
    print(f"(total {time.perf_counter() - started:.0f}s)")
    if args.out:
        report = {"dry_run": args.dry_run, "device": "cpu" if args.dry_run else torch.cuda.get_device_name(0),
                  "torch": torch.__version__, "models": results, "simulation": simulation,
                  "simulation_error": sim_error, "verdicts": found, "total_s": time.perf_counter() - started}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    failed = any(m["errors"] for m in results.values()) or sim_error is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
