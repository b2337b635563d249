"""`flwr run .` builds a Flower app bundle and runs the same ServerApp/ClientApp on a local SuperLink."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

ROOT = REPO_ROOT


def test_flwr_run_on_a_local_simulation_connection(tmp_path):
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or shutil.which("flwr")
    assert flwr, "the flwr command is installed with fedft"
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        "options.num-supernodes = 2\noptions.backend.client-resources.num-cpus = 1\n"
    )
    out = tmp_path / "run"
    overrides = ("simulation.num_supernodes=2 strategy.min_train_nodes=2 strategy.num_rounds=1 train.local_steps=1 "
                 "data.eval_max_examples=4 data.partition=iid dpo.enabled=false report.evaluate_stages=false")
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    try:
        proc = subprocess.run(
            [flwr, "run", ".", "local", "--stream",
             "--run-config", f"overrides='{overrides}' out-dir='{out}'"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
    finally:  # flwr leaves its local SuperLink running in the background; stop ours
        subprocess.run(["pkill", "-f", str(home)], check=False)
    assert (out / "adapter" / "adapter_model.safetensors").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients"] == 2
