"""The fedft Flower ClientApp (thin): unpack the message, train locally, reply with the adapter.

The server sends the resolved fedft config with every train message, so a client needs
no config file. A simulated client finds its data through the ``partition-id`` Flower
puts in its node config; a deployed institution names its own file with
``--node-config "data-path='...'"`` (and may set its own ``lora-rank``). The reply carries only adapter tensors and the
metrics named in ``fedft.wire``.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedft import wire
from fedft.client import run_client_round

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local QLoRA training from the global adapter in ``msg``."""
    config = msg.content[wire.CONFIG]
    cfg = wire.decode_config(str(config[wire.CONFIG_JSON]))
    node = context.node_config
    partition_id = int(node[wire.PARTITION_ID]) if wire.PARTITION_ID in node else None
    data_path = str(node[wire.DATA_PATH]) if wire.DATA_PATH in node else None
    node_rank = int(node[wire.NODE_LORA_RANK]) if wire.NODE_LORA_RANK in node else None
    result = run_client_round(
        cfg,
        msg.content[wire.ARRAYS].to_torch_state_dict(),
        int(config[wire.SERVER_ROUND]),
        proximal_mu=float(config.get(wire.PROXIMAL_MU, 0.0)),
        partition_id=partition_id,
        data_path=data_path,
        client_index=partition_id if partition_id is not None else context.node_id % 1_000_003,
        node_rank=node_rank,
    )
    reply = RecordDict({
        wire.ARRAYS: ArrayRecord(torch_state_dict=result.state),
        wire.METRICS: MetricRecord({
            wire.NUM_EXAMPLES: result.num_examples,
            wire.TRAIN_LOSS: result.train_loss,
            wire.TRAIN_STEPS: result.steps,
            wire.LORA_RANK: result.rank,
            wire.CLIPPED: int(result.clipped),
        }),
    })
    return Message(content=reply, reply_to=msg)
