"""The overhead benchmark (simulations/bench.py): its figures from known inputs, its process handling,
and one ``--quick`` run that prints every figure with numbers and leaves no process behind."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedft.config import load_config
from simulations import bench
from tests.conftest import REPO_ROOT

BAR = "Loading weights:   0%|          | 0/38 [00:00<?, ?it/s]\rLoading weights: 100%|##| 38/38 [00:00<00:00]"


def _rows(*seconds_and_eval: tuple[float, bool]) -> list[dict]:
    rows = []
    for index, (seconds, evaluated) in enumerate(seconds_and_eval):
        row = {"round": index, "seconds": seconds, "clients": 0 if index == 0 else 1}
        if evaluated:
            row["eval_loss"] = 1.0
        rows.append(row)
    return rows


def test_ratio_and_difference_lines_carry_the_ratio_and_both_values():
    assert (bench.ratio_line("(a) whole wall time", ("simulation", "plain loop"), (30.0, 12.0))
            == "(a) whole wall time: simulation / plain loop = 2.50x  (30.0 s vs 12.0 s)")
    assert (bench.ratio_line("(a) step", ("A", "B"), (0.25, 0.2))
            == "(a) step: A / B = 1.25x  (0.250 s vs 0.200 s)")
    assert (bench.difference_line("(b) round time, no worker", ("deployment", "simulation"), (7.5, 9.0))
            == "(b) round time, no worker: deployment round − simulation round = -1.50 s")
    assert bench.ratio_line("x", ("A", "B"), (1.0, 0.0)).startswith("x: A / B = infx")
    assert (bench.ratio_line("(d) peak RSS", ("N=64", "N=8"), (3 * 2**30, 2**31), bench.bytes_text)
            == "(d) peak RSS: N=64 / N=8 = 1.50x  (3.00 GiB vs 2.00 GiB)")
    assert bench.bytes_text(300 * 2**20) == "300 MiB"
    assert [bench.seconds_text(s) for s in (0.1234, 5.678, 61.24)] == ["0.123 s", "5.68 s", "61.2 s"]


def test_loads_line_says_loads_per_round_with_both_counts():
    assert (bench.loads_line("(c) w", 1, 4, "round", "d")
            == "(c) w: 0.25 per round  (1 load vs 4 rounds; d)")
    line = bench.loads_line("(c) s", 2, 8, "client-round", "d")
    assert line == "(c) s: 0.25 per client-round  (2 loads vs 8 client-rounds; d)"


def test_steady_rounds_leave_out_round_one_and_evaluated_rounds():
    rows = _rows((9.0, True), (20.0, False), (2.0, False), (4.0, False), (30.0, True))
    assert [r["round"] for r in bench.steady_rounds(rows)] == [2, 3]
    assert bench.steady_round_seconds(rows) == 3.0
    with pytest.raises(bench.BenchError, match="--rounds 3 or more"):
        bench.steady_round_seconds(_rows((9.0, True), (20.0, False), (30.0, True)))


def test_base_loads_are_counted_per_ray_actor_from_a_verbose_console(tmp_path):
    console = (f"\r{BAR}\n"  # the simulation process itself (the server's evaluation)
               f"\x1b[36m(ClientAppActor pid=11)\x1b[0m \r{BAR}\n"
               f"\x1b[36m(pid=12)\x1b[0m \rLoading weights:   0%|   | 0/38\n"  # its warm-up, before it was an actor
               f"\x1b[36m(pid=12)\x1b[0m \rLoading weights:  50%|   | 19/38\n"
               "\x1b[36m(ClientAppActor pid=12)\x1b[0m round 1 trained\n")
    log = tmp_path / "console.log"
    log.write_bytes(console.encode())
    text = bench.log_text(log)
    assert "\r" in text  # read_text would have turned the bars' carriage returns into line breaks
    assert bench.count_loads(text) == {"driver": 1, "Ray worker pid=11": 1, "Ray worker pid=12": 1}


def test_the_worker_log_gives_loads_rounds_and_time_per_round():
    log = ("INFO fedft.client: worker: round 1 of run 7 done in 5.2 s (base loads in this worker: 1, rounds: 1)\n"
           "INFO fedft.client: worker: round 2 of run 7 done in 0.4 s (base loads in this worker: 1, rounds: 2)\n"
           "INFO fedft.client: worker: round 3 of run 7 not trained in 0.1 s "
           "(base loads in this worker: 1, rounds: 3)\n")
    assert bench.worker_loads(log) == (1, 3)
    assert bench.worker_round_seconds(log) == {1: 5.2, 2: 0.4}
    with pytest.raises(bench.BenchError, match="base loads in this worker"):
        bench.worker_loads("fedft worker: listening on /tmp/w.sock\n")


def test_the_figures_from_known_runs():
    settings = bench.Settings(rounds=4, steps=10, clients=(8, 64), sampled=8)
    sim = {"wall_s": 60.0, "rows": _rows((5.0, True), (12.0, False), (3.0, False), (5.0, False), (9.0, True))}
    plain = {"wall_s": 20.0, "step_s": [1.0] * 10 + [0.2] * 30}
    worker_log = "".join(f"worker: round {r} of run 1 done in {s} s (base loads in this worker: 1, rounds: {r})\n"
                         for r, s in ((1, 6.0), (2, 1.0), (3, 2.0), (4, 1.0)))
    deployed = {
        "resident worker": {"rows": _rows((1.0, True), (15.0, False), (6.0, False), (6.0, False), (9.0, True)),
                            "worker_log": worker_log, "node_log": "", "clientapp_processes": 4},
        "no worker": {"rows": _rows((1.0, True), (15.0, False), (12.0, False), (14.0, False), (20.0, True)),
                      "worker_log": "", "node_log": f"{BAR}\n" * 4, "clientapp_processes": 4},
    }
    actor = "\x1b[36m(ClientAppActor pid={})\x1b[0m \r" + BAR + "\n"
    memory = {n: {"rows": [{"round": 0, "clients": 0}, {"round": 1, "clients": 8}], "console": BAR + "\n"
                  + actor.format(1) + actor.format(2), "ray_actors": 2, "peak_rss": rss, "peak_pss": rss // 2,
                  "peak_processes": 11} for n, rss in ((8, 2**31), (64, 3 * 2**30))}
    lines = (bench.figures_a([sim], [plain], settings) + bench.figures_b(sim, deployed)
             + bench.figures_c(deployed, memory, settings) + bench.figures_d(memory, settings))
    assert lines == [
        "(a) whole wall time: simulation / plain loop = 3.00x  (60.0 s vs 20.0 s)",
        "(a) steady-state step: simulation / plain loop = 2.00x  (0.400 s vs 0.200 s)",
        "(b) round time, resident worker: deployment / simulation = 1.50x  (6.00 s vs 4.00 s)",
        "(b) round time, resident worker: deployment round − simulation round = +2.00 s",
        "(b) round time, resident worker: in the worker / whole round = 0.25x  (1.50 s vs 6.00 s)",
        "(b) round time, no worker: deployment / simulation = 3.25x  (13.0 s vs 4.00 s)",
        "(b) round time, no worker: deployment round − simulation round = +9.00 s",
        "(c) base loads, deployment, resident worker: 0.25 per round  (1 load vs 4 rounds; 1 worker process for "
        "1 institution, from its log; 4 flwr-clientapp processes seen, 0 loads in them)",
        "(c) base loads, deployment, no worker: 1.00 per round  (4 loads vs 4 rounds; 1 institution; "
        "4 flwr-clientapp processes seen, 4 loads in them)",
        "(c) base loads, simulation, N=8 (8 sampled): 0.25 per client-round  (2 loads vs 8 client-rounds; "
        "2 Ray actors loaded (1/1 each), 2 actors seen; +1 in the simulation process, for the server's evaluation)",
        "(c) base loads, simulation, N=64 (8 sampled): 0.25 per client-round  (2 loads vs 8 client-rounds; "
        "2 Ray actors loaded (1/1 each), 2 actors seen; +1 in the simulation process, for the server's evaluation)",
        "(d) peak RSS of the process tree, N=8 (8 sampled): 2.00 GiB over 11 processes (PSS 1.00 GiB)",
        "(d) peak RSS, 8 sampled: N=64 / N=8 = 1.50x  (3.00 GiB vs 2.00 GiB); 11 processes at the peak "
        "(PSS 1.50 GiB)",
    ]


def test_repeated_runs_give_each_side_s_median_and_every_pair_s_ratio():
    settings = bench.Settings(rounds=3, steps=2, repeat=3)
    sims = [{"wall_s": wall, "rows": _rows((1.0, True), (9.0, False), (step, False), (1.0, True))}
            for wall, step in ((110.0, 0.6), (100.0, 0.4), (130.0, 0.5))]
    plains = [{"wall_s": wall, "step_s": [1.0, 1.0] + [step] * 4} for wall, step in ((100.0, 0.2), (80.0, 0.3),
                                                                                      (90.0, 0.25))]
    assert bench.figures_a(sims, plains, settings) == [
        "(a) whole wall time (median of 3 runs each): simulation / plain loop = 1.22x  (110.0 s vs 90.0 s)",
        "(a) steady-state step (median of 3 runs each): simulation / plain loop = 1.00x  (0.250 s vs 0.250 s)",
        "(a) whole wall time, run by run: simulation / plain loop = 1.10x (110.0 s vs 100.0 s), "
        "1.25x (100.0 s vs 80.0 s), 1.44x (130.0 s vs 90.0 s)",
    ]


def test_the_same_arithmetic_line_compares_each_round_training_loss():
    rows = _rows((5.0, True), (12.0, False), (3.0, False), (4.0, True))
    for row, loss in zip(rows[1:], (2.0, 1.5, 1.0)):
        row["train_loss"] = loss
    plain = {"wall_s": 20.0, "step_s": [0.2] * 6, "losses": [2.5, 1.5, 1.0, 2.1, 1.0, 1.0]}  # rounds of 2 steps
    settings = bench.Settings(rounds=3, steps=2)
    lines = bench.figures_a([{"wall_s": 30.0, "rows": rows}], [plain], settings)
    assert lines[-1] == ("(a) same arithmetic: training loss per round, simulation vs plain loop: largest "
                         "difference 0.0500 over 3 rounds")
    older = {k: v for k, v in plain.items() if k != "losses"}  # a plain loop that kept no losses: no such line
    assert len(bench.figures_a([{"wall_s": 30.0, "rows": rows}], [older], settings)) == 2


def test_the_configs_sample_a_fixed_number_of_clients(tmp_path):
    settings = bench.Settings(device="cpu")
    text = bench.bench_toml(settings, bench.DEMO_DATA / "train.jsonl", clients=1000, sampled=8, rounds=1, steps=2)
    cfg = load_config(bench.write_config(tmp_path / "memory.toml", text))
    assert cfg.simulation.num_supernodes == 1000 and cfg.strategy.min_train_nodes == 8
    assert int(1000 * cfg.strategy.fraction_train) == 8 and cfg.strategy.eval_every == 0
    assert cfg.train.num_threads == 1 and cfg.simulation.num_gpus == 0 and not cfg.report.evaluate_stages
    one = load_config(bench.write_config(tmp_path / "one.toml", bench.bench_toml(
        bench.Settings(device="cuda"), tmp_path / "inst0.jsonl", clients=1, sampled=1, rounds=4, steps=15)))
    assert one.strategy.fraction_train == 1.0 and one.simulation.num_gpus > 0  # Ray shows actors the GPU
    with pytest.raises(bench.BenchError, match="refused"):
        bench.write_config(tmp_path / "bad.toml", text.replace("min_train_nodes = 8", "min_train_nodes = 2000"))


def test_quick_settings_and_refused_arguments():
    quick = bench.settings_from(bench.parse_args(["--quick", "--device", "cpu"]))
    assert (quick.rounds, quick.steps, quick.clients, quick.sampled) == (3, 3, (2, 8), 2)
    full = bench.settings_from(bench.parse_args(["--device", "cpu", "--clients", "8,64", "--steps", "5"]))
    assert (full.rounds, full.steps, full.clients, full.sampled) == (4, 5, (8, 64), 8)
    with pytest.raises(bench.BenchError, match="at least 3"):
        bench.settings_from(bench.parse_args(["--rounds", "2", "--device", "cpu"]))
    with pytest.raises(bench.BenchError, match="at most 1600"):
        bench.settings_from(bench.parse_args(["--clients", "5000", "--device", "cpu"]))
    with pytest.raises(SystemExit):
        bench.parse_args(["--clients", "8,x"])
    assert bench.settings_from(bench.parse_args(["--parts", "a,d", "--device", "cpu"])).parts == ("a", "d")
    for parts in ("b", "a,c", "a,,b"):
        with pytest.raises(SystemExit):  # (a) is (b)'s reference; (c) is not run on its own
            bench.parse_args(["--parts", parts])


def test_the_benchmark_runs_each_step_once_in_order_and_stops_everything(tmp_path, monkeypatch):
    calls, stopped = [], []
    rows = _rows((1.0, True), (9.0, False), (2.0, False), (3.0, True))
    worker_log = "".join(f"worker: round {r} of run 1 done in 1.0 s (base loads in this worker: 1, rounds: {r})\n"
                         for r in (1, 2, 3))

    def simulation(procs, config, out, name, timeout_s, verbose=False):
        calls.append(("simulate", name, verbose, load_config(config).simulation.num_supernodes))
        return {"wall_s": 30.0, "rows": rows, "console": BAR + "\n", "peak_rss": 2**30, "peak_pss": 2**29,
                "peak_processes": 9, "ray_actors": 2}

    def deployment(procs, s, config, data, *, worker, poll_s=None):
        calls.append(("deploy", worker, poll_s, data.name))
        return {"wall_s": 40.0, "rows": rows, "node_log": "" if worker else f"{BAR}\n" * 3,
                "worker_log": worker_log if worker else "", "clientapp_processes": 3, "peak_rss": 1}

    monkeypatch.setattr(bench, "run_simulation", simulation)
    monkeypatch.setattr(bench, "run_plain", lambda procs, config, out, timeout_s: calls.append(("plain",))
                        or {"wall_s": 10.0, "step_s": [0.1] * 9, "load_s": 1.0})
    monkeypatch.setattr(bench, "run_deployment", deployment)
    monkeypatch.setattr(bench.Processes, "stop_all", lambda self, grace_s=10.0: stopped.append(True) or [])
    settings = bench.Settings(device="cpu", rounds=3, steps=3, clients=(2, 8), sampled=2)
    lines, results = bench.run_benchmark(settings, tmp_path)
    assert calls == [("simulate", "simulate", False, 1), ("plain",), ("deploy", True, 0.25, "inst0.jsonl"),
                     ("deploy", True, None, "inst0.jsonl"), ("deploy", False, None, "inst0.jsonl"),
                     ("simulate", "memory-2", True, 2), ("simulate", "memory-8", True, 8)]
    assert stopped == [True]
    assert len(lines) == 17 and results["figures"] == lines
    assert list(results["stage_s"])[0] == "(a) fedft simulate, 1 client, 3 rounds x 3 steps"
    assert results["memory"]["8"]["loads"] == {"driver": 1}
    assert len((tmp_path / "inst0.jsonl").read_text().splitlines()) == 400
    calls.clear()
    lines, _ = bench.run_benchmark(dataclasses.replace(settings, parts=("a",)), tmp_path / "only-a")
    assert calls == [("simulate", "simulate", False, 1), ("plain",)]  # --parts a: (a) alone
    assert [line.split(":")[0] for line in lines] == ["(a) whole wall time", "(a) steady-state step"]
    calls.clear()
    lines, results = bench.run_benchmark(dataclasses.replace(settings, parts=("a",), repeat=2), tmp_path / "twice")
    assert calls == [("simulate", "simulate", False, 1), ("plain",), ("plain",), ("simulate", "simulate", False, 1)]
    assert lines[2].startswith("(a) whole wall time, run by run") and len(results["simulations"]) == 2
    assert list(results["stage_s"])[:2] == ["(a) fedft simulate, 1 client, 3 rounds x 3 steps (run 1 of 2)",
                                            "(a) plain transformers + peft + bitsandbytes loop, same steps and "
                                            "batches (run 1 of 2)"]


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and ") Z " not in stat.read_text()


def test_every_process_started_is_stopped_even_one_in_a_session_of_its_own(tmp_path):
    """A grandchild that left the child's process group (as Ray's helpers may) still carries the tag."""
    procs = bench.Processes(tmp_path)
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(120)\n")
    with bench.TreeSampler(procs, interval_s=0.05, pss=True) as sampler:
        child, _ = procs.start("child", [sys.executable, "-c", code])
        deadline = time.monotonic() + 30
        while not pid_file.exists() or len(procs.tagged()) < 2:
            assert time.monotonic() < deadline, "the child did not start its grandchild"
            time.sleep(0.1)
        grandchild = int(pid_file.read_text())
        assert set(procs.tagged()) == {child.pid, grandchild}
        time.sleep(0.3)
    assert sampler.peak_processes == 2 and sampler.peak_rss > sampler.peak_pss > 0
    assert sampler.count("time.sleep(120)") == 2
    killed = procs.stop_all(grace_s=1.0)
    assert killed == [] and child.returncode is not None  # SIGTERM was enough for both
    assert not _alive(grandchild) and procs.tagged() == []


def _tagged_with(prefix: str) -> list[int]:
    """Pids of live processes whose environment carries a bench tag starting with ``prefix``."""
    needle = f"{bench.TAG_VARIABLE}={prefix}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _alive(int(entry)):
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if needle in environ:
                found.append(int(entry))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FEDFT_BENCH_TESTS") != "1",
                    reason="starts the benchmark's first simulation: FEDFT_BENCH_TESTS=1 runs it (docs/benchmark.md)")
def test_ctrl_c_stops_every_process_the_benchmark_started(tmp_path):
    bench_run = subprocess.Popen([sys.executable, "-m", "simulations.bench", "--quick", "--device", "cpu",
                                  "--work-dir", str(tmp_path / "work")], cwd=REPO_ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not any("raylet" in _cmdline(pid) for pid in _tagged_with(f"{bench_run.pid}-")):
            assert bench_run.poll() is None and time.monotonic() < deadline, "Ray did not start"
            time.sleep(0.5)
        bench_run.send_signal(signal.SIGINT)
        output, _ = bench_run.communicate(timeout=120)
    finally:
        if bench_run.poll() is None:
            bench_run.kill()
    assert bench_run.returncode == 130, output[-3000:]
    assert "interrupted; every process it started was stopped" in output
    assert _tagged_with(f"{bench_run.pid}-") == []


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FEDFT_BENCH_TESTS") != "1",
                    reason="about 4 minutes on 2 idle cores: FEDFT_BENCH_TESTS=1 runs it (docs/benchmark.md)")
def test_quick_prints_every_figure_with_numbers_and_leaves_nothing_running(tmp_path):
    out = tmp_path / "bench.json"
    bench_run = subprocess.Popen([sys.executable, "-m", "simulations.bench", "--quick", "--device", "cpu",
                                  "--out", str(out)], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
    try:
        output, _ = bench_run.communicate(timeout=1500)
    finally:
        if bench_run.poll() is None:
            bench_run.send_signal(signal.SIGINT)  # the benchmark stops what it started
            bench_run.communicate(timeout=120)
    assert bench_run.returncode == 0, output[-6000:]
    assert _tagged_with(f"{bench_run.pid}-") == []
    figures = [line.strip() for line in output.splitlines() if re.match(r"\s+\([abcd]\) ", line)]
    number = r"-?\d+(\.\d+)?"
    ratio = re.compile(rf"= {number}x  \({number} (s|MiB|GiB) vs {number} (s|MiB|GiB)\)")
    expected = [
        ("(a) whole wall time: simulation / plain loop", ratio),
        ("(a) steady-state step: simulation / plain loop", ratio),
        ("(b) round time, resident worker, fedft node supernode: deployment / simulation", ratio),
        ("(b) round time, resident worker, fedft node supernode: deployment round − simulation round",
         re.compile(rf"= [+-]{number} s$")),
        ("(b) round time, resident worker, fedft node supernode: in the worker / whole round", ratio),
        ("(b) round time, resident worker: deployment / simulation", ratio),
        ("(b) round time, resident worker: deployment round − simulation round", re.compile(rf"= [+-]{number} s$")),
        ("(b) round time, resident worker: in the worker / whole round", ratio),
        ("(b) round time, no worker: deployment / simulation", ratio),
        ("(b) round time, no worker: deployment round − simulation round", re.compile(rf"= [+-]{number} s$")),
        ("(c) base loads, deployment, resident worker, fedft node supernode: 0.33 per round  (1 load vs 3 rounds",
         None),
        ("(c) base loads, deployment, resident worker: 0.33 per round  (1 load vs 3 rounds", None),
        ("(c) base loads, deployment, no worker: 1.00 per round  (3 loads vs 3 rounds", None),
        ("(c) base loads, simulation, N=2 (2 sampled)", re.compile(rf"{number} per client-round  \(\d+ loads? vs 2 ")),
        ("(c) base loads, simulation, N=8 (2 sampled)", re.compile(rf"{number} per client-round  \(\d+ loads? vs 2 ")),
        ("(d) peak RSS of the process tree, N=2 (2 sampled)", re.compile(rf": {number} (MiB|GiB) over \d+ processes")),
        ("(d) peak RSS, 2 sampled: N=8 / N=2", ratio),
    ]
    assert len(figures) == len(expected), output[-3000:]
    for line, (start, pattern) in zip(figures, expected):
        assert line.startswith(start), (line, start)
        assert pattern is None or pattern.search(line), line
    for line in figures[13:15]:  # every Ray actor that trained loaded the base once, no more
        loads, actors = re.search(r"\((\d+) loads? vs .*?(\d+) actors seen", line).groups()
        assert 1 <= int(loads) <= int(actors), line
    results = json.loads(out.read_text())
    assert results["figures"] == figures
    assert results["deployment"]["no worker"]["clientapp_processes"] == 3
    print(output[-5000:])  # the figures, shown with pytest -rP
