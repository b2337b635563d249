"""The benchmark's figures (``python -m simulations.bench``): its settings, the lines it prints and
what it reads from logs and metrics rows. Pure: text and numbers in, text and numbers out.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable
from statistics import median

LOAD_BAR = re.compile(r"Loading weights:\s+0%")


# "(ClientAppActor pid=N)", or "(pid=N)" before the worker became an actor (its warm-up: simulations/ray_cluster.py)
RAY_PREFIX = re.compile(r"^\((?:\w+ )?pid=(\d+)(?:, ip=[^)]*)?\)")


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
    parts: tuple[str, ...] = ("a", "b", "d")  # which measurements run; (c) comes from (b) and (d)
    repeat: int = 1  # (a)'s simulation and plain loop, each this many times, alternating which runs first


QUICK = dict(rounds=3, steps=3, clients=(2, 8), sampled=2, memory_steps=1, eval_examples=1, timeout_s=240.0)


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
    "Loading weights" bar, keyed by the process id in Ray's "(Actor pid=N)" or "(pid=N)" line
    prefix ("driver" for the simulation process itself, which loads the base for the server's
    evaluation)."""
    counts: Counter = Counter()
    for line in ANSI.sub("", console).split("\n"):  # not splitlines(): a bar's "\r" follows Ray's prefix
        found = len(LOAD_BAR.findall(line))
        if found:
            prefix = RAY_PREFIX.match(line)
            counts[f"Ray worker pid={prefix.group(1)}" if prefix else "driver"] += found
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


def client_rounds(rows: list[dict]) -> int:
    return sum(r.get("clients", 0) for r in rows if r["round"] >= 1)


def figures_a(sims: list[dict], plains: list[dict], s: Settings) -> list[str]:
    """(a) from one or more runs of each (``--repeat``): with several, each figure is the median of
    each side's runs, and a line gives every pair's whole-run ratio (how much the machine moved)."""
    suffix = f" (median of {len(sims)} runs each)" if len(sims) > 1 else ""
    walls = (median(r["wall_s"] for r in sims), median(p["wall_s"] for p in plains))
    steps = (median(steady_round_seconds(r["rows"]) / s.steps for r in sims),
             median(mean(p["step_s"][s.steps:]) for p in plains))  # after the first round's worth of steps
    lines = [ratio_line(f"(a) whole wall time{suffix}", ("simulation", "plain loop"), walls),
             ratio_line(f"(a) steady-state step{suffix}", ("simulation", "plain loop"), steps)]
    if len(sims) > 1:
        pairs = [f"{r['wall_s'] / p['wall_s']:.2f}x ({seconds_text(r['wall_s'])} vs {seconds_text(p['wall_s'])})"
                 for r, p in zip(sims, plains)]
        lines.append(f"(a) whole wall time, run by run: simulation / plain loop = {', '.join(pairs)}")
    if plains[0].get("losses"):
        lines.append(same_work_line(sims[0]["rows"], plains[0]["losses"], s.steps))
    return lines


def same_work_line(rows: list[dict], plain_losses: list[float], steps: int) -> str:
    """Whether the two did the same arithmetic: each round's training loss in the simulation (its
    metrics rows) against the mean of the plain loop's losses over that round's steps."""
    trained = [r for r in rows if r.get("train_loss") is not None]
    plain = [mean(plain_losses[i:i + steps]) for i in range(0, len(plain_losses), steps)]
    gaps = [abs(r["train_loss"] - plain[r["round"] - 1]) for r in trained if r["round"] - 1 < len(plain)]
    return (f"(a) same arithmetic: training loss per round, simulation vs plain loop: largest difference "
            f"{max(gaps, default=float('nan')):.4f} over {len(gaps)} rounds")


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
