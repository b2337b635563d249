"""4-bit loading, the per-process model cache, adapter tensors in and out, PEFT round trip."""

from __future__ import annotations

import pytest
import torch

from fedft.config import load_config
from fedft.model.adapter import get_adapter_state, save_adapter, set_adapter_state
from fedft.model.load import LOAD_COUNTS, cached_peft_model, clear_model_cache, load_peft_model, model_spec


@pytest.fixture
def cfg(tiny_config_path):
    return load_config(tiny_config_path)


def test_base_is_nf4_with_double_quant_and_only_lora_trains(cfg):
    import bitsandbytes as bnb

    model = load_peft_model(model_spec(cfg))
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "no 4-bit layers"
    state = four_bit[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # double quantization
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # all-linear: attention and MLP projections both carry LoRA
    assert any("q_proj" in n for n in trainable) and any("down_proj" in n for n in trainable)


def test_full_precision_path_has_no_4bit_layers(cfg):
    import dataclasses

    import bitsandbytes as bnb

    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantization="none"))
    model = load_peft_model(model_spec(plain))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_cache_loads_the_base_once_per_process(cfg):
    clear_model_cache()
    key = model_spec(cfg)
    before = LOAD_COUNTS[key]
    first, _ = cached_peft_model(model_spec(cfg))
    for _ in range(3):
        again, _ = cached_peft_model(model_spec(cfg))
        assert again is first
    assert LOAD_COUNTS[key] == before + 1


def test_initial_adapter_is_the_seeded_init_even_after_the_cached_model_changed(cfg):
    from fedft.model.adapter import set_adapter_state
    from fedft.model.load import initial_adapter_state, model_spec

    clear_model_cache()
    model, _ = cached_peft_model(model_spec(cfg))
    init = get_adapter_state(model)
    set_adapter_state(model, {k: torch.randn_like(v) for k, v in init.items()})
    again = initial_adapter_state(model_spec(cfg))
    assert again.keys() == init.keys()
    assert all(torch.equal(again[k], init[k]) for k in init)


def test_adapter_state_round_trips_through_peft_format(cfg, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = load_peft_model(model_spec(cfg))
    state = {k: torch.randn_like(v) for k, v in get_adapter_state(model).items()}
    save_adapter(model, state, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(cfg.model_path)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    reloaded = get_adapter_state(loaded)
    assert reloaded.keys() == state.keys()
    for key in state:
        assert torch.equal(reloaded[key], state[key]), key


def test_set_adapter_state_refuses_wrong_keys_and_shapes(cfg):
    model = load_peft_model(model_spec(cfg))
    state = get_adapter_state(model)
    key = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        set_adapter_state(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="shape"):
        set_adapter_state(model, {**state, key: torch.zeros(1, 1)})


def test_a_missing_or_truncated_model_is_named_before_anything_runs(tiny_model_dir, tmp_path):
    import shutil

    from fedft.config import ConfigError
    from fedft.model.files import check_model_files

    check_model_files(str(tiny_model_dir))
    check_model_files("meta-llama/Llama-3.2-1B")  # a hub id is from_pretrained's to resolve
    with pytest.raises(ConfigError, match=r"model.path = '/nonexistent/model': no such directory"):
        check_model_files("/nonexistent/model")
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ConfigError, match=f"{weights}: incomplete safetensors file"):
        check_model_files(str(copy))
    (copy / "config.json").unlink()
    with pytest.raises(ConfigError, match="has no config.json"):
        check_model_files(str(copy))


def test_a_process_that_keeps_one_model_frees_the_old_one_for_a_new_config(cfg, monkeypatch):
    """An institution's resident worker serves whatever configs arrive: it keeps one base, not one per job."""
    import dataclasses

    from fedft.model import load

    clear_model_cache()
    monkeypatch.setattr(load, "MAX_CACHED", 1)
    first, _ = cached_peft_model(model_spec(cfg))
    other = dataclasses.replace(cfg, seed=cfg.seed + 1)
    cached_peft_model(model_spec(other))
    assert len(load._CACHE) == 1 and model_spec(other) in load._CACHE
    again, _ = cached_peft_model(model_spec(cfg))
    assert again is not first and len(load._CACHE) == 1
    clear_model_cache()
