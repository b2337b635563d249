"""Disks that refuse writes, for real: ``fedft simulate --out`` on a 160 KiB tmpfs, and on a read-only one.

The tiny 3-round DP run needs more than that (one checkpoint of the tiny run is about 52 KiB:
53,416 bytes measured without DP), so one of its writes fails with ENOSPC. The command must exit
non-zero with one line naming the file it was writing, every checkpoint left must be complete (no
temporary file, no half directory), and once
the file system is grown (``mount -o remount``) ``--resume`` finishes the run with each round in
metrics.jsonl and the privacy ledger exactly once. On a read-only file system (where even root
cannot write) the run is refused in one line before any model is loaded. Mounting needs root (or
CAP_SYS_ADMIN); without it the tests are skipped and say so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

SETTINGS = ["--set", "strategy.num_rounds=3", "--set", "strategy.eval_every=0", "--set", "privacy.record_level=true",
            "--set", "privacy.dp_sgd_noise_multiplier=1.0"]


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs mounted with those options; unmounted after the test."""
    mounted_points = []

    def mount(options: str) -> Path:
        mount_point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
        mount_point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted_points.append(mount_point)
        return mount_point

    yield mount
    for mount_point in mounted_points:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.fixture
def small_disk(tmpfs):
    return tmpfs("size=160k")


def simulate(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", "--config", str(config), "--out",
                           str(out), *SETTINGS, *extra], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def rounds(path: Path) -> list[int]:
    return [json.loads(line)["round"] for line in path.read_text().splitlines() if line.strip()]


def test_a_full_disk_fails_in_one_line_keeps_whole_checkpoints_and_the_run_resumes(tiny_config_path, small_disk):
    out = small_disk / "run"
    full = simulate(tiny_config_path, out)
    assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-2000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("fedft: run failed: DiskFull: no space left on the device holding ") and str(out) in last
    assert "Traceback" not in full.stderr
    assert not [p for p in out.rglob(".*") if p.name != ".fedft.lock"], "a temporary file was left behind"
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert checkpoints, "the first round's checkpoint fits: the disk filled later"
    for checkpoint in checkpoints:  # each one whole: its marker, and weights that load
        assert (checkpoint / "round.json").is_file()
        assert load_file(checkpoint / "adapter_model.safetensors")
    status = subprocess.run([sys.executable, "-m", "simulations.cli", "status", str(out)], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert status.returncode == 1 and f"last complete round {len(checkpoints)}" in status.stdout, status.stdout

    grown = subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], capture_output=True, text=True)
    assert grown.returncode == 0, grown.stderr
    resumed = simulate(tiny_config_path, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert rounds(out / "metrics.jsonl") == [0, 1, 2, 3]
    assert rounds(out / "privacy_ledger.jsonl") == [1, 2, 3]
    assert (out / "summary.json").is_file() and not (out / "failed.json").exists()


def test_a_read_only_out_is_refused_in_one_line_before_any_work(tiny_config_path, tmpfs):
    read_only = tmpfs("ro,size=1m")
    done = simulate(tiny_config_path, read_only / "run")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].endswith(f"{read_only} is not writable"), done.stderr
    assert not any(read_only.iterdir())
