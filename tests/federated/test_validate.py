"""Client-side data guard and server-side update validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedft.config import load_config
from fedft.federated import wire
from fedft.federated.outgoing import OutgoingDataError, check_outgoing
from fedft.federated.validate import reply_problem
from tests.federated.test_lora_aggregate import adapter


@pytest.fixture
def cfg(tiny_config_path):
    return load_config(tiny_config_path, ["strategy.max_update_norm=50"])


def test_a_well_formed_reply_passes_and_a_lower_rank_one_too(cfg):
    global_state = adapter(4, 0)
    assert reply_problem(cfg.strategy, cfg.privacy, global_state, adapter(4, 1)) is None
    assert reply_problem(cfg.strategy, cfg.privacy, global_state, adapter(2, 1)) is None


@pytest.mark.parametrize("spoil, reason", [
    (lambda s: {**s, "m.layers.0.q_proj.lora_A.weight": torch.full_like(s["m.layers.0.q_proj.lora_A.weight"],
                                                                         float("nan"))}, "non-finite"),
    (lambda s: {**s, "m.layers.0.q_proj.lora_B.weight": torch.zeros(12, 9)}, "does not fit"),
    (lambda s: {**s, "m.layers.0.q_proj.lora_A.weight": torch.zeros(4, 11)}, "does not fit"),
    (lambda s: {**s, "secret.weight": torch.zeros(2, 2)}, "unexpected tensors ['secret.weight']"),
    (lambda s: {k: v.half() for k, v in s.items()}, "dtype torch.float16"),
    (lambda s: {k: v * 100 for k, v in s.items()}, "above strategy.max_update_norm"),
])
def test_bad_updates_are_named(cfg, spoil, reason):
    problem = reply_problem(cfg.strategy, cfg.privacy, adapter(4, 0), spoil(adapter(4, 1)))
    assert problem is not None and reason in problem


def test_the_client_refuses_to_send_anything_else():
    ok_arrays = ["m.layers.0.q_proj.lora_A.weight"]
    check_outgoing({wire.ARRAYS: "arrays", wire.METRICS: "metrics"}, ok_arrays, [wire.NUM_EXAMPLES])
    with pytest.raises(OutgoingDataError, match="refused to send records"):
        check_outgoing({wire.ARRAYS: "arrays", wire.METRICS: "metrics", "rows": "config"}, ok_arrays, [])
    with pytest.raises(OutgoingDataError, match="non-adapter tensors"):
        check_outgoing({wire.ARRAYS: "arrays"}, ok_arrays + ["model.embed_tokens.weight"], [])
    with pytest.raises(OutgoingDataError, match="refused to send metrics"):
        check_outgoing({wire.METRICS: "metrics"}, [], [wire.NUM_EXAMPLES, "patient-count"])


def test_client_app_guard_refuses_an_extra_record():
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from clients.app import guard_reply

    reply = RecordDict({wire.ARRAYS: ArrayRecord(torch_state_dict=adapter(2, 0)),
                        wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 3})})
    guard_reply(reply)
    reply["leak"] = ConfigRecord({"row": "patient 17: ..."})
    with pytest.raises(OutgoingDataError, match="leak"):
        guard_reply(reply)


def test_the_server_leaves_bad_replies_out_and_the_round_completes(cfg):
    from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    from server.strategy import make_strategy

    cfg = dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, min_train_nodes=1))
    strategy = make_strategy(cfg)
    strategy.global_state = adapter(4, 0)
    strategy.sampled = [1, 2, 3, 4]

    def reply(node, state):  # a reply as the server receives it (metadata set by the SuperLink)
        metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                            reply_to_message_id=f"i{node}", group_id="1", created_at=0.0, ttl=60.0,
                            message_type="train")
        content = RecordDict({wire.ARRAYS: ArrayRecord(torch_state_dict=state),
                              wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10, wire.TRAIN_LOSS: 1.0})})
        return Message(content=content, metadata=metadata)

    good = adapter(4, 1)
    nan = {**good, "m.layers.0.q_proj.lora_B.weight": torch.full((12, 4), float("nan"))}
    wrong_shape = {**good, "m.layers.0.q_proj.lora_B.weight": torch.zeros(12, 5)}
    huge = {k: v * 100 for k, v in good.items()}
    replies = [reply(1, good), reply(2, nan), reply(3, wrong_shape), reply(4, huge)]
    collected = strategy.collect_replies(1, replies)
    assert collected.node_ids == [1]
    assert len(collected.rejected) == 3
    assert {r.split(":")[0] for r in collected.rejected} == {"node 2", "node 3", "node 4"}
    for given in (replies, collected):  # Flower's hook takes the messages or what collect_replies made of them
        arrays, _ = strategy.aggregate_train(1, given)
        assert arrays is not None
        merged = arrays.to_torch_state_dict()
        assert all(torch.allclose(merged[k], good[k]) for k in good)  # only the good reply counted
