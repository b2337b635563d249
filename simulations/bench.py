"""Benchmark fedft's overheads on this machine: ``python -m simulations.bench``.

Each figure is printed as a ratio with the two absolute values beside it:

(a) simulation overhead: a 1-client ``fedft simulate`` against a plain single-process
    transformers + peft + bitsandbytes loop with the same model, steps, batches (the same
    tokenized examples in the same order) and torch threads: whole wall time of each process,
    and steady-state time per step (the simulation's rounds 2+ divided by its local steps,
    against the loop's steps after its first round's worth);
(b) deployment overhead: the same config through a local SuperLink and one SuperNode
    (``--insecure``, no authentication): with the institution's resident worker (``fedft node
    serve``) behind ``fedft node supernode`` (shorter polls) and behind ``flower-supernode``,
    and without the worker (a fresh ClientApp process per round), against the simulation:
    mean time of rounds 2+;
(c) base loads per process and per institution: from the worker's own log line, from the
    ``flwr-clientapp`` processes seen and the "Loading weights" bars in the SuperNode's log,
    and from a ``--verbose`` simulation's console (one bar per Ray actor that loaded);
(d) peak RSS of the whole process tree (the simulation, Ray's raylet, GCS and actors) against
    the number of simulated clients, a fixed number sampled per round.

The whole wall time is each process from start to exit: for the simulation that includes
starting Ray, the server's own copy of the base, the held-out evaluation of round 0 and of the
last round (``data.eval_max_examples`` is kept small), checkpoints and the report. Rounds whose
metrics row carries a held-out evaluation and round 1 (where every process loads its base)
are left out of the per-round figures. The load average is printed with the figures: numbers
measured while other work shared the CPUs are not the machine's.

Run: ``python -m simulations.bench [--model PATH] [--rounds N] [--steps N] [--repeat N] [--quick] [--out FILE.json]``
(the embedded demo model by default: an estimated 6-8 minutes on 2 idle CPU cores, ``--quick`` 4-5;
docs/benchmark.md says what each figure means).
Every process it starts runs in its own process group and carries a tag in its environment;
all of them, Ray's and Flower's included, are stopped when it ends, fails or is interrupted.
Linux only (it reads /proc). It writes only inside its work directory (a temporary one
unless ``--work-dir``) and ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from clients.supernode import DEFAULT_POLL_S
from simulations.bench_figures import (  # noqa: F401 - the benchmark's names, as tests and docs use them
    ANSI,
    LOAD_BAR,
    QUICK,
    RAY_PREFIX,
    WORKER_COUNT,
    WORKER_ROUND,
    BenchError,
    Settings,
    bytes_text,
    client_rounds,
    count_loads,
    difference_line,
    figures_a,
    figures_b,
    figures_c,
    figures_d,
    loads_line,
    mean,
    ratio_line,
    seconds_text,
    steady_round_seconds,
    steady_rounds,
    worker_loads,
    worker_round_seconds,
)
from simulations.bench_processes import (  # noqa: F401 - TAG_VARIABLE, TreeSampler, log_text: as tests use them
    TAG_VARIABLE,
    Processes,
    TreeSampler,
    log_text,
)
from simulations.bench_runs import REPO_ROOT, run_deployment, run_plain, run_simulation

DEMO_DATA = REPO_ROOT / "simulations" / "data" / "demo"
# (b)'s jobs: (label, resident worker, SuperNode poll interval: None for flower-supernode as it is)
DEPLOYMENTS = (("resident worker, fedft node supernode", True, DEFAULT_POLL_S),
               ("resident worker", True, None),
               ("no worker", False, None))


# ---- the configs every run shares ----

def bench_toml(s: Settings, train_file: Path, *, clients: int, sampled: int, rounds: int, steps: int) -> str:
    """A fedft config: ``clients`` simulated clients (IID parts of ``train_file``), ``sampled`` per round."""
    gpus = 0.5 if s.device.startswith("cuda") else 0.0  # Ray hides the GPU from actors that ask for none
    return f"""seed = 0
[model]
path = {json.dumps(s.model)}
quantization = "nf4"
compute_dtype = "float32"
device = {json.dumps(s.device)}
[lora]
r = 16
alpha = 32
target_modules = ["all-linear"]
[data]
train_files = [{json.dumps(str(train_file))}]
eval_file = {json.dumps(str(DEMO_DATA / "eval.jsonl"))}
partition = "iid"
task_column = "task"
max_length = 128
eval_max_examples = {s.eval_examples}
[train]
local_steps = {steps}
batch_size = {s.batch_size}
learning_rate = 6e-3
lr_schedule = "constant"
num_threads = {s.num_threads}
[strategy]
name = "fedavg"
num_rounds = {rounds}
fraction_train = {min(1.0, sampled / clients)!r}
min_train_nodes = {sampled}
eval_every = 0
[simulation]
num_supernodes = {clients}
num_cpus = 1
num_gpus = {gpus}
[report]
evaluate_stages = false
"""


def write_config(path: Path, text: str) -> Path:
    """Write a config and load it once here, so a bad one fails before any process starts."""
    from fedft.config import ConfigError, load_config

    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as error:
        raise BenchError(f"the benchmark's config {path} is refused: {error}") from None
    return path


def one_institution_rows(out: Path) -> Path:
    """The demo's first institution's rows: the data of (a) and (b)'s single client."""
    rows = [line for line in (DEMO_DATA / "train.jsonl").read_text().splitlines()
            if json.loads(line).get("institution") == "inst0"]
    out.write_text("\n".join(rows) + "\n")
    return out


# ---- the whole benchmark ----

def say(text: str) -> None:
    print(f"bench: {text}", flush=True)


def staged(stages: dict, name: str, call):
    """Run one step of the benchmark, saying what and how long it took."""
    say(f"{name} ...")
    started = time.monotonic()
    result = call()
    stages[name] = time.monotonic() - started
    say(f"{name}: {stages[name]:.0f} s")
    return result


def run_benchmark(s: Settings, root: Path) -> tuple[list[str], dict]:
    """Every step, one after the other; every process stopped at the end. Returns the figures' lines and
    everything measured (for --out)."""
    procs, stages, deployed, memory = Processes(root), {}, {}, {}
    try:
        data = one_institution_rows(root / "inst0.jsonl")
        one = write_config(root / "one-client.toml", bench_toml(s, data, clients=1, sampled=1, rounds=s.rounds,
                                                                 steps=s.steps))
        sims, plains = [], []

        def simulate_once(i: int, of: str) -> None:
            sims.append(staged(stages, f"(a) fedft simulate, 1 client, {s.rounds} rounds x {s.steps} steps{of}",
                               lambda: run_simulation(procs, one, root / f"sim{i or ''}", "simulate", s.timeout_s)))

        def plain_once(i: int, of: str) -> None:
            plains.append(staged(stages, f"(a) plain transformers + peft + bitsandbytes loop, same steps and "
                                         f"batches{of}",
                                 lambda: run_plain(procs, one, root / f"plain{i or ''}.json", s.timeout_s)))

        for index in range(s.repeat):
            of = f" (run {index + 1} of {s.repeat})" if s.repeat > 1 else ""
            pair = (simulate_once, plain_once) if index % 2 == 0 else (plain_once, simulate_once)  # alternate
            for run_once in pair:
                run_once(index, of)
        sim = sims[0]  # (b)'s reference
        for label, worker, poll_s in DEPLOYMENTS if "b" in s.parts else ():
            deployed[label] = staged(stages, f"(b) flwr run, local SuperLink + 1 SuperNode, {label}",
                                     lambda w=worker, p=poll_s: run_deployment(procs, s, one, data, worker=w,
                                                                               poll_s=p))
        for clients in s.clients if "d" in s.parts else ():
            memory[clients] = staged(stages, f"(d) fedft simulate --verbose, {clients} clients, "
                                             f"{min(s.sampled, clients)} sampled",
                                     lambda n=clients: run_memory(procs, s, root, n))
    finally:
        killed = procs.stop_all()
        if killed:
            say(f"stopped {len(killed)} leftover processes with SIGKILL: {killed}")
    lines = (figures_a(sims, plains, s) + figures_b(sim, deployed) + figures_c(deployed, memory, s)
             + figures_d(memory, s))
    results = {"settings": dataclasses.asdict(s), "stage_s": stages, "simulation": _numbers(sim),
               "plain_loop": plains[0], "deployment": {k: _numbers(v) for k, v in deployed.items()},
               "memory": {str(k): _numbers(v) for k, v in memory.items()}, "figures": lines}
    if s.repeat > 1:
        results.update(simulations=[_numbers(r) for r in sims], plain_loops=plains)
    return lines, results


def run_memory(procs: Processes, s: Settings, root: Path, clients: int) -> dict:
    """(d): ``clients`` simulated clients (IID parts of the demo's training rows), ``s.sampled`` per round."""
    config = write_config(root / f"memory-{clients}.toml", bench_toml(
        s, DEMO_DATA / "train.jsonl", clients=clients, sampled=min(s.sampled, clients),
        rounds=s.memory_rounds, steps=s.memory_steps))
    return run_simulation(procs, config, root / f"memory-{clients}", f"memory-{clients}", s.timeout_s, verbose=True)


def _numbers(run: dict) -> dict:
    """A run's figures for --out: no logs, the metrics rows' round, clients and seconds only."""
    kept = {k: v for k, v in run.items() if k not in ("rows", "console", "node_log", "worker_log")}
    kept["rounds"] = [{k: r.get(k) for k in ("round", "clients", "seconds")} for r in run["rows"]]
    if "console" in run:
        kept["loads"] = dict(count_loads(run["console"]))
    return kept


def settings_from(args: argparse.Namespace) -> Settings:
    values = dict(QUICK) if args.quick else {}
    for key in ("rounds", "steps"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.clients:
        values["clients"] = args.clients
    if args.sampled:
        values["sampled"] = args.sampled
    if args.parts:
        values["parts"] = args.parts
    if args.repeat is not None:
        values["repeat"] = args.repeat
    if args.model != "demo":
        values["model"] = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    values["device"] = resolve_device(args.device)
    s = Settings(**values)
    if s.rounds < 3:
        raise BenchError(f"--rounds {s.rounds}: at least 3 (round 1 loads the base, the last round evaluates)")
    if s.steps < 1 or s.sampled < 1 or s.repeat < 1:
        raise BenchError(f"--steps {s.steps}, --sampled {s.sampled}, --repeat {s.repeat}: each at least 1")
    rows = sum(1 for _ in (DEMO_DATA / "train.jsonl").open())
    if max(s.clients) > rows:
        raise BenchError(f"--clients: at most {rows} simulated clients (the demo's training rows)")
    return s


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def bench_parts(text: str) -> tuple[str, ...]:
    """'a,d' -> ('a', 'd'), for --parts: (a) always, as it is (b)'s reference."""
    parts = tuple(part.strip() for part in text.split(","))
    if "a" not in parts or not set(parts) <= {"a", "b", "d"}:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'a' and any of 'b', 'd', comma-separated (a,b,d); "
                                         "(a) is the reference of (b), (c) comes with (b) and (d)")
    return parts


def client_counts(text: str) -> tuple[int, ...]:
    """'8,64,1000' -> (8, 64, 1000), for --clients."""
    try:
        counts = tuple(int(n) for n in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers of clients >= 1, comma-separated (8,64,1000)")
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench", description=__doc__.split("\n\nRun:")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="a local Hugging Face model directory (default: the demo)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    parser.add_argument("--rounds", type=int, help=f"rounds of (a) and (b) (default {Settings.rounds}, at least 3)")
    parser.add_argument("--steps", type=int, help=f"local steps per round (default {Settings.steps})")
    parser.add_argument("--clients", type=client_counts,
                        help="simulated clients of (d), comma-separated (default 8,64,1000)")
    parser.add_argument("--sampled", type=int, help=f"clients sampled per round in (d) (default {Settings.sampled})")
    parser.add_argument("--parts", type=bench_parts,
                        help="the measurements to run, comma-separated (default a,b,d; (c) comes with (b) and (d)); "
                             "e.g. --parts a --rounds 40 for (a) over a long run alone")
    parser.add_argument("--repeat", type=int,
                        help="run (a)'s simulation and plain loop this many times each, alternating which goes "
                             "first, and print the medians and every pair's ratio (default 1); e.g. --parts a "
                             "--rounds 40 --repeat 3 on a machine whose speed drifts")
    parser.add_argument("--quick", action="store_true",
                        help="a much smaller run: 3 rounds x 3 steps; (d) with N = 2, 8 and 2 sampled")
    parser.add_argument("--out", help="also write every figure and measurement to this JSON file")
    parser.add_argument("--work-dir", help="keep the runs and logs here (default: a temporary directory, removed)")
    parser.add_argument("--plain-loop", help=argparse.SUPPRESS)  # the plain loop's own process
    return parser.parse_args(argv)


def _interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plain_loop:
        from simulations.bench_plain import plain_loop

        Path(args.out).write_text(json.dumps(plain_loop(Path(args.plain_loop))))
        return 0
    signal.signal(signal.SIGTERM, _interrupt)  # stop every process started, as on Ctrl-C
    root = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="fedft-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    started, load_before = time.monotonic(), os.getloadavg()[0]
    try:
        s = settings_from(args)
        lines, results = run_benchmark(s, root.resolve())
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    finally:
        if not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)
    results.update(wall_s=time.monotonic() - started, load_average=[load_before, os.getloadavg()[0]])
    print(f"\nfedft overheads on this machine ({os.cpu_count()} CPUs, device {s.device}, model {s.model}; "
          f"{s.rounds} rounds x {s.steps} steps, batch {s.batch_size}, {s.num_threads} torch threads; "
          f"took {results['wall_s']:.0f} s; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after):")
    for line in lines:
        print(f"  {line}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"bench: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
