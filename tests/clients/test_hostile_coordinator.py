"""A hostile coordinator against the real ClientApp: each thing it used to impose is now refused or overridden.

Every test sends the institution a train message whose config the coordinator chose and
calls ``clients.app.train`` in this process with the institution's own ``--node-config``
(and policy file). Declines must reach the server's records (``collect_replies``) with the
policy key; the institution's audit trail records what it did.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from fedft.config import load_config
from fedft.demo.tasks import make_demo_rows, write_jsonl
from fedft.federated import wire
from fedft.federated.audit_trail import read_trail
from fedft.federated.policy import weights_sha256
from fedft.model.load import initial_adapter_state, model_spec
from server.strategy import make_strategy
from tests.clients.inprocess import deliver, institution, train_message
from tests.conftest import TINY_TOML


@pytest.fixture
def setup(tiny_model_dir, tmp_path):
    """The coordinator's config (no training files) and one institution's data and state dir."""
    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()
    write_jsonl(make_demo_rows(2, 4, 0.5, seed=1), coordinator / "eval.jsonl")
    toml = TINY_TOML.format(model=tiny_model_dir).replace('train_files = ["train.jsonl"]\n', "")
    (coordinator / "deploy.toml").write_text(toml)
    cfg = load_config(coordinator / "deploy.toml", ["train.local_steps=2"])
    site = tmp_path / "hospital"
    write_jsonl([r for r in make_demo_rows(2, 24, 0.9, seed=0) if r["institution"] == "inst0"][:16],
                site / "train.jsonl")
    return cfg, site


def with_(cfg, **sections):
    """``cfg`` with fields replaced: with_(cfg, privacy={"record_level": True})."""
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)
                                       for name, values in sections.items()})


_STATES: dict = {}


def global_adapter(cfg) -> dict:
    """The round's global adapter, built here (as the coordinator would) from the tiny model's shapes."""
    key = (cfg.lora.r, cfg.model.path)
    if key not in _STATES:
        safe = with_(cfg, model={"trust_remote_code": False})
        _STATES[key] = initial_adapter_state(model_spec(safe))
    return _STATES[key]


def ask(cfg, node_config: dict, round_index: int = 1, context=None, state=None):
    context = context or institution(node_config)
    state = state if state is not None else global_adapter(cfg)
    return deliver(train_message(cfg, state, round_index), context), context


def declined_key(reply) -> str:
    assert reply.has_error(), "the round was not declined"
    reason = reply.error.reason
    assert reason.startswith(wire.DECLINED + ": "), reason
    return reason[len(wire.DECLINED) + 2:].split(":", 1)[0]


def write_policy(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def remote_code_model(tiny_model_dir: Path, out: Path) -> tuple[Path, Path]:
    """A copy of the tiny model whose config asks to run its own Python, which writes a marker file."""
    shutil.copytree(tiny_model_dir, out)
    marker = out.parent / "remote-code-ran"
    (out / "hostile.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class HostileConfig(LlamaConfig):\n    model_type = 'llama'\n"
        "class HostileModel(LlamaForCausalLM):\n    config_class = HostileConfig\n")
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "hostile.HostileConfig", "AutoModelForCausalLM": "hostile.HostileModel"}
    (out / "config.json").write_text(json.dumps(config))
    return out, marker


def test_remote_code_is_never_the_coordinators_to_turn_on(setup, tiny_model_dir, tmp_path):
    cfg, site = setup
    hostile_dir, marker = remote_code_model(tiny_model_dir, tmp_path / "coordinator-model")
    hostile = with_(cfg, model={"path": str(hostile_dir), "trust_remote_code": True})
    state = global_adapter(cfg)  # the coordinator's own model is its business; the institution's is tested
    reply, _ = ask(hostile, {"data-path": str(site / "train.jsonl"), "state-dir": str(site / "state")}, state=state)
    assert declined_key(reply) == "model.trust_remote_code"
    assert not marker.exists()
    # A policy that allows remote code pins its own model: the coordinator's path is not loaded.
    own = tmp_path / "own-model"
    shutil.copytree(tiny_model_dir, own)
    policy = write_policy(site / "policy.toml",
                          f'[model]\npath = "{own}"\nsha256 = "{weights_sha256(own)}"\ntrust_remote_code = true\n')
    reply, _ = ask(hostile, {"data-path": str(site / "train.jsonl"), "policy": str(policy)}, state=state)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert not marker.exists()


def test_a_changed_base_model_is_refused_by_its_checksum(setup, tiny_model_dir, tmp_path):
    cfg, site = setup
    own = tmp_path / "own-model"
    shutil.copytree(tiny_model_dir, own)
    checksum = weights_sha256(own)
    policy = write_policy(site / "policy.toml", f'[model]\npath = "{own}"\nsha256 = "{checksum}"\n')
    weights = own / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")  # one byte changed
    reply, _ = ask(cfg, {"data-path": str(site / "train.jsonl"), "policy": str(policy)})
    assert declined_key(reply) == "model.sha256"
    assert str(own) not in reply.error.reason


def test_an_institution_with_a_limit_never_trains_without_dp_sgd(setup):
    cfg, site = setup
    assert not cfg.privacy.record_level
    reply, _ = ask(cfg, {"data-path": str(site / "train.jsonl"), "max-epsilon": 1.0})
    assert declined_key(reply) == "max-epsilon"
    policy = write_policy(site / "policy.toml", "[privacy]\nrequire_record_level = true\n")
    reply, _ = ask(cfg, {"data-path": str(site / "train.jsonl"), "policy": str(policy)})
    assert declined_key(reply) == "privacy.require_record_level"


def _dp(cfg, **privacy):
    return with_(cfg, privacy={"record_level": True, "dp_sgd_noise_multiplier": 1.0, **privacy})


def test_a_fixed_noise_seed_from_the_coordinator_is_ignored(setup):
    cfg, site = setup
    seeded = _dp(cfg, noise_seed=7)
    node = {"data-path": str(site / "train.jsonl")}
    first, _ = ask(seeded, node)
    second, _ = ask(seeded, node)
    a, b = (r.content[wire.ARRAYS].to_torch_state_dict() for r in (first, second))
    assert any(not torch.equal(a[k], b[k]) for k in a), "two replies with the coordinator's seed are identical"
    # Only the institution's policy can allow a fixed seed (reproducible experiments on its own data).
    policy = write_policy(site / "policy.toml", "[privacy]\nallow_fixed_noise_seed = true\n")
    node = {**node, "policy": str(policy)}
    a, b = (ask(seeded, node)[0].content[wire.ARRAYS].to_torch_state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_limit_is_checked_at_the_institutions_delta(setup):
    cfg, site = setup
    # 17.9 at delta 1e-5 became 3.56 at delta 0.9: a limit of 5 must decline at the institution's delta.
    node = {"data-path": str(site / "train.jsonl"), "max-epsilon": 5.0, "state-dir": str(site / "state")}
    reply, _ = ask(_dp(cfg, delta=0.9, dp_sgd_noise_multiplier=0.6), node)
    assert declined_key(reply) == "max-epsilon"
    assert "limit 5" in reply.error.reason
    row, = read_trail(site / "state")
    assert row.decision == "declined" and row.delta == 1e-5 and row.policy_key == "max-epsilon"


def test_compute_bounds_decline_and_fixed_settings_replace_the_coordinators(setup):
    cfg, site = setup
    policy = write_policy(site / "policy.toml", (
        "[compute]\nmax_local_steps = 2\nmax_lora_rank = 2\n"
        "[privacy]\nmin_noise_multiplier = 0.8\n"
        "[fixed]\ntrain = { learning_rate = 0.005 }\nprivacy = { dp_sgd_clip_norm = 0.5 }\n"))
    node = {"data-path": str(site / "train.jsonl"), "policy": str(policy), "state-dir": str(site / "state")}
    reply, _ = ask(with_(cfg, train={"local_steps": 3}), node)
    assert declined_key(reply) == "compute.max_local_steps"
    reply, _ = ask(with_(cfg, data={"max_length": 97}, model={"device": "cuda:3"}),
                   {**node, "policy": str(write_policy(site / "p2.toml", "[compute]\nmax_length = 96\n"))})
    assert declined_key(reply) == "compute.max_length"
    reply, _ = ask(_dp(cfg, dp_sgd_noise_multiplier=0.5), node)
    assert declined_key(reply) == "privacy.min_noise_multiplier"
    reply, _ = ask(_dp(with_(cfg, model={"device": "cuda:3"}), dp_sgd_noise_multiplier=1.0), node)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert int(reply.content[wire.METRICS][wire.LORA_RANK]) == 2  # lora.r = 4 trained at the policy's cap
    accepted = [r for r in read_trail(site / "state") if r.decision == "accepted"]
    assert len(accepted) == 1
    replaced = accepted[0].overridden
    assert replaced["train.learning_rate"] == {"asked": cfg.train.learning_rate, "applied": 0.005}
    assert replaced["privacy.dp_sgd_clip_norm"] == {"asked": 1.0, "applied": 0.5}
    assert replaced["model.device"] == {"asked": "cuda:3", "applied": "auto"}  # never the coordinator's device
    assert accepted[0].dp_sgd["noise_multiplier"] == 1.0 and accepted[0].steps == 2


def test_withheld_metrics_do_not_leave(setup):
    cfg, site = setup
    policy = write_policy(site / "policy.toml", "[reply]\nmetrics = []\n")
    reply, _ = ask(cfg, {"data-path": str(site / "train.jsonl"), "policy": str(policy)})
    sent = set(reply.content[wire.METRICS])
    assert wire.TRAIN_LOSS not in sent and wire.TRAIN_STEPS not in sent and wire.NUM_EXAMPLES in sent


def test_declines_are_recorded_by_the_server_with_the_policy_key(setup):
    cfg, site = setup
    policy = write_policy(site / "policy.toml", "[compute]\nmax_batch_size = 4\n")
    node = {"data-path": str(site / "train.jsonl"), "policy": str(policy)}
    strategy = make_strategy(cfg)
    strategy.global_state = global_adapter(cfg)
    reply, _ = ask(cfg, node)
    collected = strategy.collect_replies(1, [reply])
    assert collected.refusals == [7]
    assert collected.failures == [f"node 7: {wire.DECLINED}: compute.max_batch_size: the round asks "
                                  f"train.batch_size = {cfg.train.batch_size} > 4"]


def test_a_broken_policy_fails_safely(setup):
    cfg, site = setup
    secret_dir = site / "SECRET-dir"
    secret_dir.mkdir()
    policy = write_policy(secret_dir / "policy.toml", "[compute]\nmax_local_steps = -1\n")
    reply, _ = ask(cfg, {"data-path": str(site / "train.jsonl"), "policy": str(policy)})
    assert reply.has_error()
    assert reply.error.reason.startswith(f"{wire.FAILED}: PolicyError: ")
    assert "SECRET" not in reply.error.reason and "max_local_steps" not in reply.error.reason
