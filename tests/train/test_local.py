"""The local training loop: loss falls, adapter moves, FedProx pulls toward the global adapter."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedft.config import TrainConfig, load_config
from fedft.federated.client_round import client_examples
from fedft.model.adapter import get_adapter_state
from fedft.model.load import cached_peft_model, model_spec
from fedft.train.local import lr_multiplier, train_local


@pytest.fixture
def setup(tiny_config_path):
    cfg = load_config(tiny_config_path, ["train.local_steps=6"])
    model, tokenizer = cached_peft_model(model_spec(cfg))
    examples = client_examples(cfg.data, tokenizer, num_partitions=cfg.simulation.num_supernodes, partition_id=0)
    return cfg, model, tokenizer, examples


def _distance(a, b):
    return sum(((a[k] - b[k]) ** 2).sum().item() for k in a) ** 0.5


def test_training_lowers_loss_and_moves_only_the_adapter(setup):
    cfg, model, tokenizer, examples = setup
    start = get_adapter_state(model)
    first = train_local(model, examples, tokenizer.pad_token_id, cfg.train, global_state=start,
                        round_index=1, total_rounds=2)
    second = train_local(model, examples, tokenizer.pad_token_id, cfg.train, global_state=first.state,
                         round_index=2, total_rounds=2)
    assert second.train_loss < first.train_loss
    assert _distance(first.state, start) > 0
    assert first.num_examples == len(examples) and first.steps == 6


def test_same_seed_same_result_and_mu_zero_is_plain_training(setup):
    cfg, model, tokenizer, examples = setup
    start = get_adapter_state(model)
    kwargs = dict(global_state=start, round_index=1, total_rounds=1, seed=3)
    plain = train_local(model, examples, tokenizer.pad_token_id, cfg.train, **kwargs)
    prox0 = train_local(model, examples, tokenizer.pad_token_id, cfg.train, proximal_mu=0.0, **kwargs)
    for key in plain.state:
        assert torch.equal(plain.state[key], prox0.state[key])


def test_proximal_term_keeps_the_adapter_closer_to_the_global_one(setup):
    cfg, model, tokenizer, examples = setup
    start = get_adapter_state(model)
    kwargs = dict(global_state=start, round_index=1, total_rounds=1, seed=3)
    free = train_local(model, examples, tokenizer.pad_token_id, cfg.train, **kwargs)
    held = train_local(model, examples, tokenizer.pad_token_id, cfg.train, proximal_mu=50.0, **kwargs)
    assert _distance(held.state, start) < _distance(free.state, start)


def test_gradient_accumulation_counts_optimizer_steps(setup):
    cfg, model, tokenizer, examples = setup
    calls = []
    train_cfg = dataclasses.replace(cfg.train, local_steps=3, grad_accum=2)
    train_local(model, examples, tokenizer.pad_token_id, train_cfg, global_state=get_adapter_state(model),
                round_index=1, total_rounds=1, on_step=lambda s, l: calls.append(s))
    assert calls == [0, 1, 2]


def test_schedule_spans_rounds():
    cfg = TrainConfig(local_steps=10, lr_schedule="cosine", warmup_steps=0)
    assert lr_multiplier(0, 100, cfg) == 1.0
    assert lr_multiplier(50, 100, cfg) == pytest.approx(0.5)
    assert lr_multiplier(100, 100, cfg) == pytest.approx(0.0, abs=1e-12)
    linear = dataclasses.replace(cfg, lr_schedule="linear", warmup_steps=10)
    assert lr_multiplier(4, 110, linear) == pytest.approx(0.5)
    assert lr_multiplier(60, 110, linear) == pytest.approx(0.5)


def test_gradient_checkpointing_on_the_4bit_base_still_trains_the_adapter(tiny_config_path):
    from fedft.model.load import load_peft_model, load_tokenizer, model_spec

    cfg = load_config(tiny_config_path, ["model.gradient_checkpointing=true", "train.local_steps=3"])
    spec = model_spec(cfg)
    model, tokenizer = load_peft_model(spec), load_tokenizer(spec)
    assert model.base_model.model.is_gradient_checkpointing
    examples = client_examples(cfg.data, tokenizer, num_partitions=cfg.simulation.num_supernodes, partition_id=1)
    start = get_adapter_state(model)
    result = train_local(model, examples, tokenizer.pad_token_id, cfg.train, global_state=start,
                         round_index=1, total_rounds=1)
    assert _distance(result.state, start) > 0 and result.train_loss == result.train_loss  # not NaN
