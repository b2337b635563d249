"""Benchmark fedft's overheads on this machine: ``python -m simulations.bench``.

Each figure is printed as a ratio with the two absolute values beside it:

(a) simulation overhead: a 1-client ``fedft simulate`` against a plain single-process
    transformers + peft + bitsandbytes loop with the same model, steps, batches (the same
    tokenized examples in the same order) and torch threads: whole wall time of each process,
    and steady-state time per step (the simulation's rounds 2+ divided by its local steps,
    against the loop's steps after its first round's worth);
(b) deployment overhead: the same config through a local SuperLink and one SuperNode
    (``--insecure``, no authentication), once with the institution's resident worker
    (``fedft node serve``) and once without it (a fresh ClientApp process per round), against
    the simulation: mean time of rounds 2+;
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

Run: ``python -m simulations.bench [--model PATH] [--rounds N] [--steps N] [--quick] [--out FILE.json]``
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
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO_ROOT / "simulations" / "data" / "demo"
BIN = Path(sys.executable).parent
TAG_VARIABLE = "FEDFT_BENCH_TAG"
# progress-bar switches that would hide the "Loading weights" bars counted for (c)
UNSET_FOR_CHILDREN = ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "TRANSFORMERS_VERBOSITY")
LOAD_BAR = re.compile(r"Loading weights:\s+0%")
RAY_PREFIX = re.compile(r"^\((\w+) pid=(\d+)(?:, ip=[^)]*)?\)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
WORKER_COUNT = re.compile(r"base loads in this worker: (\d+), rounds: (\d+)")
WORKER_ROUND = re.compile(r"worker: round (\d+) of run \d+ done in ([\d.]+) s")


class BenchError(RuntimeError):
    """A benchmark step failed; the message names the step and ends with its log's tail."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the benchmark runs: (a)-(c) on one client, (d) for each number of simulated clients."""

    model: str = "demo"
    device: str = "auto"
    rounds: int = 4
    steps: int = 15
    batch_size: int = 8
    num_threads: int = 1
    eval_examples: int = 2  # held-out rows scored in round 0 and the last round
    clients: tuple[int, ...] = (8, 64, 1000)
    sampled: int = 8
    memory_rounds: int = 1
    memory_steps: int = 2
    timeout_s: float = 480.0  # per process that should end by itself


QUICK = dict(rounds=3, steps=3, clients=(2, 8), sampled=2, memory_steps=1, eval_examples=1, timeout_s=240.0)


# ---- pure helpers: figures and their lines ----

def mean(values: Iterable[float]) -> float:
    values = list(values)
    if not values:
        raise BenchError("no values to average (too few rounds: use --rounds 3 or more)")
    return sum(values) / len(values)


def steady_rounds(rows: list[dict]) -> list[dict]:
    """The metrics rows of rounds 2+ that ran no held-out evaluation."""
    return [r for r in rows if r["round"] >= 2 and "eval_loss" not in r]


def steady_round_seconds(rows: list[dict]) -> float:
    return mean(r["seconds"] for r in steady_rounds(rows))


def seconds_text(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds < 1 else f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"


def bytes_text(size: float) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def ratio_line(label: str, names: tuple[str, str], values: tuple[float, float], text=seconds_text) -> str:
    """'label: A / B = 1.23x  (a vs b)'."""
    first, second = values
    ratio = first / second if second > 0 else float("inf")
    return f"{label}: {names[0]} / {names[1]} = {ratio:.2f}x  ({text(first)} vs {text(second)})"


def difference_line(label: str, names: tuple[str, str], values: tuple[float, float]) -> str:
    """'label: A round − B round = X s' (signed)."""
    return f"{label}: {names[0]} round − {names[1]} round = {values[0] - values[1]:+.2f} s"


def loads_line(label: str, loads: int, per: int, per_name: str, detail: str) -> str:
    """'label: 0.25 per round  (1 load vs 4 rounds; detail)'."""
    ratio = loads / per if per else float("inf")
    return (f"{label}: {ratio:.2f} per {per_name}  ({loads} load{'s' * (loads != 1)} vs {per} "
            f"{per_name}{'s' * (per != 1)}; {detail})")


def count_loads(console: str) -> Counter:
    """Base loads per process in a ``--verbose`` simulation's console: the starts of transformers'
    "Loading weights" bar, keyed by Ray's "(Actor pid=N)" line prefix ("driver" for the simulation
    process itself, which loads the base for the server's evaluation)."""
    counts: Counter = Counter()
    for line in ANSI.sub("", console).split("\n"):  # not splitlines(): a bar's "\r" follows Ray's prefix
        found = len(LOAD_BAR.findall(line))
        if found:
            prefix = RAY_PREFIX.match(line)
            counts[f"{prefix.group(1)} pid={prefix.group(2)}" if prefix else "driver"] += found
    return counts


def worker_loads(log: str) -> tuple[int, int]:
    """(base loads, rounds) from the worker's last "base loads in this worker: K, rounds: R" line."""
    found = WORKER_COUNT.findall(log)
    if not found:
        raise BenchError("the worker's log has no 'base loads in this worker' line: did it run a round?")
    loads, rounds = found[-1]
    return int(loads), int(rounds)


def worker_round_seconds(log: str) -> dict[int, float]:
    """round -> seconds the worker spent on it, from its "round R of run N done in S s" lines."""
    return {int(r): float(s) for r, s in WORKER_ROUND.findall(log)}


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


# ---- processes: started in their own groups, tagged, measured, all stopped ----

def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return b""


class Processes:
    """Every process the benchmark starts (and their descendants, through the environment tag)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tag = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.needle = f"{TAG_VARIABLE}={self.tag}".encode()
        env = {k: v for k, v in os.environ.items() if k not in UNSET_FOR_CHILDREN}
        self.env = {**env, TAG_VARIABLE: self.tag, "FLWR_HOME": str(root / "flwr-home"),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}
        (root / "flwr-home").mkdir(parents=True, exist_ok=True)
        self.started: list[subprocess.Popen] = []
        self._tagged: dict[int, bool] = {}

    def start(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.root / f"{name}.log"
        with log.open("w") as handle:
            process = subprocess.Popen(args, cwd=REPO_ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.started.append(process)
        return process, log

    def tagged(self) -> list[int]:
        """Pids of the live processes carrying this run's tag."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            if pid not in self._tagged:
                environ = _read(f"/proc/{pid}/environ")
                if not environ:
                    continue  # gone, or not ours to read
                tagged = self.needle in environ
                if not tagged and _parent(pid) == os.getpid():
                    continue  # forked here, not yet exec'd with the tagged environment: look again
                self._tagged[pid] = tagged
            if self._tagged[pid] and _alive(pid):
                found.append(pid)
        return found

    def stop_all(self, grace_s: float = 10.0) -> list[int]:
        """Stop every group started, then every tagged process left; return the pids that needed SIGKILL."""
        for process in self.started:
            if process.poll() is None:
                _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self.started:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
        self.started.clear()
        left = _wait_gone(self.tagged, min(5.0, grace_s))  # Ray's helpers leave by themselves once the driver is gone
        for pid in left:
            _signal_pid(pid, signal.SIGTERM)
        left = _wait_gone(self.tagged, 3.0)
        for pid in left:
            _signal_pid(pid, signal.SIGKILL)
        _wait_gone(self.tagged, 3.0)
        return left


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(list_pids, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = [pid for pid in list_pids() if _alive(pid)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _parent(pid: int) -> int:
    fields = _read(f"/proc/{pid}/stat").rpartition(b")")[2].split()
    return int(fields[1]) if len(fields) > 1 else 0


def _alive(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    return bool(stat) and b") Z " not in stat  # a zombie has exited; its parent reaps it


class TreeSampler:
    """Polls the tagged processes: the peak of their summed RSS (and, with ``pss``, of their summed PSS,
    which splits shared pages between the processes sharing them), the processes at the RSS peak, and
    every command line seen."""

    def __init__(self, processes: Processes, interval_s: float = 0.2, pss: bool = False) -> None:
        self.processes = processes
        self.interval_s = interval_s
        self.pss = pss
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = pss = count = 0
            for pid in self.processes.tagged():
                statm = _read(f"/proc/{pid}/statm").split()
                if len(statm) < 2:
                    continue
                rss += int(statm[1]) * self._page
                pss += _pss(pid) if self.pss else 0
                count += 1
                cmdline = _read(f"/proc/{pid}/cmdline")  # read again: Ray renames a worker once it is an actor
                if cmdline:
                    self.seen[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace")
            if rss > self.peak_rss:
                self.peak_rss, self.peak_processes = rss, count
            self.peak_pss = max(self.peak_pss, pss)
            self._stop.wait(self.interval_s)

    def count(self, marker: str) -> int:
        """How many distinct processes whose command line holds ``marker`` were seen."""
        return sum(marker in cmd for cmd in self.seen.values())


def _pss(pid: int) -> int:
    """A process's proportional set size in bytes (0 when it is gone or the kernel has no smaps_rollup)."""
    for line in _read(f"/proc/{pid}/smaps_rollup").split(b"\n"):
        if line.startswith(b"Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_for(process: subprocess.Popen, log: Path, what: str, timeout_s: float) -> float:
    """Wait for ``process`` to exit 0; its wall time from now. A failure names ``what`` with the log's tail."""
    started = time.monotonic()
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} did not finish within {timeout_s:.0f} s; log {log}:\n{tail(log)}") from None
    if code != 0:
        raise BenchError(f"{what} exited with {code}; log {log}:\n{tail(log)}")
    return time.monotonic() - started


def tail(log: Path, chars: int = 3000) -> str:
    return log_text(log)[-chars:] if log.exists() else "(no log)"


def log_text(log: Path) -> str:
    """A log as written: its progress bars' carriage returns kept (``read_text`` turns them into newlines)."""
    return log.read_bytes().decode(errors="replace")


def metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise BenchError(f"{path} is missing: the run did not record its rounds")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- (a) the simulation and the plain loop ----

def run_simulation(procs: Processes, config: Path, out: Path, name: str, timeout_s: float,
                   verbose: bool = False) -> dict:
    """``fedft simulate`` as a subprocess: wall time, metrics rows, console, peak RSS (and, with
    ``verbose``, PSS) of its process tree."""
    args = [sys.executable, "-m", "simulations.cli", "simulate", "--config", str(config), "--out", str(out)]
    with TreeSampler(procs, pss=verbose) as sampler:
        started = time.monotonic()
        process, log = procs.start(name, args + (["--verbose"] if verbose else []))
        wait_for(process, log, f"the simulation ({name})", timeout_s)
        wall = time.monotonic() - started
    procs.stop_all()  # Ray's helpers, should any outlive the driver
    return {"wall_s": wall, "rows": metrics_rows(out), "console": log_text(log),
            "peak_rss": sampler.peak_rss, "peak_pss": sampler.peak_pss, "peak_processes": sampler.peak_processes,
            "ray_actors": sampler.count("ray::ClientAppActor")}


def run_plain(procs: Processes, config: Path, out: Path, timeout_s: float) -> dict:
    """The plain loop (``plain_loop``) in its own process, as the simulation runs in its own."""
    started = time.monotonic()
    process, log = procs.start("plain-loop", [sys.executable, "-m", "simulations.bench", "--plain-loop",
                                              str(config), "--out", str(out)])
    wait_for(process, log, "the plain transformers + peft loop", timeout_s)
    result = json.loads(out.read_text())
    result["wall_s"] = time.monotonic() - started
    return result


def plain_loop(config_path: Path) -> dict:
    """transformers + peft + bitsandbytes, no fedft in the loop: the simulated client's rounds back to back.

    The same model, quantization, LoRA, threads, tokenized examples and batch indices as client 0
    of the simulation (fedft's data preparation and batch order are reused; loading, the optimizer
    and the steps are written out here). Returns the load time and every step's time.
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from fedft.config import load_config
    from fedft.data.partition import partition_dataset
    from fedft.data.rows import collate, load_dataset_files, tokenize_dataset
    from fedft.federated.client_round import client_seed
    from fedft.model.load import lora_targets  # fedft's choice of layers (experts of a MoE base stay frozen)
    from fedft.train.local import batch_indices

    cfg = load_config(config_path)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = torch.device("cuda:0" if cfg.model.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.model.device == "auto" else cfg.model.device)
    dtype = getattr(torch, cfg.model.compute_dtype)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=cfg.model.double_quant, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, quantization_config=quant, dtype=dtype,
                                                 device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.model.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                             target_modules=lora_targets(model, cfg.lora.target_modules),
                                             task_type="CAUSAL_LM"))
    model.config.use_cache = False
    load_s = time.perf_counter() - started
    all_rows = load_dataset_files(cfg.data.train_files, cfg.data.columns)
    rows = partition_dataset(all_rows, cfg.data, cfg.simulation.num_supernodes)[0]  # client 0's part
    examples = tokenize_dataset(rows, tokenizer, cfg.data)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    step_s = []
    for round_index in range(1, cfg.strategy.num_rounds + 1):
        optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
        batches = batch_indices(len(examples), cfg.train.batch_size, client_seed(cfg, round_index, 0))
        for _ in range(cfg.train.local_steps):
            t0 = time.perf_counter()
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in next(batches)],
                                                         tokenizer.pad_token_id).items()}
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_s.append(time.perf_counter() - t0)
    return {"load_s": load_s, "step_s": step_s, "examples": len(examples)}


# ---- (b) a local SuperLink and one SuperNode ----

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if not path:
        raise BenchError(f"{name} is not installed: install fedft (it brings flwr) in this environment")
    return path


def wait_until(ready, process: subprocess.Popen, log: Path, what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None:
            raise BenchError(f"{what} exited with {process.returncode}; log {log}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} was not ready after {timeout_s:.0f} s; log {log}:\n{tail(log)}")
        time.sleep(0.3)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_superlink(procs: Processes) -> int:
    """A SuperLink without TLS or SuperNode authentication, and ``flwr``'s connection "bench" to it."""
    port = free_port()
    process, log = procs.start("superlink", [tool("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                             "--port", str(port), "--disable-runtime-dependency-installation"])
    wait_until(lambda: port_open(port), process, log, "the SuperLink")
    (procs.root / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    return port


def supernode_online(procs: Processes) -> bool:
    listed = subprocess.run([tool("flwr"), "supernode", "list", "bench", "--format", "json"], cwd=REPO_ROOT,
                            env=procs.env, capture_output=True, text=True, timeout=60)
    return '"online"' in listed.stdout


def run_deployment(procs: Processes, s: Settings, config: Path, data: Path, *, worker: bool) -> dict:
    """One job of ``flwr run`` on a fresh local SuperLink and one SuperNode; every process stopped after."""
    name = "deploy-worker" if worker else "deploy-plain"
    out = procs.root / name  # the job's out-dir: the ServerApp's run directory
    port = start_superlink(procs)
    own = f"data-path='{data}' device='{s.device}'"
    worker_log = None
    if worker:
        sock = procs.root / f"{name}.sock"
        process, worker_log = procs.start(f"{name}-worker", [sys.executable, "-m", "simulations.cli", "node", "serve",
                                                             "--socket", str(sock), "--node-config", own])
        wait_until(sock.exists, process, worker_log, "the resident worker")
        own = f"worker='{sock}'"
    process, node_log = procs.start(f"{name}-supernode", [
        tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
        "--node-config", own])
    wait_until(lambda: supernode_online(procs), process, node_log, "the SuperNode", timeout_s=120)
    with TreeSampler(procs) as sampler:
        run, run_log = procs.start(f"{name}-flwr-run", [tool("flwr"), "run", ".", "bench", "--stream", "--run-config",
                                                        f"config='{config}' out-dir='{out}'"])
        wall = wait_for(run, run_log, f"flwr run ({name})", s.timeout_s)
    procs.stop_all()
    if not (out / "summary.json").is_file():
        logs = "\n".join(f"--- {p.name}\n{tail(p, 1500)}" for p in (run_log, node_log, worker_log) if p)
        raise BenchError(f"the {name} job did not finish (no {out / 'summary.json'}):\n{logs}")
    return {"wall_s": wall, "rows": metrics_rows(out), "node_log": log_text(node_log),
            "worker_log": log_text(worker_log) if worker_log else "",
            "clientapp_processes": sampler.count("flwr-clientapp"), "peak_rss": sampler.peak_rss}


# ---- the figures ----

def figures_a(sim: dict, plain: dict, s: Settings) -> list[str]:
    sim_step = steady_round_seconds(sim["rows"]) / s.steps
    plain_step = mean(plain["step_s"][s.steps:])  # after the first round's worth of steps
    return [ratio_line("(a) whole wall time", ("simulation", "plain loop"), (sim["wall_s"], plain["wall_s"])),
            ratio_line("(a) steady-state step", ("simulation", "plain loop"), (sim_step, plain_step))]


def figures_b(sim: dict, deployed: dict[str, dict]) -> list[str]:
    lines, sim_round = [], steady_round_seconds(sim["rows"])
    for label, run in deployed.items():
        values = (steady_round_seconds(run["rows"]), sim_round)
        lines.append(ratio_line(f"(b) round time, {label}", ("deployment", "simulation"), values))
        lines.append(difference_line(f"(b) round time, {label}", ("deployment", "simulation"), values))
        if run["worker_log"]:  # where the resident worker's round goes: training there, the rest in Flower
            inside = worker_round_seconds(run["worker_log"])
            trained = mean(inside[r["round"]] for r in steady_rounds(run["rows"]) if r["round"] in inside)
            lines.append(ratio_line(f"(b) round time, {label}", ("in the worker", "whole round"), (trained, values[0])))
    return lines


def client_rounds(rows: list[dict]) -> int:
    return sum(r.get("clients", 0) for r in rows if r["round"] >= 1)


def figures_c(deployed: dict[str, dict], memory: dict[int, dict], s: Settings) -> list[str]:
    lines = []
    for label, run in deployed.items():
        bars = len(LOAD_BAR.findall(ANSI.sub("", run["node_log"])))  # the ClientApp processes' loads
        apps = f"{run['clientapp_processes']} flwr-clientapp processes seen, {bars} loads in them"
        if run["worker_log"]:
            loads, rounds = worker_loads(run["worker_log"])
            lines.append(loads_line(f"(c) base loads, deployment, {label}", loads, rounds, "round",
                                    f"1 worker process for 1 institution, from its log; {apps}"))
        else:
            lines.append(loads_line(f"(c) base loads, deployment, {label}", bars, client_rounds(run["rows"]), "round",
                                    f"1 institution; {apps}"))
    for clients, run in memory.items():
        counts = count_loads(run["console"])
        actors = {k: v for k, v in counts.items() if k != "driver"}
        each = "/".join(map(str, sorted(actors.values()))) or "-"
        detail = (f"{len(actors)} Ray actors loaded ({each} each), {run['ray_actors']} actors seen; "
                  f"+{counts.get('driver', 0)} in the simulation process, for the server's evaluation")
        lines.append(loads_line(f"(c) base loads, simulation, N={clients} ({min(s.sampled, clients)} sampled)",
                                sum(actors.values()), client_rounds(run["rows"]), "client-round", detail))
    return lines


def figures_d(memory: dict[int, dict], s: Settings) -> list[str]:
    if not memory:
        return []
    items = list(memory.items())
    first_n, first = items[0]
    lines = [f"(d) peak RSS of the process tree, N={first_n} ({min(s.sampled, first_n)} sampled): "
             f"{bytes_text(first['peak_rss'])} over {first['peak_processes']} processes "
             f"(PSS {bytes_text(first['peak_pss'])})"]
    for clients, run in items[1:]:
        lines.append(ratio_line(f"(d) peak RSS, {min(s.sampled, clients)} sampled",
                                (f"N={clients}", f"N={first_n}"), (run["peak_rss"], first["peak_rss"]), bytes_text)
                     + f"; {run['peak_processes']} processes at the peak (PSS {bytes_text(run['peak_pss'])})")
    return lines


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
        sim = staged(stages, f"(a) fedft simulate, 1 client, {s.rounds} rounds x {s.steps} steps",
                     lambda: run_simulation(procs, one, root / "sim", "simulate", s.timeout_s))
        plain = staged(stages, "(a) plain transformers + peft + bitsandbytes loop, same steps and batches",
                       lambda: run_plain(procs, one, root / "plain.json", s.timeout_s))
        for label, worker in (("resident worker", True), ("no worker", False)):
            deployed[label] = staged(stages, f"(b) flwr run, local SuperLink + 1 SuperNode, {label}",
                                     lambda w=worker: run_deployment(procs, s, one, data, worker=w))
        for clients in s.clients:
            memory[clients] = staged(stages, f"(d) fedft simulate --verbose, {clients} clients, "
                                             f"{min(s.sampled, clients)} sampled",
                                     lambda n=clients: run_memory(procs, s, root, n))
    finally:
        killed = procs.stop_all()
        if killed:
            say(f"stopped {len(killed)} leftover processes with SIGKILL: {killed}")
    lines = figures_a(sim, plain, s) + figures_b(sim, deployed) + figures_c(deployed, memory, s) + figures_d(memory, s)
    results = {"settings": dataclasses.asdict(s), "stage_s": stages, "simulation": _numbers(sim),
               "plain_loop": plain, "deployment": {k: _numbers(v) for k, v in deployed.items()},
               "memory": {str(k): _numbers(v) for k, v in memory.items()}, "figures": lines}
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
    if args.model != "demo":
        values["model"] = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    values["device"] = resolve_device(args.device)
    s = Settings(**values)
    if s.rounds < 3:
        raise BenchError(f"--rounds {s.rounds}: at least 3 (round 1 loads the base, the last round evaluates)")
    if s.steps < 1 or s.sampled < 1:
        raise BenchError(f"--steps {s.steps}, --sampled {s.sampled}: each at least 1")
    rows = sum(1 for _ in (DEMO_DATA / "train.jsonl").open())
    if max(s.clients) > rows:
        raise BenchError(f"--clients: at most {rows} simulated clients (the demo's training rows)")
    return s


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
