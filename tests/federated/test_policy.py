"""The institution policy file and the admission of a coordinator's round against it."""

from __future__ import annotations

import pytest

from fedft.config import load_config
from fedft.federated.admission import (
    NodeSettings,
    PolicyViolation,
    admit,
    node_policy,
    rounds_in_last_day,
)
from fedft.federated.policy import (
    InstitutionPolicy,
    PolicyError,
    load_policy,
    policy_template,
    weights_sha256,
)


def test_the_template_is_the_safe_default(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(policy_template())
    policy = load_policy(path)
    assert policy == InstitutionPolicy(source=str(path))
    assert not policy.model.trust_remote_code and not policy.privacy.allow_fixed_noise_seed


@pytest.mark.parametrize("text, match", [
    ("[compute]\nmax_local_steps = -1\n", r"policy.toml:2: compute.max_local_steps = -1 is not allowed; expected an "
                                          r"integer >= 0"),
    ("[privacy]\nmax_epsilon = 'eight'\n", r"policy.toml:2: privacy.max_epsilon = 'eight' has the wrong type"),
    ("[compute]\nmax_rounds = 3\n", r"policy.toml:2: unknown field compute.max_rounds; allowed: .*max_rounds_per_day"),
    ("[fixed.lora]\nr = 2\n", r"policy.toml:2: \[fixed\] lora.r cannot be fixed by an institution"),
    ("[model]\ntrust_remote_code = true\n", r"trust_remote_code = true needs model.path and model.sha256"),
    ("[model]\nsha256 = 'abc'\n", r"model.sha256 = 'abc' is not allowed; expected 64 hex digits"),
    ("[reply]\nmetrics = ['num-examples']\n", r"reply.metrics = .* expected a list of train-loss, train-steps"),
    ("[secrets]\nx = 1\n", r"unknown table\(s\) secrets"),
])
def test_a_bad_policy_names_file_line_and_key(tmp_path, text, match):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=match):
        load_policy(path)


def test_the_checksum_covers_the_weights_only(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    before = weights_sha256(copy)
    assert before == weights_sha256(tiny_model_dir)
    (copy / "README.md").write_text("notes")
    assert weights_sha256(copy) == before
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert weights_sha256(copy) != before


@pytest.fixture
def cfg(tiny_config_path):
    return load_config(tiny_config_path, ["privacy.record_level=true", "privacy.noise_seed=3", "privacy.delta=0.5"])


def test_a_deployed_node_applies_the_safe_defaults(cfg):
    admitted = admit(cfg, InstitutionPolicy(), NodeSettings(data_path="x.jsonl"))
    assert admitted.cfg.privacy.noise_seed == -1 and admitted.cfg.privacy.delta == 1e-5
    assert admitted.overridden["privacy.noise_seed"] == (3, -1)
    assert "train.local_steps" in admitted.coordinator_chose and "privacy.delta" not in admitted.coordinator_chose
    simulated = admit(cfg, InstitutionPolicy(), NodeSettings(partition_id=0))
    assert simulated.cfg is cfg  # the operator's own simulation keeps its config


def test_only_the_institution_lets_its_base_train_unquantized(cfg, tmp_path):
    import dataclasses

    asking = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, allow_unquantized=True))
    admitted = admit(asking, InstitutionPolicy(), NodeSettings(data_path="x.jsonl"))
    assert admitted.cfg.model.allow_unquantized is False
    assert admitted.overridden["model.allow_unquantized"] == (True, False)
    path = tmp_path / "policy.toml"
    path.write_text("[model]\nallow_unquantized = true\n")
    node = NodeSettings(data_path="x.jsonl", policy_path=str(path))
    assert admit(cfg, node_policy(node), node).cfg.model.allow_unquantized is True


def test_an_institution_names_its_own_columns(cfg, tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('[fixed]\ndata = { columns = { instruction = "question", output = "answer" } }\n')
    node = NodeSettings(data_path="x.csv", policy_path=str(path))
    admitted = admit(cfg, node_policy(node), node)
    assert dict(admitted.cfg.data.columns) == {"instruction": "question", "output": "answer"}


def test_the_coordinator_never_names_a_deployed_institutions_columns(cfg):
    import dataclasses

    asking = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, columns={"instruction": "patient_id"}))
    admitted = admit(asking, InstitutionPolicy(), NodeSettings(data_path="x.csv"))
    assert dict(admitted.cfg.data.columns) == {}
    assert admitted.overridden["data.columns"][1] == {}


def test_scaffold_is_declined_by_a_node_below_the_global_rank(cfg, tmp_path):
    import dataclasses

    scaffold = dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, name="scaffold"),
                                   privacy=dataclasses.replace(cfg.privacy, record_level=False))
    with pytest.raises(PolicyViolation, match="lora-rank: lora.r = 4 > 2 and SCAFFOLD"):
        admit(scaffold, InstitutionPolicy(), NodeSettings(data_path="x.jsonl", lora_rank=2))
    admit(scaffold, InstitutionPolicy(), NodeSettings(data_path="x.jsonl", lora_rank=4))


def test_the_stricter_limit_of_node_and_policy_applies(cfg, tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text("[privacy]\nmax_epsilon = 4.0\n")
    with pytest.raises(PolicyError, match="need a state-dir"):
        node_policy(NodeSettings(policy_path=str(path)))
    node = NodeSettings(policy_path=str(path), state_dir=tmp_path, max_epsilon=2.0)
    admitted = admit(cfg, node_policy(node), node)
    assert admitted.max_epsilon == 2.0 and admitted.limit_key == "max-epsilon"
    node = NodeSettings(policy_path=str(path), state_dir=tmp_path, max_epsilon=9.0)
    assert admit(cfg, node_policy(node), node).limit_key == "privacy.max_epsilon"


def test_rounds_per_day_count_the_last_24_hours(cfg, tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text("[compute]\nmax_rounds_per_day = 2\n")
    node = NodeSettings(policy_path=str(path), state_dir=tmp_path)
    policy = node_policy(node)
    now = 1_000_000.0
    assert rounds_in_last_day([now - 90_000, now - 10, now - 5], now) == 2
    admit(cfg, policy, node, accepted_times=[now - 90_000, now - 10], now=now)
    with pytest.raises(PolicyViolation, match="compute.max_rounds_per_day: 2 rounds accepted"):
        admit(cfg, policy, node, accepted_times=[now - 90_000, now - 10, now - 5], now=now)
