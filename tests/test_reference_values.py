"""Reference values: a fixed-seed tiny model whose numbers are pinned, so a behaviour change cannot pass unnoticed.

The tiny random Llama of ``tests/conftest.py`` (seed 0), loaded fresh in 4-bit NF4: the loss
and adapter after five local steps, the FedAvg and exact (SVD) aggregation of two seeded
adapters, and the logits of a merged export. The numbers were recorded on CPU with torch
2.13 and bitsandbytes 0.50. A change in any of them means the computation changed:
re-record only when that change is intended, and say why in the commit.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedft.config import config_to_dict, load_config
from fedft.data.rows import load_row_files, tokenize_dataset
from fedft.federated.aggregate import fedavg
from fedft.federated.lora_aggregate import svd_aggregate
from fedft.model.adapter import get_adapter_state, save_adapter
from fedft.model.load import initial_adapter_state, load_peft_model, load_tokenizer, model_spec
from fedft.run.export import export_run
from fedft.rundir import atomic_write_json
from fedft.train.local import train_local
from tests.conftest import write_tiny_setup

REL = 1e-4  # CPU float32 kernels may differ in the last bits; a behaviour change moves far more


def _seeded_adapter(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(shape, generator=gen) for k, shape in sorted(shapes.items())}


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    cfg = load_config(write_tiny_setup(root, tiny_model_dir))
    model = load_peft_model(model_spec(cfg))  # fresh, not the per-process cache: no other adapter was loaded before
    return root, cfg, model


def local_steps_values(cfg, model) -> dict:
    tokenizer = load_tokenizer(model_spec(cfg))
    examples = tokenize_dataset(load_row_files(cfg.data.train_files), tokenizer, cfg.data)
    result = train_local(model, examples, tokenizer.pad_token_id, dataclasses.replace(cfg.train, local_steps=5),
                         global_state=initial_adapter_state(model_spec(cfg)), round_index=1, total_rounds=1, seed=7)
    return {"steps": result.steps, "train_loss": result.train_loss,
            "lora_b_abs_sum": sum(v.abs().sum().item() for k, v in result.state.items() if "lora_B" in k)}


def aggregation_values(cfg, model) -> dict:
    shapes = {k: v.shape for k, v in get_adapter_state(model).items()}
    a, b = _seeded_adapter(shapes, 1), _seeded_adapter(shapes, 2)
    averaged = fedavg([a, b], [30, 10])
    exact = svd_aggregate([a, b], [30, 10], rank=cfg.lora.r).state
    return {"fedavg_sum": sum(v.sum().item() for v in averaged.values()),
            "exact_norm_sum": sum(v.norm().item() for v in exact.values())}


def export_values(root, cfg, model) -> dict:
    from transformers import AutoModelForCausalLM

    state = _seeded_adapter({k: v.shape for k, v in get_adapter_state(model).items()}, 3)
    run = root / "run"
    save_adapter(model, state, run / "adapter")
    atomic_write_json(run / "summary.json", {"config": config_to_dict(cfg)})
    export_run(run, root / "merged", merge=True, progress=lambda _: None)
    merged = AutoModelForCausalLM.from_pretrained(root / "merged")
    ids = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        logits = merged(input_ids=ids).logits.float()
    return {"merged_logits_sum": logits.sum().item(), "merged_logits_head": logits[0, -1, 1:5].tolist()}


def test_loss_and_adapter_after_five_local_steps(setup):
    _, cfg, model = setup
    values = local_steps_values(cfg, model)
    assert values["steps"] == 5
    assert values["train_loss"] == pytest.approx(REFERENCE["train_loss"], rel=REL)
    assert values["lora_b_abs_sum"] == pytest.approx(REFERENCE["lora_b_abs_sum"], rel=REL)


def test_fedavg_and_exact_aggregation_of_two_seeded_adapters(setup):
    _, cfg, model = setup
    values = aggregation_values(cfg, model)
    assert values["fedavg_sum"] == pytest.approx(REFERENCE["fedavg_sum"], rel=REL)
    assert values["exact_norm_sum"] == pytest.approx(REFERENCE["exact_norm_sum"], rel=REL)


def test_merged_export_logits(setup):
    root, cfg, model = setup
    values = export_values(root, cfg, model)
    assert values["merged_logits_sum"] == pytest.approx(REFERENCE["merged_logits_sum"], rel=REL)
    assert values["merged_logits_head"] == pytest.approx(REFERENCE["merged_logits_head"], rel=REL)


# Recorded with the code before the package was regrouped into layers (the same numbers came out after).
REFERENCE = {
    "train_loss": 4.366594982147217,
    "lora_b_abs_sum": 136.28671216964722,
    "fedavg_sum": 0.45671308040618896,
    "exact_norm_sum": 41.848175287246704,
    "merged_logits_sum": -7.318577766418457,
    "merged_logits_head": [-0.12676414847373962, -0.09260330349206924, -0.1810142546892166, 0.18676941096782684],
}
