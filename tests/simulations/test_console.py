"""The quiet console of `fedft simulate`: third-party noise hidden, fedft's lines and errors kept."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from simulations import console

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_env(monkeypatch):
    for name in [*console.QUIET_ENV, "PYTHONWARNINGS", console.LOGGERS_ENV]:
        monkeypatch.delenv(name, raising=False)


def test_quiet_sets_the_environment_and_loggers_and_restores_them(clean_env):
    flwr = logging.getLogger("flwr")
    level = flwr.level
    with console.quiet_third_party(verbose=False) as env:
        assert os.environ["TQDM_DISABLE"] == "1" and os.environ["TRANSFORMERS_VERBOSITY"] == "error"
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        entries = os.environ["PYTHONWARNINGS"].split(",")
        assert {"ignore::FutureWarning", "ignore::DeprecationWarning"} <= set(entries)
        assert "flwr" in os.environ[console.LOGGERS_ENV].split(",")
        assert env["PYTHONWARNINGS"] == os.environ["PYTHONWARNINGS"]
        assert flwr.level == logging.ERROR and logging.getLogger("bitsandbytes").level == logging.ERROR
    assert not any(name in os.environ for name in env)
    assert flwr.level == level


def test_values_the_user_set_are_kept(clean_env, monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    monkeypatch.setenv("PYTHONWARNINGS", "error::RuntimeWarning")
    with console.quiet_third_party(verbose=False):
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"
        assert os.environ["PYTHONWARNINGS"] == "error::RuntimeWarning," + console.pythonwarnings()
    assert os.environ["PYTHONWARNINGS"] == "error::RuntimeWarning"


def test_verbose_changes_nothing(clean_env):
    env, filters, shown = dict(os.environ), list(warnings.filters), warnings.showwarning
    levels = [logging.getLogger(name).level for name in console.QUIET_LOGGERS]
    with console.quiet_third_party(verbose=True) as set_env:
        assert set_env == {}
        assert dict(os.environ) == env and warnings.filters == filters and warnings.showwarning is shown
        assert [logging.getLogger(name).level for name in console.QUIET_LOGGERS] == levels
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.warn("`old` is deprecated", FutureWarning)
        assert len(caught) == 1


def test_hidden_warnings_go_fedft_warnings_and_errors_stay(clean_env):
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    flwr = logging.getLogger("flwr")
    flwr.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            with console.quiet_third_party(verbose=False):
                warnings.simplefilter("always")  # a library's own filter ahead of quiet mode's
                warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
                warnings.warn("`torch.jit.script_method` is deprecated", DeprecationWarning)
                warnings.warn("DP noise uses a FIXED seed: the noise is predictable", UserWarning)
                flwr.warning("DEPRECATED FEATURE: The `run_simulation` function is deprecated")
                flwr.error("ClientAppException: a client crashed")
    finally:
        flwr.removeHandler(handler)
    assert [str(w.message) for w in caught] == ["DP noise uses a FIXED seed: the noise is predictable"]
    assert log.getvalue() == "ClientAppException: a client crashed\n"


def test_hidden_messages_are_matched_by_category_and_prefix(monkeypatch):
    monkeypatch.setattr(console, "HIDDEN_MESSAGES", ((UserWarning, "Using a non-full backward hook"),))
    assert console.is_hidden(UserWarning, UserWarning("using a non-full backward hook when ..."))
    assert not console.is_hidden(RuntimeWarning, "Using a non-full backward hook")
    assert not console.is_hidden(UserWarning, "DP noise uses a FIXED seed")
    assert console.is_hidden(FutureWarning, "anything")
    assert "ignore:Using a non-full backward hook:UserWarning" in console.pythonwarnings().split(",")
    monkeypatch.setattr(console, "HIDDEN_MESSAGES", ((UserWarning, "a: b"),))
    with pytest.raises(ValueError, match="cannot hold"):
        console.pythonwarnings()


def _child(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)


def test_a_child_process_such_as_a_ray_actor_inherits_the_filters(clean_env):
    code = ("import warnings\n"
            "warnings.warn('SortOptions null_placement is deprecated', FutureWarning)\n"
            "warnings.warn('DP noise uses a FIXED seed', UserWarning)\n")
    with console.quiet_third_party(verbose=False) as env:
        quiet = _child(code, env)
    loud = _child(code, {})
    assert "FIXED seed" in quiet.stderr and "null_placement" not in quiet.stderr
    assert "FIXED seed" in loud.stderr and "null_placement" in loud.stderr


def test_the_client_app_quiets_its_actor_after_flwr_is_imported(clean_env):
    # flwr's simulation transport shows each DeprecationWarning once, ahead of PYTHONWARNINGS
    code = ("import logging, warnings\n"
            "import flwr.simulation.ray_transport.utils\n"
            "import clients.app\n"
            "warnings.warn('old api', DeprecationWarning)\n"
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('Failed to load CPU gemm_4bit_forward')\n"
            "print(logging.getLogger('flwr').level, logging.getLogger('bitsandbytes').level)\n")
    with console.quiet_third_party(verbose=False) as env:
        quiet = _child(code, env)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.split() == [str(logging.ERROR)] * 2 and "old api" not in quiet.stderr
    loud = _child(code, {"PYTHONWARNINGS": console.pythonwarnings()})  # without FEDFT_QUIET_LOGGERS
    assert "old api" in loud.stderr and "gemm_4bit_forward" in loud.stderr and quiet.stderr == ""


@pytest.mark.slow
def test_a_baseline_run_prints_only_fedft_lines(tiny_config_path, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--config", str(tiny_config_path),
         "--out", str(tmp_path / "run"), "--set", "strategy.name=centralized", "--set", "strategy.num_rounds=1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines()[-1] == console.DIGEST
    for marker in ("Warning", "WARNING", "it/s", "site-packages"):
        assert marker not in result.stdout
