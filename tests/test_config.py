"""Config loading: types, ranges, unknown keys, --set overrides, path resolution."""

from __future__ import annotations

import pytest

from fedft.config import ConfigError, config_from_dict, config_to_dict, load_config, parse_override


def test_loads_and_resolves_paths_relative_to_the_file(tiny_config_path):
    cfg = load_config(tiny_config_path)
    assert cfg.lora.r == 4 and cfg.train.learning_rate == 0.01
    assert cfg.data.train_files == (str(tiny_config_path.parent / "train.jsonl"),)
    assert cfg.lora.target_modules == ("all-linear",)


def test_overrides_are_typed_and_applied(tiny_config_path):
    cfg = load_config(tiny_config_path, ["train.local_steps=7", "strategy.name=fedprox",
                                         "strategy.proximal_mu=0.1", "lora.target_modules=['q_proj']"])
    assert cfg.train.local_steps == 7
    assert cfg.strategy.name == "fedprox" and cfg.strategy.proximal_mu == 0.1
    assert cfg.lora.target_modules == ("q_proj",)


def test_bad_choice_names_file_line_field_and_allowed(tiny_config_path):
    text = tiny_config_path.read_text().replace('quantization = "nf4"', 'quantization = "nf5"')
    tiny_config_path.write_text(text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l.startswith("quantization"))
    with pytest.raises(ConfigError) as err:
        load_config(tiny_config_path)
    message = str(err.value)
    assert f"{tiny_config_path}:{line}" in message
    assert "model.quantization = 'nf5'" in message and "'nf4', 'int8', 'none'" in message


def test_unknown_field_is_refused_with_the_allowed_names(tiny_config_path):
    tiny_config_path.write_text(tiny_config_path.read_text().replace("r = 4", "rank = 4"))
    with pytest.raises(ConfigError, match=r"unknown field lora.rank; allowed: alpha, client_ranks, dropout, r"):
        load_config(tiny_config_path)


@pytest.mark.parametrize("override, fragment", [
    ("train.learning_rate=-1", "train.learning_rate = -1.0 is not allowed; expected a number > 0"),
    ("train.local_steps=1.5", "train.local_steps = 1.5 has the wrong type: expected int"),
    ("lora.dropout=1.0", "lora.dropout = 1.0 is not allowed"),
    ("strategy.fraction_train=0", "strategy.fraction_train = 0.0 is not allowed"),
    ("model.device=gpu", "model.device = 'gpu' is not allowed"),
    ("nosuch.key=1", "unknown section 'nosuch'"),
    ("strategy.min_train_nodes=3", "at most simulation.num_supernodes = 2"),
    ("strategy.aggregation=mean", "strategy.aggregation = 'mean' is not allowed; expected one of 'fedavg', 'ffa', 'svd'"),
    ("lora.client_ranks=[2]", "one rank per simulated client (2)"),
    ("lora.client_ranks=[2, 8]", "ranks at most lora.r = 4"),
    ("lora.client_ranks=[2, 2.5]", "lora.client_ranks = [2, 2.5] has the wrong type"),
])
def test_invalid_overrides_fail_at_load_time(tiny_config_path, override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(tiny_config_path, [override])
    assert fragment in str(err.value)


def test_override_values_parse_as_toml_else_string():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("model.path=some/dir") == (["model", "path"], "some/dir")
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_wire_form_round_trips(tiny_config_path):
    cfg = load_config(tiny_config_path)
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("overrides, fragment", [
    (["strategy.aggregation=ffa", "lora.client_ranks=[2, 4]"], "equal ranks with strategy.aggregation = 'ffa'"),
    (["strategy.aggregation=svd", "strategy.server_optimizer=fedadam"], "no pseudo-gradient"),
    (["strategy.name=fedprox", "strategy.server_optimizer=fedavgm"], "use fedavg with a server optimizer"),
])
def test_incompatible_aggregation_settings_are_refused(tiny_config_path, overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(tiny_config_path, overrides)


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parent.parent / "simulations").glob("*.toml"))
    assert len(configs) >= 2
    for path in configs:
        cfg = load_config(path)
        assert cfg.data.train_files, path


def test_a_coordinator_config_needs_no_training_files_but_a_simulation_does(tiny_config_path):
    from fedft.data.partition import check_simulation_data

    text = tiny_config_path.read_text().replace('train_files = ["train.jsonl"]\n', "")
    path = tiny_config_path.with_name("coordinator.toml")
    path.write_text(text)
    cfg = load_config(path)  # a deployment's server names no institution's data
    assert cfg.data.train_files == ()
    with pytest.raises(ConfigError, match="data.train_files"):
        check_simulation_data(cfg)
