"""Config loading: types, each field's limits, the rules between fields, unknown keys, --set overrides, paths."""

from __future__ import annotations

import pytest

from fedft.config import ConfigError, config_from_dict, config_to_dict, load_config, parse_override
from tests.conftest import REPO_ROOT


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
    ("strategy.aggregation=mean",
     "strategy.aggregation = 'mean' is not allowed; expected one of 'fedavg', 'ffa', 'svd'"),
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

    configs = sorted((REPO_ROOT / "simulations").glob("*.toml"))
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


# Every field with declared limits: (a value outside them, a value just inside, what the error says is allowed).
FIELD_LIMITS = {
    "model.quantization": ("nf5", "int8", "one of 'nf4', 'int8', 'none'"),
    "model.compute_dtype": ("float64", "bfloat16", "one of 'float32', 'bfloat16', 'float16'"),
    "model.device": ("cuda:x", "cuda:12", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    "lora.r": (0, 1, "an integer >= 1"),
    "lora.alpha": (0.0, 1e-9, "a number > 0"),
    "lora.dropout": (1.0, 0.0, "a number in [0, 1)"),
    "lora.target_modules": ([], ["q_proj"], "a non-empty list of module names or 'all-linear'"),
    "lora.client_ranks": ([0, 1, 1, 1], [1, 1, 1, 1], "a list of integers >= 1"),
    "data.eval_file": ("", "held-out.jsonl", "a held-out data file"),
    "data.partition": ("random", "iid", "one of 'iid', 'dirichlet', 'natural'"),
    "data.dirichlet_alpha": (0.0, 1e-9, "a number > 0"),
    "data.max_length": (7, 8, "an integer >= 8"),
    "data.long_prompts": ("drop", "truncate", "one of 'refuse', 'truncate'"),
    "data.empty_answers": ("keep", "skip", "one of 'refuse', 'skip'"),
    "data.eval_max_examples": (0, 1, "an integer >= 1"),
    "train.local_steps": (0, 1, "an integer >= 1"),
    "train.batch_size": (0, 1, "an integer >= 1"),
    "train.grad_accum": (0, 1, "an integer >= 1"),
    "train.learning_rate": (0.0, 1e-9, "a number > 0"),
    "train.lr_schedule": ("step", "linear", "one of 'constant', 'linear', 'cosine'"),
    "train.warmup_steps": (-1, 0, "an integer >= 0"),
    "train.weight_decay": (-0.1, 0.0, "a number >= 0"),
    "train.max_grad_norm": (-0.1, 0.0, "a number >= 0 (0 disables clipping)"),
    "train.num_threads": (-1, 0, "an integer >= 0"),
    "strategy.name": ("fednova", "centralized", "one of 'fedavg', 'fedprox', 'scaffold', 'local', 'centralized'"),
    "strategy.proximal_mu": (-0.1, 0.0, "a number >= 0"),
    "strategy.num_rounds": (0, 1, "an integer >= 1"),
    "strategy.fraction_train": (1.5, 1.0, "a number in (0, 1]"),
    "strategy.min_train_nodes": (0, 1, "an integer >= 1"),
    "strategy.eval_every": (-1, 0, "an integer >= 0 (0 evaluates only the last round)"),
    "strategy.round_timeout_s": (0.0, 0.5, "a number > 0"),
    "strategy.aggregation": ("mean", "svd", "one of 'fedavg', 'ffa', 'svd'"),
    "strategy.server_optimizer": ("sgd", "fedyogi", "one of 'none', 'fedadam', 'fedyogi', 'fedavgm'"),
    "strategy.server_lr": (0.0, 1e-9, "a number > 0"),
    "strategy.server_momentum": (1.0, 0.0, "a number in [0, 1)"),
    "strategy.server_beta2": (-0.1, 0.999, "a number in [0, 1)"),
    "strategy.server_tau": (0.0, 1e-9, "a number > 0"),
    "strategy.wire_dtype": ("bfloat16", "float16", "one of 'float32', 'float16'"),
    "strategy.max_update_norm": (-1.0, 0.0, "a number >= 0 (0: no bound)"),
    "strategy.robust": ("mean", "median", "one of 'none', 'trimmed_mean', 'median'"),
    "strategy.trim_fraction": (0.5, 0.0, "a number in [0, 0.5)"),
    "simulation.num_supernodes": (0, 2, "an integer >= 1"),
    "simulation.num_cpus": (0.0, 0.5, "a number > 0"),
    "simulation.num_gpus": (-0.5, 0.0, "a number >= 0"),
    "privacy.clip_norm": (0.0, 1e-9, "a number > 0"),
    "privacy.noise_multiplier": (-0.1, 0.0, "a number >= 0"),
    "privacy.delta": (1.0, 0.999, "a number in (0, 1)"),
    "privacy.target_epsilon": (-1.0, 0.0, "a number >= 0 (0: no budget)"),
    "privacy.client_sampling": ("uniform", "fixed", "one of 'fixed', 'poisson'"),
    "privacy.client_sampling_rate": (0.0, 1.0, "a number in (0, 1]"),
    "privacy.dp_sgd_noise_multiplier": (0.0, 1e-9, "a number > 0"),
    "privacy.dp_sgd_clip_norm": (0.0, 1e-9, "a number > 0"),
    "privacy.dp_sgd_target_epsilon": (-1.0, 0.0, "a number >= 0 (0: use dp_sgd_noise_multiplier)"),
    "privacy.client_max_epsilon": (-1.0, 0.0, "a number >= 0 (0: no per-client limit)"),
    "privacy.canaries": (-1, 0, "an integer >= 0 (0: no canaries)"),
    "privacy.canary_repeats": (0, 1, "an integer >= 1"),
    "dpo.beta": (0.0, 1e-9, "a number > 0"),
    "dpo.steps": (0, 1, "an integer >= 1"),
    "dpo.batch_size": (0, 1, "an integer >= 1"),
    "dpo.learning_rate": (-1.0, 1e-9, "a number > 0"),
    "dpo.lr_schedule": ("exponential", "constant", "one of 'constant', 'linear', 'cosine'"),
    "dpo.warmup_steps": (-1, 0, "an integer >= 0"),
    "dpo.max_grad_norm": (-1.0, 0.0, "a number >= 0 (0 disables clipping)"),
    "dpo.sft_weight": (-1.0, 0.0, "a number >= 0 (0: pure DPO)"),
    "dpo.rejected_from": ("humans", "model", "one of 'file', 'model'"),
    "dpo.samples": (0, 1, "an integer >= 1"),
    "dpo.temperature": (0.0, 1e-9, "a number > 0"),
    "dpo.generation_batch_size": (0, 1, "an integer >= 1"),
    "dpo.negatives_per_prompt": (0, 1, "an integer >= 1"),
    "dpo.max_length": (7, 8, "an integer >= 8"),
    "dpo.eval_max_pairs": (0, 1, "an integer >= 1"),
    "dpo.train_max_pairs": (-1, 0, "an integer >= 0 (0: all)"),
    "dpo.log_every": (0, 1, "an integer >= 1"),
    "report.samples": (-1, 0, "an integer >= 0"),
}


def _config(**fields):
    """A config with the defaults, a held-out file and ``fields`` ("section.key": value) set."""
    raw = {"data": {"eval_file": "held-out.jsonl"}}
    for name, value in fields.items():
        section, key = name.split(".")
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw)


def test_the_fields_with_limits_are_exactly_those_listed():
    import dataclasses

    from fedft.config import SECTIONS

    declared = {f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
                if f.metadata}
    assert declared == set(FIELD_LIMITS)


@pytest.mark.parametrize("name", sorted(FIELD_LIMITS))
def test_every_limited_field_refuses_a_value_outside_its_limit_and_takes_one_inside(name):
    bad, good, allowed = FIELD_LIMITS[name]
    with pytest.raises(ConfigError) as err:
        _config(**{name: bad})
    shown = tuple(bad) if isinstance(bad, list) else bad
    assert str(err.value) == f"config: {name} = {shown!r} is not allowed; expected {allowed}"
    section, key = name.split(".")
    taken = getattr(getattr(_config(**{name: good}), section), key)
    assert taken == (tuple(good) if isinstance(good, list) else good)


# Every rule between fields: settings that break it, and the whole message (after 'config: ').
RULES = [
    ({"strategy.min_train_nodes": 5},
     "strategy.min_train_nodes = 5 is not allowed; expected at most simulation.num_supernodes = 4"),
    ({"lora.client_ranks": [4, 4]},
     "lora.client_ranks = (4, 4) is not allowed; expected one rank per simulated client (4), or []"),
    ({"lora.client_ranks": [4, 4, 4, 32]},
     ("lora.client_ranks = (4, 4, 4, 32) is not allowed; expected ranks at most lora.r = 16 (the global "
      "adapter's rank)")),
    ({"lora.client_ranks": [4, 4, 4, 4], "strategy.aggregation": "ffa"},
     ("lora.client_ranks = (4, 4, 4, 4) is not allowed; expected equal ranks with strategy.aggregation = 'ffa' "
      "(every client shares one frozen A); use 'svd' or 'fedavg' for heterogeneous ranks")),
    ({"privacy.client_sampling": "poisson"},
     ("privacy.client_sampling = 'poisson' is not allowed; expected 'fixed' unless privacy.user_level is on "
      "(Poisson sampling of clients exists for the user-level accounting)")),
    ({"strategy.robust": "median", "strategy.aggregation": "svd"},
     ("strategy.robust = 'median' is not allowed; expected 'none' with strategy.aggregation = 'svd' (robust "
      "statistics apply coordinate-wise to the tensors sent; the SVD re-factors their products)")),
    ({"strategy.robust": "median", "privacy.user_level": True},
     ("strategy.robust = 'median' is not allowed; expected 'none' with privacy.user_level (DP-FedAvg's noise is "
      "calibrated to the mean of the clipped updates)")),
    ({"strategy.robust": "trimmed_mean", "lora.client_ranks": [4, 4, 4, 4]},
     ("strategy.robust = 'trimmed_mean' is not allowed; expected 'none' with lora.client_ranks (zero-padded "
      "smaller ranks would look like outliers)")),
    ({"privacy.user_level": True, "strategy.aggregation": "svd"},
     ("strategy.aggregation = 'svd' is not allowed; expected 'fedavg' or 'ffa' with privacy.user_level (noise "
      "is added to the mean of the clipped updates; the SVD's re-factoring has no sensitivity bound)")),
    ({"privacy.user_level": True, "lora.client_ranks": [4, 4, 4, 4]},
     ("lora.client_ranks = (4, 4, 4, 4) is not allowed; expected [] with privacy.user_level (every update must "
      "have the same shape)")),
    ({"privacy.user_level": True, "strategy.wire_dtype": "float16"},
     ("strategy.wire_dtype = 'float16' is not allowed; expected 'float32' with privacy.user_level (rounding to "
      "float16 after clipping could push an update above clip_norm)")),
    ({"privacy.canaries": 4, "privacy.canary_client": 4},
     "privacy.canary_client = 4 is not allowed; expected a simulated client's partition id, 0..3"),
    ({"privacy.record_level": True, "train.grad_accum": 2},
     ("train.grad_accum = 2 is not allowed; expected 1 with privacy.record_level (Poisson-sampled batches are "
      "the DP-SGD steps)")),
    ({"privacy.record_level": True, "strategy.name": "fedprox"},
     ("strategy.name = 'fedprox' is not allowed; expected 'fedavg' with privacy.record_level (the proximal term "
      "is not per-example)")),
    ({"strategy.name": "scaffold", "strategy.aggregation": "svd"},
     ("strategy.aggregation = 'svd' is not allowed; expected the default with strategy.name = 'scaffold' (its "
      "control variates live in the space of the averaged A and B tensors)")),
    ({"strategy.name": "scaffold", "privacy.user_level": True},
     ("privacy.user_level = True is not allowed; expected false with strategy.name = 'scaffold' (not implemented "
      "with differential privacy)")),
    ({"strategy.name": "fedprox", "strategy.server_optimizer": "fedadam"},
     ("strategy.server_optimizer = 'fedadam' is not allowed; expected 'none' with strategy.name = 'fedprox' "
      "(use fedavg with a server optimizer)")),
    ({"strategy.aggregation": "svd", "strategy.server_optimizer": "fedyogi"},
     ("strategy.server_optimizer = 'fedyogi' is not allowed; expected 'none' with strategy.aggregation = 'svd': "
      "the SVD re-factors A and B every round, so their round-to-round difference is no pseudo-gradient")),
    ({"dpo.enabled": True, "dpo.eval_path": "p.jsonl"},
     ("dpo.train_path = '' is not allowed; expected a preference JSONL file (rows with prompt, chosen, "
      "rejected) when dpo.enabled")),
    ({"dpo.enabled": True, "dpo.train_path": "p.jsonl"},
     ("dpo.eval_path = '' is not allowed; expected a preference JSONL file (rows with prompt, chosen, rejected) "
      "when dpo.enabled")),
    ({"dpo.enabled": True, "dpo.train_path": "p.jsonl", "dpo.eval_path": "q.jsonl", "dpo.steps": 10,
      "dpo.warmup_steps": 10},
     "dpo.warmup_steps = 10 is not allowed; expected fewer than dpo.steps = 10"),
]


@pytest.mark.parametrize("fields, message", RULES)
def test_every_rule_between_fields_gives_its_message(fields, message):
    with pytest.raises(ConfigError) as err:
        _config(**fields)
    assert str(err.value) == f"config: {message}"


def test_rules_between_fields_hold_only_when_they_apply():
    _config(**{"strategy.min_train_nodes": 5, "strategy.name": "local"})  # no federation: no quorum
    _config(**{"lora.client_ranks": [4, 4, 4, 16], "strategy.aggregation": "svd"})
    _config(**{"privacy.canaries": 2, "privacy.canary_client": 3})
    _config(**{"privacy.client_sampling": "poisson", "privacy.user_level": True})
    _config(**{"dpo.train_path": "", "dpo.warmup_steps": 100})  # dpo not enabled


def test_field_limits_are_checked_before_the_rules_between_fields_choices_first():
    with pytest.raises(ConfigError, match=r"data.partition = 'random'"):
        _config(**{"data.partition": "random", "lora.r": 0, "strategy.min_train_nodes": 9})
    with pytest.raises(ConfigError, match=r"lora.r = 0 is not allowed"):
        _config(**{"lora.r": 0, "strategy.min_train_nodes": 9})


def test_train_and_dpo_share_their_optimizer_fields():
    import dataclasses

    from fedft.config import DpoConfig, TrainConfig

    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    dpo = {f.name: f for f in dataclasses.fields(DpoConfig)}
    for name in ("learning_rate", "lr_schedule", "warmup_steps", "max_grad_norm"):
        assert train[name].default == dpo[name].default
        assert train[name].metadata["allowed"] == dpo[name].metadata["allowed"]
    assert TrainConfig().learning_rate == DpoConfig().learning_rate == 1e-3


def test_a_broken_rule_in_a_file_names_the_line_of_the_field_it_names(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[data]\neval_file = "e.jsonl"\n[strategy]\nname = "fedavg"\nwire_dtype = "float16"\n'
                    "[privacy]\nuser_level = true\n[train]\nwarmup_steps = -2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)  # the range is checked first
    assert str(err.value) == f"{path}:9: train.warmup_steps = -2 is not allowed; expected an integer >= 0"
    path.write_text(path.read_text().replace("warmup_steps = -2", "warmup_steps = 2"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:5: strategy.wire_dtype = 'float16' is not allowed; expected 'float32'")
    path.write_text('[data]\neval_file = "e.jsonl"\n[dpo]\nenabled = true\neval_path = "p.jsonl"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)  # a field the file does not set: the file, no line
    assert str(err.value).startswith(f"{path}: dpo.train_path = '' is not allowed")


def test_a_bad_set_value_names_the_set_argument_not_a_line_of_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[data]\neval_file = "e.jsonl"\n[train]\nbatch_size = 8\n')
    with pytest.raises(ConfigError, match=r"^--set train.batch_size=abc: train.batch_size = 'abc' has the wrong type"):
        load_config(path, ["train.batch_size=abc"])
    with pytest.raises(ConfigError, match=r"^--set train.batch_size=0: train.batch_size = 0 is not allowed"):
        load_config(path, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"c.toml:4: train.batch_size = 0 is not allowed"):
        path.write_text('[data]\neval_file = "e.jsonl"\n[train]\nbatch_size = 0\n')
        load_config(path)


def test_data_columns_come_from_a_toml_table_or_set_and_round_trip(tmp_path):
    import json
    import pickle

    path = tmp_path / "c.toml"
    path.write_text('[data]\neval_file = "e.jsonl"\ncolumns = {instruction = "question", output = "answer"}\n')
    cfg = load_config(path)
    assert cfg.data.columns == {"instruction": "question", "output": "answer"}
    # an entry adds to the file's table; a whole table replaces it
    assert load_config(path, ["data.columns.input=context"]).data.columns == {
        "instruction": "question", "output": "answer", "input": "context"}
    assert load_config(path, ['data.columns={output = "reply"}']).data.columns == {"output": "reply"}
    # hashable and read-only, so a section holding it stays a cache key; JSON and pickle round-trip
    assert hash(cfg.data) == hash(load_config(path).data)
    with pytest.raises(TypeError, match="read-only"):
        cfg.data.columns["input"] = "context"
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg


@pytest.mark.parametrize("text, overrides, message", [
    ('columns = {question = "instruction"}', [],
     ":3: data.columns = {'question': 'instruction'} is not allowed; expected a table from row fields (instruction, "
     "input, output, messages) to your files' column names, e.g. {instruction = \"question\", output = \"answer\"}; "
     "not a row field: 'question'"),
    ("", ["data.columns.answer=reply"], "--set data.columns.answer=reply: data.columns = {'answer': 'reply'} is not "
     "allowed; expected a table from row fields"),
    ("columns = {output = 3}", [], ":3: data.columns = {'output': 3} has the wrong type: expected a table of "
     'strings, e.g. {instruction = "question"}'),
    ("", ["data.columns=answer"], "--set data.columns=answer: data.columns = 'answer' has the wrong type"),
    ('columns = {output = ""}', [], "data.columns = {'output': ''} is not allowed; expected a table whose values "
     "are column names (non-empty strings)"),
])
def test_a_bad_data_columns_names_the_field_and_the_row_fields(tmp_path, text, overrides, message):
    path = tmp_path / "c.toml"
    path.write_text(f'[data]\neval_file = "e.jsonl"\n{text}\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert message in str(err.value)
