"""What travels each way under each aggregation, and the client's side of it."""

from __future__ import annotations

import dataclasses

import torch

from fedft.config import load_config
from fedft.federated.client_round import lora_for_rank, received_to_start_state, reply_state
from fedft.federated.exchange import aggregate_replies, downlink_state
from fedft.federated.lora_aggregate import adapter_rank, b_only
from fedft.model.load import initial_adapter_state, model_spec
from tests.federated.test_lora_aggregate import adapter


def _with(cfg, **strategy):
    return dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, **strategy))


def test_downlink_is_b_only_under_ffa_and_half_size_in_float16(tiny_config_path):
    cfg = load_config(tiny_config_path)
    state = adapter(4, 0)
    full = sum(v.numel() * v.element_size() for v in downlink_state(cfg.strategy, state).values())
    ffa = downlink_state(_with(cfg, aggregation="ffa").strategy, state)
    assert set(ffa) == set(b_only(state))
    half = downlink_state(_with(cfg, wire_dtype="float16").strategy, state)
    assert sum(v.numel() * v.element_size() for v in half.values()) * 2 == full
    assert adapter_rank(downlink_state(cfg.strategy, state, rank=2)) == 2


def test_ffa_client_starts_from_the_shared_seeded_a(tiny_config_path):
    cfg = _with(load_config(tiny_config_path), aggregation="ffa")
    spec = model_spec(cfg)
    init = initial_adapter_state(spec)
    received = {k: torch.randn_like(v) for k, v in b_only(init).items()}
    start = received_to_start_state(spec, cfg.strategy, received)
    assert start.keys() == init.keys()
    for key in init:
        expected = received[key] if ".lora_B." in key else init[key]
        assert torch.equal(start[key], expected)
    assert set(reply_state(cfg.strategy, start)) == set(received)


def test_a_lower_rank_client_truncates_and_scales_alpha_with_its_rank(tiny_config_path):
    cfg = load_config(tiny_config_path)  # lora.r = 4, alpha = 8
    small = dataclasses.replace(cfg, lora=lora_for_rank(cfg.lora, 2))
    assert small.lora.r == 2 and small.lora.alpha / small.lora.r == cfg.lora.alpha / cfg.lora.r
    assert lora_for_rank(cfg.lora, cfg.lora.r) is cfg.lora
    start = received_to_start_state(model_spec(small), small.strategy, adapter(4, 0))
    assert adapter_rank(start) == 2


def test_aggregate_replies_reports_error_and_energy(tiny_config_path):
    cfg = load_config(tiny_config_path)
    replies, weights = [adapter(4, 1), adapter(2, 2)], [1.0, 1.0]
    naive = aggregate_replies(cfg.strategy, adapter(4, 0), replies, weights, rank=cfg.lora.r)
    assert adapter_rank(naive.state) == 4 and naive.discarded_energy is None and naive.naive_error > 0
    exact = aggregate_replies(_with(cfg, aggregation="svd").strategy, adapter(4, 0), replies, weights, rank=cfg.lora.r)
    assert adapter_rank(exact.state) == 4 and 0 < exact.discarded_energy < 1


def test_robust_aggregation_keeps_ffa_a_frozen_and_is_checked_in_the_config(tiny_config_path):
    import pytest

    from fedft.config import ConfigError
    from fedft.federated.wire import LORA_A

    cfg = _with(load_config(tiny_config_path), aggregation="ffa", robust="median")
    start = adapter(4, 0)
    replies = [{k: (v if f".{LORA_A}." in k else v + i) for k, v in start.items()} for i in (1.0, 2.0, 30.0)]
    result = aggregate_replies(cfg.strategy, start, replies, [5.0, 1.0, 1.0], rank=cfg.lora.r).state
    for key, value in start.items():
        # A stays the shared frozen one; B moves by the median change (2), whatever the weights
        assert torch.equal(result[key], value if f".{LORA_A}." in key else value + 2.0), key
    for overrides, field in ((["strategy.robust=median", "strategy.aggregation=svd"], "strategy.robust"),
                             (["strategy.robust=trimmed_mean", "privacy.user_level=true", "privacy.clip_norm=1",
                               "privacy.noise_multiplier=1"], "strategy.robust"),
                             (["strategy.trim_fraction=0.5"], "strategy.trim_fraction"),
                             (["strategy.robust=mean"], "strategy.robust")):
        with pytest.raises(ConfigError, match=field):
            load_config(tiny_config_path, overrides)
