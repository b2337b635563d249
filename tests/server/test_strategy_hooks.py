"""Flower's strategy hooks and the tensor forms fedft's round loop calls give the same rounds.

``configure_train`` / ``aggregate_train`` take and give ArrayRecords (Flower's API);
``configure_state`` / ``aggregate_state`` take and give the adapter as tensors (no record made
only to be read back). For each kind of strategy both paths must send the same payloads and
produce the same new adapter.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from fedft.config import load_config
from fedft.federated import wire
from fedft.federated.tensor_bytes import state_from_record
from server.strategy import make_strategy
from tests.federated.test_lora_aggregate import adapter

THREE_NODES = ["simulation.num_supernodes=3", "strategy.min_train_nodes=3"]
STRATEGIES = {
    "fedavg": [],
    "fedprox": ["strategy.name=fedprox", "strategy.proximal_mu=0.1"],
    "scaffold": ["strategy.name=scaffold"],
    "fedadam": ["strategy.server_optimizer=fedadam", "strategy.server_lr=0.05"],
    "ffa-fedavgm": ["strategy.aggregation=ffa", "strategy.server_optimizer=fedavgm"],
    "svd-fp16": ["strategy.aggregation=svd", "strategy.wire_dtype=float16"],
}


class NodesOnly:
    """A Grid as far as configure_train asks: the node ids."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


_ids = itertools.count()


def reply_to(message: Message, state: dict, lr_sum: float) -> Message:
    """A client's reply to ``message`` as the server receives it."""
    node = message.metadata.dst_node_id
    metadata = Metadata(run_id=1, message_id=f"r{next(_ids)}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"m{node}", group_id="1", created_at=0.0, ttl=60.0,
                        message_type="train")
    metrics = MetricRecord({wire.NUM_EXAMPLES: 10 + node, wire.TRAIN_LOSS: 1.0, wire.LR_SUM: lr_sum})
    return Message(content=RecordDict({wire.ARRAYS: ArrayRecord(torch_state_dict=state), wire.METRICS: metrics}),
                   metadata=metadata)


def two_rounds(cfg, tensors: bool) -> tuple[list[list[dict]], dict]:
    """Two rounds over three nodes, through one path; what each message carried and the last adapter."""
    from server.strategy import expected_lr_sum

    strategy, grid, state, sent = make_strategy(cfg), NodesOnly([1, 2, 3]), adapter(4, 0), []
    config = ConfigRecord({"x": 1})
    for round_index in (1, 2):
        random.seed(round_index)
        if tensors:
            messages = strategy.configure_state(round_index, state, config, grid)
        else:
            messages = list(strategy.configure_train(round_index, ArrayRecord(torch_state_dict=state), config, grid))
        sent.append([{key: state_from_record(record) for key, record in m.content.items()
                      if isinstance(record, ArrayRecord)} for m in messages])
        replies = [reply_to(m, {k: v + 0.01 * m.metadata.dst_node_id for k, v in payload[wire.ARRAYS].items()},
                            expected_lr_sum(cfg, round_index)) for m, payload in zip(messages, sent[-1])]
        collected = strategy.collect_replies(round_index, replies)
        if tensors:
            state, _ = strategy.aggregate_state(round_index, collected)
        else:
            arrays, _ = strategy.aggregate_train(round_index, collected)
            state = arrays.to_torch_state_dict()
    return sent, state


@pytest.mark.parametrize("name", STRATEGIES)
def test_the_tensor_hooks_send_and_aggregate_what_flowers_record_hooks_do(tiny_config_path, task_identity, name):
    cfg = load_config(tiny_config_path, [*THREE_NODES, *STRATEGIES[name]])
    sent_records, final_records = two_rounds(cfg, tensors=False)
    sent_tensors, final_tensors = two_rounds(cfg, tensors=True)
    assert [[{r: list(m[r]) for r in m} for m in round_] for round_ in sent_records] == \
        [[{r: list(m[r]) for r in m} for m in round_] for round_ in sent_tensors]
    assert all(torch.equal(a[r][k], b[r][k]) for ra, rb in zip(sent_records, sent_tensors)
               for a, b in zip(ra, rb) for r in a for k in a[r])
    assert final_records.keys() == final_tensors.keys()
    for key in final_records:
        torch.testing.assert_close(final_tensors[key], final_records[key], rtol=0, atol=0)
    start = adapter(4, 0)
    assert any(not torch.equal(final_tensors[k], start[k]) for k in start)  # the rounds moved the adapter


def test_clients_of_one_rank_share_one_payload_and_another_rank_gets_its_own(tiny_config_path, task_identity):
    strategy = make_strategy(load_config(tiny_config_path, [*THREE_NODES]))
    strategy.node_ranks = {1: 4, 2: 4, 3: 2}
    random.seed(0)
    messages = strategy.configure_state(1, adapter(4, 0), ConfigRecord({"x": 1}), NodesOnly([1, 2, 3]))
    payload = {m.metadata.dst_node_id: m.content[wire.ARRAYS] for m in messages}
    assert payload[1] is payload[2] and payload[3] is not payload[1]
    assert {tuple(a.shape) for a in payload[3].values()} != {tuple(a.shape) for a in payload[1].values()}
