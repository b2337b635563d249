"""Institutions' ClientApps called in this process: a train message in, the real ``clients.app.train`` out.

``InProcessGrid`` is a Flower ``Grid`` for fedft's server loop (``server.federation``) that,
instead of a SuperLink, hands each message to the real ClientApp function with that
institution's ``Context`` (its own ``--node-config``). An exception that escapes the
ClientApp becomes an error reply carrying the exception's type and text, as
``flwr-clientapp`` does, so a leak through an uncaught error would show. The real transport
is covered by tests/simulations/test_deployment.py.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    Metadata,
    RecordDict,
)
from flwr.serverapp import Grid

from clients.app import train
from fedft.federated import wire

_IDS = itertools.count(1)


def institution(node_config: dict, node_id: int = 7, run_id: int = 1) -> Context:
    """A deployed institution's context: its own node config, empty node state."""
    return Context(run_id=run_id, node_id=node_id, node_config=dict(node_config), state=RecordDict(), run_config={})


def train_message(cfg, state: dict, round_index: int = 1, node_id: int = 7, run_id: int = 1,
                  config_json: str | None = None) -> Message:
    """What the coordinator sends an institution for one round."""
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(torch_state_dict=state),
        wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: round_index,
                                   wire.CONFIG_JSON: config_json or wire.encode_config(cfg)}),
    })
    return Message(content=content, metadata=_metadata(run_id, node_id, str(round_index)))


def _metadata(run_id: int, node_id: int, group_id: str) -> Metadata:
    return Metadata(run_id=run_id, message_id=f"m{next(_IDS)}", src_node_id=0, dst_node_id=node_id,
                    reply_to_message_id="", group_id=group_id, created_at=time.time(), ttl=3600,
                    message_type="train")


def deliver(message: Message, context: Context) -> Message:
    """The ClientApp's reply, or what flwr-clientapp would send if an exception escaped it."""
    try:
        return train(message, context)
    except Exception as ex:  # noqa: BLE001 - mirrors flwr/supernode/runtime/run_clientapp.py
        return Message(error=Error(code=0, reason=f"{type(ex)}:<'{ex}'>"), reply_to=message)


class InProcessGrid(Grid):
    """Node id -> institution context; messages are delivered in turn to the real ClientApp."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts = contexts
        self._run = None
        self._replies: dict[str, Message] = {}  # message id -> its reply, until pulled

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Deliver every message at once; its reply waits here until pulled (subclasses change
        what comes back by overriding ``send_and_receive``)."""
        messages = list(messages)
        for reply in self.send_and_receive(messages):
            self._replies[reply.metadata.reply_to_message_id] = reply
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        """The waiting replies to ``message_ids``, in the order they came back."""
        wanted = set(message_ids)
        return [self._replies.pop(i) for i in list(self._replies) if i in wanted]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{next(_IDS)}"  # as Flower's Grid does on push
            replies.append(self.reply(message))
        return replies

    def reply(self, message: Message) -> Message:
        return deliver(message, self.contexts[message.metadata.dst_node_id])


# ---------------------------------------------------------------------------------------
# A coordinator and two institutions on this machine
# ---------------------------------------------------------------------------------------

def two_institutions(root: Path, model_dir: Path, rows_per_site: int = 12,
                     names: tuple[str, str] = ("site-11", "site-12")) -> tuple[Path, dict[int, Path]]:
    """The coordinator's ``deploy.toml`` (the tiny config without training data: the institutions hold
    it) with its held-out rows, and two institutions, nodes 11 and 12, each a folder ``root/NAME``
    holding its own ``train.jsonl`` (``rows_per_site`` rows, mostly of its own task)."""
    from fedft.demo.tasks import make_demo_rows, write_jsonl
    from tests.conftest import TINY_TOML

    coordinator = root / "coordinator"
    coordinator.mkdir()
    write_jsonl(make_demo_rows(2, 4, 0.5, seed=1), coordinator / "eval.jsonl")
    config = coordinator / "deploy.toml"
    config.write_text(TINY_TOML.format(model=model_dir).replace('train_files = ["train.jsonl"]\n', ""))
    rows = make_demo_rows(2, 24, 0.9, seed=0)
    sites = {}
    for node, inst, name in ((11, "inst0", names[0]), (12, "inst1", names[1])):
        sites[node] = root / name
        write_jsonl([r for r in rows if r["institution"] == inst][:rows_per_site], sites[node] / "train.jsonl")
    return config, sites


def data_only(sites: dict[int, Path]) -> dict[int, Context]:
    """Each institution's context when its node config names only its training data."""
    return {node: institution({"data-path": str(site / "train.jsonl")}, node_id=node) for node, site in sites.items()}


def run_job(config: Path, contexts: dict[int, Context], out: Path, overrides: str = "",
            grid_class: type[InProcessGrid] = InProcessGrid, **flags) -> Path:
    """The real ServerApp (``server.app.main``) over ``grid_class``: what ``flwr run`` starts at the
    coordinator, with the job's run config (``flags`` such as ``resume=True`` become its strings)."""
    from server.app import main

    run_config = {"config": str(config), "overrides": overrides, "out-dir": str(out),
                  **{key: str(value).lower() for key, value in flags.items()}}
    main(grid_class(contexts), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return out
