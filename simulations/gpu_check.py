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
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from fedft.demo.base import build_char_tokenizer
from fedft.demo.tasks import make_demo_rows, make_eval_rows, write_jsonl
from fedft.model.memory import COMMON_MODELS, DecoderShape
from fedft.rundir import load_metrics, load_summary
from simulations import console
from simulations.gpu_check_measure import Target, cuda, measure_model, release_memory
from simulations.gpu_check_report import header, print_table, verdicts

REPO_ROOT = Path(__file__).resolve().parent.parent
ROPE_THETA = 500000.0  # both Llama 3.x releases


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


def write_check_setup(directory: Path, model_dir: Path, dry_run: bool) -> Path:
    """Two institutions' demo rows, held-out rows and check.toml (the simulation's config)."""
    write_jsonl(make_demo_rows(2, 16 if dry_run else 32, 0.9, seed=0), directory / "train.jsonl")
    write_jsonl(make_eval_rows(2 if dry_run else 4, seed=1), directory / "eval.jsonl")
    path = directory / "check.toml"
    path.write_text(CHECK_TOML.format(
        model=model_dir, dtype="float32" if dry_run else "bfloat16", device="cpu" if dry_run else "cuda",
        eval_examples=4 if dry_run else 16, sim_steps=2 if dry_run else 5, num_gpus=0 if dry_run else 0.5))
    return path


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
