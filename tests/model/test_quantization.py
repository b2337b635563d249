"""What quantization did, said plainly: the census, the CPU kernel's shape rule, and an export that checks itself."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedft.config import config_to_dict, load_config
from fedft.model.load import load_peft_model, model_spec
from fedft.model.quantization import QuantizationError, quantization_census
from tests.conftest import write_tiny_setup
from tests.model.test_architectures import write_family


def test_the_census_counts_every_quantized_layer_and_keeps_the_head_apart(tiny_config_path):
    cfg = load_config(tiny_config_path)
    census = load_peft_model(model_spec(cfg)).fedft_quantization
    assert census.effective == "nf4" and census.quantized_layers == 14  # 2 layers x 7 projections
    assert census.quantized_share == 1.0 and not census.unquantized
    assert census.kept_full_precision == ["lm_head"]
    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantization="none"))
    census = load_peft_model(model_spec(plain)).fedft_quantization
    assert census.effective == "none" and census.line().startswith("base in full precision")


def test_an_evaluation_leaves_the_next_training_steps_gradients_unchanged(tiny_config_path):
    """bitsandbytes repacks a 4-bit layer for an inference kernel without a backward after one eval-mode
    pass on a CPU with AVX512-BF16 (this machine's, if it has one); fedft keeps the training kernel, so the
    LoRA gradients after an evaluation are those without one (before: 28 layers repacked, every gradient off)."""
    import bitsandbytes as bnb

    cfg = load_config(tiny_config_path)
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))

    def gradients(evaluate_first: bool) -> dict[str, torch.Tensor]:
        model = load_peft_model(model_spec(cfg))
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]  # not peft's wrappers
        assert len(layers) == 14 and not any(m.support_avx512bf16_for_cpu for m in layers)
        assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, after_eval = gradients(False), gradients(True)
    assert plain.keys() == after_eval.keys() and len(plain) == 28
    assert all(torch.equal(plain[n], after_eval[n]) for n in plain)


def test_a_layer_the_cpu_kernel_cannot_pack_is_named_before_any_round(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedft.demo.base import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    model_dir = tmp_path / "narrow-kv"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=1)  # k_proj, v_proj: 64 -> 16
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = load_config(write_tiny_setup(tmp_path, model_dir))
    with pytest.raises(QuantizationError, match=r"multiple of 32.*self_attn\.k_proj \(64 -> 16\)"):
        load_peft_model(model_spec(cfg))


def test_an_export_whose_reloaded_logits_differ_is_refused_and_writes_nothing(tmp_path, monkeypatch):
    """Without turning GPT-2's dequantized layers back into Conv1D the saved weights are transposed."""
    import fedft.model.quantization as quantization
    from fedft.model.adapter import get_adapter_state, save_adapter
    from fedft.run.export import ExportError, export_run
    from fedft.rundir import atomic_write_json

    model_dir = write_family("gpt2", tmp_path / "gpt2")
    cfg = load_config(write_tiny_setup(tmp_path, model_dir))
    model = load_peft_model(model_spec(cfg))
    gen = torch.Generator().manual_seed(1)
    state = {k: 0.2 * torch.randn(v.shape, generator=gen) for k, v in get_adapter_state(model).items()}
    run = tmp_path / "run"
    save_adapter(model, state, run / "adapter")
    atomic_write_json(run / "summary.json", {"config": config_to_dict(cfg)})
    monkeypatch.setattr(quantization, "restore_conv1d_layers", lambda model, architecture: [])
    with pytest.raises(ExportError, match="does not load back|logits"):
        export_run(run, tmp_path / "merged", merge=True, progress=lambda line: None)
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_a_partly_quantized_census_names_the_types_left_in_full_precision():
    from fedft.model.quantization import QuantizationCensus, check_quantization

    census = QuantizationCensus("nf4", quantized_layers=8, quantized_weights=24_576,
                                unquantized={"MixtralExperts (3-D expert weights)": [2, 98_304]})
    assert census.effective == "partial nf4" and round(census.quantized_share, 2) == 0.2
    with pytest.raises(QuantizationError, match=r"80% of its weight-layer weights were not quantized \(2 Mixtral"):
        check_quantization(census, allow_unquantized=False)
    check_quantization(census, allow_unquantized=True)
    assert quantization_census(torch.nn.Sequential(torch.nn.Linear(4, 4)), "nf4").effective == "none"
