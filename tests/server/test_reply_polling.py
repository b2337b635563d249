"""``server.federation.send_and_receive``: Flower's push-then-pull contract with a short poll.

A fake grid hands out each reply only after a given number of pulls, as a SuperLink holds a
reply until the SuperNode has pushed it; the loop must return every reply as soon as the last
one is there, and only the replies that came once the timeout passes.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

from server.federation import IN_PROCESS_POLL_S, REPLY_POLL_S, reply_poll_s, send_and_receive


class SlowGrid:
    """Message ``i``'s reply becomes pullable at pull number ``ready_at[i]`` (None: never)."""

    def __init__(self, ready_at: list[int | None]) -> None:
        self.ready_at, self.pulls, self.pulled = ready_at, 0, set()

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        ready = [f"m{i}" for i, at in enumerate(self.ready_at)
                 if at is not None and at <= self.pulls and f"m{i}" in set(message_ids) - self.pulled]
        self.pulled |= set(ready)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]


def test_returns_as_soon_as_every_reply_is_there():
    grid = SlowGrid([1, 3, 2])
    started = time.monotonic()
    replies = send_and_receive(grid, ["a", "b", "c"], timeout_s=60, poll_s=0.01)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert grid.pulls == 3 and time.monotonic() - started < 5  # 2 polls of 0.01 s; room for a loaded machine


def test_a_missing_reply_waits_out_the_timeout_and_the_others_are_returned():
    grid = SlowGrid([1, None])
    started = time.monotonic()
    replies = send_and_receive(grid, ["a", "b"], timeout_s=0.3, poll_s=0.05)
    waited = time.monotonic() - started
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert waited >= 0.3 and grid.pulls >= 4


def test_the_simulation_engines_grid_is_asked_every_10_ms_a_network_grid_every_100_ms():
    from flwr.superlink.grid import InMemoryGrid

    in_process = InMemoryGrid.__new__(InMemoryGrid)  # its type is what counts; no LinkState needed
    assert reply_poll_s(in_process) == IN_PROCESS_POLL_S == 0.01
    assert reply_poll_s(SlowGrid([1])) == REPLY_POLL_S == 0.1
