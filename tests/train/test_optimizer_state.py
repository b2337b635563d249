"""train.keep_optimizer_state: a client's AdamW continues across rounds instead of restarting."""

from __future__ import annotations

import dataclasses

import torch

from fedft.config import load_config
from fedft.federated.client_round import client_examples
from fedft.model.adapter import get_adapter_state
from fedft.model.load import cached_peft_model, model_spec
from fedft.train.local import train_local
from fedft.train.optimizer_state import from_bytes, restore_state, to_bytes, trainable_names
from tests.clients.test_hostile_coordinator import ask, with_, write_policy
from tests.clients.test_hostile_coordinator import setup as institution_setup  # noqa: F401 (a fixture)


def _setup(tiny_config_path, keep: bool, steps: int):
    # constant lr, no warmup, and one batch holding every example: the batches do not depend on the
    # round's seed, so two kept rounds of 3 steps are one AdamW run of 6 steps
    cfg = load_config(tiny_config_path, [f"train.local_steps={steps}", "train.lr_schedule='constant'",
                                         "train.warmup_steps=0", f"train.keep_optimizer_state={str(keep).lower()}"])
    model, tokenizer = cached_peft_model(model_spec(cfg))
    examples = client_examples(cfg.data, tokenizer, num_partitions=cfg.simulation.num_supernodes, partition_id=0)
    train = dataclasses.replace(cfg.train, batch_size=len(examples))
    return train, model, tokenizer.pad_token_id, examples


def _two_rounds(tiny_config_path, keep: bool):
    train, model, pad, examples = _setup(tiny_config_path, keep, 3)
    start = get_adapter_state(model)
    first = train_local(model, examples, pad, train, global_state=start, round_index=1, total_rounds=2, seed=1)
    moments = from_bytes(to_bytes(first.optimizer_state)) if keep else None  # as the node state holds them
    second = train_local(model, examples, pad, train, global_state=first.state, round_index=2, total_rounds=2,
                         seed=2, optimizer_state=moments)
    return start, first, second


def test_kept_moments_make_two_rounds_one_adamw_run(tiny_config_path):
    start, first, second = _two_rounds(tiny_config_path, keep=True)
    assert first.optimizer_restored == 0 and second.optimizer_restored == len(first.state)
    assert {float(v) for k, v in second.optimizer_state.items() if k.endswith("/step")} == {6.0}
    train, model, pad, examples = _setup(tiny_config_path, True, 6)
    one_run = train_local(model, examples, pad, train, global_state=start, round_index=1, total_rounds=1, seed=1)
    for key in one_run.state:
        assert torch.allclose(second.state[key], one_run.state[key], atol=1e-6), key
    _, _, fresh = _two_rounds(tiny_config_path, keep=False)  # restarting AdamW gives another adapter
    assert fresh.optimizer_state is None
    assert max((fresh.state[k] - one_run.state[k]).abs().max().item() for k in one_run.state) > 1e-4


def test_moments_of_another_shape_start_fresh(tiny_config_path):
    train, model, pad, examples = _setup(tiny_config_path, True, 1)
    named = trainable_names(model)
    name, param = named[0]
    saved = {f"{name}/exp_avg": torch.ones(param.shape[0] + 1, *param.shape[1:]),
             f"{name}/exp_avg_sq": torch.ones(param.shape[0] + 1, *param.shape[1:]), f"{name}/step": torch.tensor(4.0)}
    saved.update({f"{n}/{m}": torch.ones_like(p.detach()) for n, p in named[1:] for m in ("exp_avg", "exp_avg_sq")})
    saved.update({f"{n}/step": torch.tensor(4.0) for n, _ in named[1:]})
    optimizer = torch.optim.AdamW([p for _, p in named])
    assert restore_state(optimizer, named, saved) == len(named) - 1
    assert param not in optimizer.state and float(optimizer.state[named[1][1]]["step"]) == 4.0


def _steps(moments: bytes) -> set[float]:
    return {float(v) for k, v in from_bytes(moments).items() if k.endswith("/step")}


def test_an_institution_keeps_its_moments_in_its_node_state_and_never_sends_them(
        institution_setup, tmp_path):  # noqa: F811 - the imported fixture
    """Deployed ClientApp, in process: round 2 continues round 1's AdamW; the reply holds only the adapter;
    an institution whose policy fixes keep_optimizer_state = false keeps nothing."""
    from clients.institution import OPTIMIZER_STATE

    cfg, site = institution_setup
    cfg = with_(cfg, train={"keep_optimizer_state": True})
    node = {"data-path": str(site / "train.jsonl")}
    reply, context = ask(cfg, node)
    assert not reply.has_error(), reply.error
    kept = dict(context.state[OPTIMIZER_STATE])
    assert kept["round"] == 1 and _steps(kept["moments"]) == {2.0}
    sent = [name for record in reply.content.values() if hasattr(record, "to_torch_state_dict") for name in record]
    assert sent and not any("/" in name for name in sent)
    reply, context = ask(cfg, node, round_index=2, context=context)
    kept = dict(context.state[OPTIMIZER_STATE])
    assert kept["round"] == 2 and _steps(kept["moments"]) == {4.0}
    policy = write_policy(tmp_path / "policy.toml", "[fixed]\ntrain = { keep_optimizer_state = false }\n")
    reply, context = ask(cfg, {**node, "policy": str(policy)})
    assert not reply.has_error() and OPTIMIZER_STATE not in context.state
