"""The fedft command: clear one-line errors for bad input, exit code 2, nothing started."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


def _fedft(*args):
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args],
                          capture_output=True, text=True)


def test_bad_config_value_is_one_clear_line(tiny_config_path, tmp_path):
    result = _fedft("simulate", "--config", str(tiny_config_path), "--out", str(tmp_path / "run"),
                    "--set", "train.batch_size=0")
    assert result.returncode == 2
    assert "fedft: error: " in result.stderr and "train.batch_size = 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_data_row_names_file_and_line(tiny_config_path, tmp_path):
    train = tiny_config_path.parent / "train.jsonl"
    lines = train.read_text().splitlines()
    lines[4] = '{"instruction": "x", "output": 5}'
    train.write_text("\n".join(lines) + "\n")
    result = _fedft("simulate", "--config", str(tiny_config_path), "--out", str(tmp_path / "run"),
                    "--set", "strategy.name=centralized")
    assert result.returncode == 2
    assert f"{train}:5: 'output' must be a string" in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path):
    result = _fedft("simulate", "--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_empty_partition_fails_before_anything_runs(tiny_config_path, tmp_path):
    result = _fedft("simulate", "--config", str(tiny_config_path), "--out", str(tmp_path / "run"),
                    "--set", "data.partition=iid", "--set", "simulation.num_supernodes=100",
                    "--set", "strategy.min_train_nodes=2")
    assert result.returncode == 2 and "cannot fill 100 client partitions" in result.stderr
    assert not (tmp_path / "run").exists()


def test_demo_data_per_institution_and_node_keys(tmp_path, capsys):
    from fedft.data.rows import read_rows
    from simulations.commands import main

    assert main(["demo", "data", "--out", str(tmp_path / "d"), "--institutions", "2", "--rows", "5",
                 "--eval-rows", "1", "--per-institution"]) == 0
    pooled = read_rows(tmp_path / "d" / "train.jsonl")
    own = [read_rows(tmp_path / "d" / f"inst{i}.jsonl") for i in range(2)]
    def content(rows):
        return [row["messages"] for row in rows]

    assert [len(rows) for rows in own] == [5, 5] and content(own[0] + own[1]) == content(pooled)
    assert {row["institution"] for row in own[1]} == {"inst1"}
    assert main(["node-key", "hospital-a", "--out", str(tmp_path / "k")]) == 0
    assert "flwr supernode register hospital-a.pub" in capsys.readouterr().out
    assert main(["node-key", "hospital-a", "--out", str(tmp_path / "k")]) == 2  # never overwrites a key


def test_long_prompts_and_empty_answers_are_named_before_anything_runs(tiny_config_path, tmp_path):
    train = tiny_config_path.parent / "train.jsonl"
    lines = train.read_text().splitlines()
    lines[2] = lines[2].replace('"instruction": "', '"instruction": "' + "x" * 300, 1)
    lines[6] = re.sub(r'"output": "[^"]*"', '"output": ""', lines[6])
    train.write_text("\n".join(lines) + "\n")
    result = _fedft("simulate", "--config", str(tiny_config_path), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"1 prompts are not shorter than data.max_length = 96 tokens: {train}:3: the prompt is" in result.stderr
    assert not (tmp_path / "run").exists()
    result = _fedft("simulate", "--config", str(tiny_config_path), "--out", str(tmp_path / "run"),
                    "--set", "data.long_prompts=truncate")
    assert result.returncode == 2 and f"1 rows have an empty answer: {train}:7: the answer is empty" in result.stderr
    assert not (tmp_path / "run").exists()


def test_seeds_run_the_config_once_per_seed_and_report_mean_and_std(tiny_config_path, tmp_path, capsys):
    import json

    import pytest

    from fedft.config import ConfigError
    from simulations.cli import main
    from simulations.sweeps import parse_seeds

    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("3-5,9") == [3, 4, 5, 9]
    for bad in ("a", "1,1", ""):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    out = tmp_path / "sweep"
    assert main(["simulate", "--config", str(tiny_config_path), "--out", str(out), "--seeds", "0,1",
                 "--set", "strategy.name=centralized", "--set", "strategy.num_rounds=1",
                 "--set", "train.local_steps=2"]) == 0
    stats = json.loads((out / "seeds.json").read_text())
    assert stats["seeds"] == [0, 1] and len(stats["exact_match"]["per_seed"]) == 2
    assert [json.loads((out / f"seed-{s}" / "summary.json").read_text())["config"]["seed"] for s in (0, 1)] == [0, 1]
    finals = [json.loads((out / f"seed-{s}" / "summary.json").read_text())["final"]["eval_loss"] for s in (0, 1)]
    assert stats["eval_loss"]["per_seed"] == finals and finals[0] != finals[1]  # the seed changed the run
    assert "| mean ± std |" in capsys.readouterr().out


@pytest.mark.slow
def test_epsilons_run_the_config_with_dp_sgd_calibrated_to_the_target_and_draw_the_curve(
        tiny_config_path, tmp_path, capsys):
    import json

    from simulations.cli import main

    out = tmp_path / "curve"
    assert main(["simulate", "--config", str(tiny_config_path), "--out", str(out), "--epsilons", "8",
                 "--set", "strategy.num_rounds=1", "--set", "train.local_steps=2"]) == 0
    curve = json.loads((out / "privacy_utility.json").read_text())
    (private,) = curve["points"]  # one run (the run without DP is the same code with record_level off)
    assert private["target_epsilon"] == 8 and private["epsilon"] == pytest.approx(8, rel=1e-3)  # calibrated
    assert private["sigma"] > 0 and (out / "epsilon-8" / "privacy_ledger.jsonl").is_file()
    assert (out / "privacy_utility.png").is_file()
    assert "| 8 / 8.00 |" in capsys.readouterr().out


LEAVE = """
import atexit, sys, tempfile, threading, time
from pathlib import Path
from simulations import cli

scratch = tempfile.TemporaryDirectory()  # removed by an exit handler, as the interpreter's exit would
Path(sys.argv[1]).write_text(scratch.name)
atexit.register(lambda: print("exit handler ran", flush=True))
if sys.argv[2] == "thread":
    threading.Thread(target=lambda: (time.sleep(1), print("thread finished", flush=True))).start()
cli.main = lambda: 3
cli.console_main()
"""


@pytest.mark.parametrize("other_thread", [False, True])
def test_the_command_leaves_with_its_code_after_its_exit_handlers_and_threads(tmp_path, other_thread):
    from pathlib import Path

    from simulations.bench_runs import REPO_ROOT

    named = tmp_path / "scratch-name"
    done = subprocess.run([sys.executable, "-c", LEAVE, str(named), "thread" if other_thread else "alone"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "exit handler ran" in done.stdout
    assert ("thread finished" in done.stdout) == other_thread  # a running thread: the usual exit, which waits
    assert not Path(named.read_text()).exists()  # temporary directories removed as at a usual exit
