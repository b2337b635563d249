"""Flower's Simulation Engine takes the ServerApp's messages as they are stored (simulations/engine_wakeup.py)."""

from __future__ import annotations

import threading
import time
from queue import Empty, Queue

from simulations import engine_wakeup


class FakeLinkState:
    """The two LinkState methods the extractor loop uses (Flower's in-memory state, reduced to them)."""

    def __init__(self) -> None:
        self.waiting: dict[int, list] = {}
        self.lock = threading.Lock()

    def store_message_ins(self, message) -> str:
        node_id, _ = message
        with self.lock:
            self.waiting.setdefault(node_id, []).append(message)
        return f"id-{message[1]}"

    def get_message_ins(self, node_id: int, limit: int) -> list:
        with self.lock:
            taken, self.waiting[node_id] = self.waiting.get(node_id, [])[:limit], self.waiting.get(node_id, [])[limit:]
        return taken


def test_flower_still_has_the_loop_fedft_replaces_and_install_replaces_it(monkeypatch):
    from flwr.server.superlink.fleet.vce import vce_api

    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)  # restored afterwards
    assert engine_wakeup.install()
    assert vce_api.add_messages_to_queue is engine_wakeup.add_messages_to_queue_on_store


def test_a_stored_message_reaches_the_queue_at_once_not_at_the_next_poll(monkeypatch):
    monkeypatch.setattr(engine_wakeup, "FLOWER_POLL_S", 30.0)  # without the wake-up a message would wait 30 s
    state, queue, stop = FakeLinkState(), Queue(), threading.Event()
    loop = threading.Thread(target=engine_wakeup.add_messages_to_queue_on_store,
                            args=(state, queue, {1: 0, 2: 1}, stop), daemon=True)
    loop.start()
    try:
        time.sleep(0.2)  # the loop has made its first pass and waits
        for round_index in (1, 2):
            started = time.monotonic()
            assert state.store_message_ins((2, round_index)) == f"id-{round_index}"  # through the wrapper
            assert queue.get(timeout=5) == (2, round_index)
            assert time.monotonic() - started < 5
        try:
            queue.get(timeout=0.2)
            raise AssertionError("a message was queued twice")
        except Empty:
            pass
    finally:
        stop.set()
        state.store_message_ins((1, 3))  # wakes the loop, which sees the stop
        loop.join(timeout=5)
    assert not loop.is_alive()
    assert "store_message_ins" not in vars(state)  # the state's own method is back
