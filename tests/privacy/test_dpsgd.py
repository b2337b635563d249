"""Record-level DP-SGD with Opacus on the 4-bit NF4 base + LoRA, on CPU."""

from __future__ import annotations

import pytest
import torch

from fedft.config import load_config
from fedft.data.rows import collate
from fedft.federated.client_round import client_examples
from fedft.model.adapter import get_adapter_state
from fedft.model.load import cached_peft_model, model_spec
from fedft.privacy.accounting import record_sample_rate
from fedft.privacy.dpsgd import train_local_dp
from fedft.score.answers import per_example_loss


def _setup(tiny_config_path, *extra):
    cfg = load_config(tiny_config_path, ["privacy.record_level=true", "train.local_steps=3", *extra])
    model, tokenizer = cached_peft_model(model_spec(cfg))
    examples = client_examples(cfg.data, tokenizer, num_partitions=cfg.simulation.num_supernodes, partition_id=0)
    return cfg, model, tokenizer, examples


def _distance(a, b):
    return sum(((a[k] - b[k]) ** 2).sum().item() for k in a) ** 0.5


@pytest.mark.parametrize("checkpointing", [False, True])
def test_dp_sgd_moves_the_lora_weights_on_the_4bit_base(tiny_config_path, checkpointing):
    cfg, model, tokenizer, examples = _setup(
        tiny_config_path, f"model.gradient_checkpointing={str(checkpointing).lower()}")
    if checkpointing:  # Opacus needs reentrant checkpointing; fedft.model loads it that way
        assert model.is_gradient_checkpointing
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    start = get_adapter_state(model)
    result, spent = train_local_dp(model, examples, tokenizer.pad_token_id, cfg.train, cfg.privacy,
                                   global_state=start, round_index=1, total_rounds=cfg.strategy.num_rounds,
                                   noise_generator=torch.Generator().manual_seed(0))
    assert _distance(result.state, start) > 0
    assert spent.steps == 3 and spent.sample_rate == record_sample_rate(len(examples), cfg.train.batch_size)
    assert spent.noise_multiplier == cfg.privacy.dp_sgd_noise_multiplier
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())  # hooks cleaned up


def test_the_privacy_unit_is_one_sequence(tiny_config_path):
    """An example's loss, hence its gradient, does not depend on the rest of its batch."""
    cfg, model, tokenizer, examples = _setup(tiny_config_path)
    model.eval()
    with torch.no_grad():
        alone = per_example_loss(model, collate(examples[:1], tokenizer.pad_token_id))
        batch = per_example_loss(model, collate(examples[:1] + examples[5:9], tokenizer.pad_token_id))
    torch.testing.assert_close(alone[0], batch[0], rtol=1e-4, atol=1e-5)


def test_calibrated_noise_meets_the_client_target(tiny_config_path):
    from fedft.privacy.client_accountant import DpSgdRound, epsilon_of
    from fedft.privacy.dpsgd import planned_round

    cfg = load_config(tiny_config_path, ["privacy.record_level=true", "privacy.dp_sgd_target_epsilon=3.0",
                                         "strategy.num_rounds=5", "train.local_steps=10"])
    one = planned_round(cfg.train, cfg.privacy, cfg.strategy.num_rounds, 40)
    assert one.sample_rate == record_sample_rate(40, cfg.train.batch_size) and one.steps == 10
    planned = [DpSgdRound(one.sample_rate, one.noise_multiplier, 10)] * 5
    assert epsilon_of(planned, cfg.privacy.delta) == pytest.approx(3.0, abs=1e-3)
    assert epsilon_of(planned, cfg.privacy.delta) <= 3.0


def _per_sample_grads(cfg, examples_count=4):
    """How many trainable tensors get a per-sample gradient under Opacus hooks, of how many."""
    from opacus import PrivacyEngine

    from fedft.model.load import load_peft_model, load_tokenizer, model_spec
    from fedft.privacy.dpsgd import _Indices

    spec = model_spec(cfg)
    model, tokenizer = load_peft_model(spec), load_tokenizer(spec)
    examples = client_examples(cfg.data, tokenizer, num_partitions=cfg.simulation.num_supernodes, partition_id=0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loader = torch.utils.data.DataLoader(_Indices(len(examples)), batch_size=examples_count)
    hooks, _, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(params, lr=0.0), data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0, poisson_sampling=False, wrap_model=False)
    per_example_loss(model, collate(examples[:examples_count], tokenizer.pad_token_id)).mean().backward()
    got = [p for p in params if getattr(p, "grad_sample", None) is not None]
    assert all(p.grad_sample.shape[0] == examples_count for p in got)
    hooks.cleanup()
    return len(got), len(params)


def test_gradient_checkpointing_under_dp_sgd_is_reentrant_so_every_lora_tensor_gets_per_sample_grads(
        tiny_config_path):
    dp = load_config(tiny_config_path, ["privacy.record_level=true", "model.gradient_checkpointing=true"])
    got, total = _per_sample_grads(dp)
    assert got == total
    # the trap it avoids: transformers' default non-reentrant checkpointing loses most of them
    plain = load_config(tiny_config_path, ["model.gradient_checkpointing=true"])
    got, total = _per_sample_grads(plain)
    assert got < total


def test_the_noise_generator_follows_the_gradients_device(monkeypatch):
    """Opacus draws noise on the gradients' device; a CPU generator is reseeded there, reproducibly."""
    import torch

    from fedft.privacy.dpsgd import on_device

    cpu = torch.Generator().manual_seed(3)
    assert on_device(cpu, torch.device("cpu")) is cpu
    expected = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(3)))

    class CudaGenerator:  # this machine has no CUDA: record what a CUDA generator would be given
        def __init__(self, device):
            self.device = torch.device(device)

        def manual_seed(self, seed):
            self.seed = seed
            return self

    source = torch.Generator().manual_seed(3)
    monkeypatch.setattr(torch, "Generator", CudaGenerator)
    moved = on_device(source, torch.device("cuda:0"))
    assert moved.device == torch.device("cuda:0") and moved.seed == expected
