"""The message contract: what travels, how many bytes, and that fedft stays flwr-free."""

from __future__ import annotations

import re
import subprocess
import sys

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedft.config import load_config
from fedft.federated import wire
from fedft.model.adapter import adapter_nbytes, get_adapter_state
from fedft.model.load import load_peft_model, model_spec
from server.strategy import payload_bytes
from tests.conftest import REPO_ROOT

ROOT = REPO_ROOT


def test_demo_adapter_bytes_on_the_wire_are_within_two_percent_of_tensor_bytes():
    cfg = load_config(ROOT / "simulations" / "demo.toml")
    state = get_adapter_state(load_peft_model(model_spec(cfg)))
    down = RecordDict({wire.ARRAYS: ArrayRecord(torch_state_dict=state),
                       wire.CONFIG: ConfigRecord({wire.CONFIG_JSON: wire.encode_config(cfg)})})
    up = RecordDict({wire.ARRAYS: ArrayRecord(torch_state_dict=state)})
    tensor_bytes = adapter_nbytes(state)
    assert tensor_bytes == sum(v.numel() * 4 for v in state.values())
    for content in (down, up):
        sent = payload_bytes(content)
        assert tensor_bytes <= sent <= 1.02 * tensor_bytes, (sent, tensor_bytes)


def test_config_survives_the_wire():
    cfg = load_config(ROOT / "simulations" / "demo.toml")
    assert wire.decode_config(wire.encode_config(cfg)) == cfg


def test_fedft_never_imports_flwr():
    offenders = [
        str(path.relative_to(ROOT)) for path in (ROOT / "fedft").rglob("*.py")
        if re.search(r"^\s*(import flwr\b|from flwr[ .])", path.read_text(), re.MULTILINE)
    ]
    assert offenders == []
    code = ("import importlib, pkgutil, sys, fedft;"
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(fedft.__path__, 'fedft.')];"
            "bad = [m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')];"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_institution_picks_its_own_device_and_base_model_location(tiny_config_path):
    import pytest

    from fedft.config import ConfigError, load_config
    from fedft.federated.admission import NodeSettings, admit
    from fedft.federated.policy import InstitutionPolicy

    cfg = load_config(tiny_config_path)
    policy = InstitutionPolicy()

    def placed(node: dict):
        return admit(cfg, policy, NodeSettings.from_node_config(node)).cfg

    assert placed({"data-path": "x.jsonl", "partition-id": 0}) is cfg  # a simulated client keeps its config
    moved = placed({"device": "cuda:1", "model-path": "/models/llama"})
    assert moved.model.device == "cuda:1" and moved.model.path == "/models/llama"
    assert moved.lora == cfg.lora and moved.train == cfg.train
    assert placed({"data-path": "x.jsonl"}).model.device == "auto"  # never the coordinator's device
    with pytest.raises(ConfigError, match="model.device"):
        placed({"device": "gpu0"})
