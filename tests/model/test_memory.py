"""The client memory estimate's exact parts agree with what bitsandbytes and peft allocate."""

from __future__ import annotations

import torch

from fedft.model.memory import COMMON_MODELS, DecoderShape, base_weight_bytes, client_memory, lora_parameters


def _small_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    return tmp_path


def _stored_bytes(model) -> int:
    """Parameters and buffers plus the 4-bit layers' quantization constants."""
    total = model.get_memory_footprint()
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


def test_nf4_weight_bytes_match_what_bitsandbytes_stores(tmp_path):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(_small_llama(tmp_path), quantization_config=quant,
                                             dtype=torch.bfloat16, device_map={"": "cpu"})
    shape = DecoderShape.from_hf_config(model.config)
    measured = _stored_bytes(model)
    estimate = base_weight_bytes(shape, prepared_for_training=False)
    assert abs(estimate - measured) / measured < 0.01, (estimate, measured)
    assert base_weight_bytes(shape, "none") > 2 * measured  # 16-bit linear layers
    # training prepares the quantized base: peft casts embeddings, head and norms to float32
    from peft import prepare_model_for_kbit_training

    prepared = _stored_bytes(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False))
    assert prepared > measured and abs(base_weight_bytes(shape) - prepared) / prepared < 0.01, (prepared,)


def test_lora_parameter_count_matches_peft(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(_small_llama(tmp_path))
    shape = DecoderShape.from_hf_config(model.config)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_parameters(shape, 8) == trainable


def test_the_table_grows_with_the_model():
    totals = [client_memory(shape)["total"] for shape in COMMON_MODELS]
    assert totals[0] < totals[1] < totals[-1]
    small = client_memory(COMMON_MODELS[0], checkpointing=False)["activations (est.)"]
    assert small > client_memory(COMMON_MODELS[0])["activations (est.)"]
