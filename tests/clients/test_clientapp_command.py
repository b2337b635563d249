"""The lighter ``flwr-clientapp`` command ``fedft node supernode`` puts on its SuperExec's PATH
(clients/clientapp_command.py). A real deployment runs through it in tests/simulations/test_deployment.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clients import clientapp_command
from clients.clientapp_command import (
    COMMAND_NAME,
    CommandUnavailable,
    check_command,
    load_flower_clientapp,
    prepend_to_path,
    write_command,
)
from tests.simulations.deployment import ROOT


def test_the_command_is_flowers_own_function_loaded_without_the_supernode_cli():
    code = ("import sys, inspect\n"
            "from clients.clientapp_command import load_flower_clientapp\n"
            "function = load_flower_clientapp()\n"
            "print(inspect.getsourcefile(function))\n"
            "print('flwr.supernode.cli' in sys.modules, 'flwr.supernode.cli.flower_supernode' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    source, imported = done.stdout.splitlines()[-2:]
    assert source.endswith(os.path.join("flwr", "supernode", "cli", "flwr_clientapp.py"))
    assert imported == "False False"


def test_the_written_script_answers_as_flower_clientapp_does(tmp_path):
    script = write_command(tmp_path / "bin")
    assert script.name == COMMAND_NAME
    assert oct(script.stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / "bin").stat().st_mode & 0o777) == "0o700"
    check_command(script)  # raises unless `--help` prints Flower's flwr-clientapp options
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert "Run a Flower ClientApp" in done.stdout


def test_a_script_that_cannot_answer_is_refused(tmp_path):
    broken = tmp_path / COMMAND_NAME
    broken.write_text(f"#!{sys.executable}\nimport sys\nsys.exit(3)\n")
    broken.chmod(0o700)
    with pytest.raises(CommandUnavailable, match="--help exited 3"):
        check_command(broken)
    broken.chmod(0o600)  # as on a directory mounted noexec
    with pytest.raises(CommandUnavailable, match="cannot run: Permission denied"):
        check_command(broken)


def test_a_flower_without_the_function_leaves_path_alone(monkeypatch):
    from clients.supernode import install_lean_clientapp_command

    monkeypatch.setattr(clientapp_command, "FLOWER_SCRIPT", ("cli", "no_such_file.py"))
    monkeypatch.setenv("PATH", os.environ["PATH"])
    before = os.environ["PATH"]
    said = install_lean_clientapp_command()
    assert said.startswith("flwr-clientapp as Flower installs it (no ") and "no_such_file.py" in said
    assert os.environ["PATH"] == before


def test_the_directory_goes_first_on_path(tmp_path):
    environ = {"PATH": "/usr/bin:/bin"}
    prepend_to_path(tmp_path, environ)
    assert environ["PATH"] == f"{tmp_path}{os.pathsep}/usr/bin:/bin"
    empty: dict[str, str] = {}
    prepend_to_path(tmp_path, empty)
    assert empty["PATH"] == str(tmp_path)


def test_loading_flowers_function_fails_clearly_when_the_file_is_gone(monkeypatch):
    monkeypatch.setattr(clientapp_command, "FLOWER_SCRIPT", ("cli", "gone.py"))
    with pytest.raises(CommandUnavailable, match="gone.py"):
        load_flower_clientapp()
