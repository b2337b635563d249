"""Flower's Simulation Engine hands the ServerApp's messages to the client actors as they are stored.

In flwr 1.41-1.42 the engine's extractor thread (``vce_api.add_messages_to_queue``) asks the
in-memory LinkState for every node's next message, then sleeps 100 ms; a round's messages
waited 50 ms on average (up to 100 ms) before an actor got them: measured between fedft's
push and the client's first step, 26-100 ms on the demo, whose rounds take 2 s. ``install``
replaces that loop, in this process, with the same loop (same arguments, same queries, same
queue) that also wakes as soon as a message is stored in the LinkState it reads: the state's
``store_message_ins`` is wrapped on that one object while the loop runs. It still looks every
``FLOWER_POLL_S`` seconds, as Flower's does, so a message stored some other way is never
missed. A Flower without this function is left as it is (``install`` returns False).
"""

from __future__ import annotations

import threading

FLOWER_POLL_S = 0.1  # Flower's own interval, kept as the fallback


def install() -> bool:
    """Make this process's Simulation Engine use ``add_messages_to_queue_on_store``; whether it could."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:
        return False
    if not callable(getattr(vce_api, "add_messages_to_queue", None)):
        return False
    vce_api.add_messages_to_queue = add_messages_to_queue_on_store  # run_api looks the name up when it starts
    return True


def add_messages_to_queue_on_store(state, queue, nodes_mapping, f_stop: threading.Event) -> None:
    """Flower's extractor loop: put every node's next stored message on ``queue`` until ``f_stop``;
    between passes, wait until a message is stored in ``state`` (at most ``FLOWER_POLL_S``)."""
    stored = threading.Event()
    store = state.store_message_ins

    def store_and_wake(message):
        message_id = store(message)
        stored.set()
        return message_id

    state.store_message_ins = store_and_wake  # this object only; every caller looks the method up on it
    try:
        while not f_stop.is_set():
            stored.clear()  # before the pass: a message stored during it wakes the next one at once
            for node_id in nodes_mapping.keys():
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
            stored.wait(FLOWER_POLL_S)
    finally:
        del state.store_message_ins
