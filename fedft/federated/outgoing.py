"""What may leave a client: a pure check on names, no torch and no flwr.

A reply carries only adapter tensors (names with ``lora_A`` / ``lora_B``) and the scalar metrics in
``fedft.federated.wire.REPLY_METRICS``; anything else is refused before it leaves the institution.
It imports nothing heavy, so a ClientApp that forwards the round to the institution's resident
worker checks its reply without importing torch.
"""

from __future__ import annotations

from fedft.federated import wire


class OutgoingDataError(RuntimeError):
    """A client reply would carry something other than adapter tensors and allowed metrics."""


def check_outgoing(record_names: dict[str, str], array_names: list[str], metric_names: list[str]) -> None:
    """Refuse a reply with extra records, non-adapter arrays or non-whitelisted metrics.

    ``record_names`` maps each record key of the reply to its kind ("arrays", "metrics",
    "config").
    """
    allowed = {wire.ARRAYS: "arrays", wire.METRICS: "metrics"}
    extra = {k: v for k, v in record_names.items() if allowed.get(k) != v}
    if extra:
        raise OutgoingDataError(f"refused to send records {sorted(extra)}: a reply carries only "
                                f"'{wire.ARRAYS}' (adapter tensors) and '{wire.METRICS}'")
    bad_arrays = [n for n in array_names if f".{wire.LORA_A}." not in n and f".{wire.LORA_B}." not in n]
    if bad_arrays:
        raise OutgoingDataError(f"refused to send non-adapter tensors {bad_arrays[:3]}")
    bad_metrics = sorted(set(metric_names) - set(wire.REPLY_METRICS))
    if bad_metrics:
        raise OutgoingDataError(f"refused to send metrics {bad_metrics}; allowed: {list(wire.REPLY_METRICS)}")
