"""The architecture matrix: nine transformers families, each built tiny, trained federated, exported.

Each family is built in the test from its config class (random weights, 2 layers, hidden 64,
every quantized width a multiple of 32 so bitsandbytes' NF4 runs on the CPU) and saved with
``save_pretrained`` beside the demo's character tokenizer; some keep its chat template, some
have none and no pad token. For each family:

1. loading in NF4 counts what bitsandbytes actually quantized (``fedft.model.quantization``);
   a family it cannot fully quantize is refused unless ``model.allow_unquantized``;
2. a federated round through the real ServerApp and the institutions' real ClientApps
   (an in-process Grid, tests/clients/inprocess.py) records the effective quantization and
   the prompt format in summary.json;
3. the run's adapter loads with ``PeftModel.from_pretrained`` on the NF4 base;
4. ``fedft export --merge`` writes a model that a fresh Python process loads with plain
   transformers (no fedft imported) and whose logits match the NF4 base + adapter (no
   dropout; the 4-bit layers in train mode, so they compute the float32 dequantize-and-matmul
   training used rather than the CPU's repacked inference kernel) within
   ``MERGED_RELATIVE_TOLERANCE`` of the largest logit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedft.model.quantization import QuantizationError
from tests.clients.inprocess import institution, run_job, two_institutions

pytestmark = pytest.mark.slow

# Measured on these models: at most ~1e-6 (float32 rounding of W + BA); a transposed or
# missing layer is off by order 1.
MERGED_RELATIVE_TOLERANCE = 1e-4


def _common(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _config(family: str, tokenizer):
    import transformers as t

    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                **_common(tokenizer))
    return {
        "llama": lambda: t.LlamaConfig(intermediate_size=128, num_key_value_heads=2, **size),
        "gpt2": lambda: t.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **_common(tokenizer)),
        "phi3": lambda: t.Phi3Config(intermediate_size=128, num_key_value_heads=4, **size),
        "qwen2": lambda: t.Qwen2Config(intermediate_size=128, num_key_value_heads=2, **size),
        "gemma": lambda: t.GemmaConfig(intermediate_size=128, num_key_value_heads=2, head_dim=16, **size),
        "mistral": lambda: t.MistralConfig(intermediate_size=128, num_key_value_heads=2, **size),
        "gpt_neox": lambda: t.GPTNeoXConfig(intermediate_size=128, **size),
        "mixtral": lambda: t.MixtralConfig(intermediate_size=64, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2, **size),
        "falcon": lambda: t.FalconConfig(new_decoder_architecture=False, multi_query=True, **size),
    }[family]()


# family -> (what it shows, chat template kept, effective quantization, needs model.allow_unquantized)
FAMILIES = {
    "llama": ("plain Llama-style", True, "nf4", False),
    "gpt2": ("Conv1D layers (weight [in, out])", False, "nf4", False),
    "phi3": ("fused qkv_proj and gate_up_proj", True, "nf4", False),
    "qwen2": ("attention bias", True, "nf4", False),
    "gemma": ("Gemma-style (scaled embeddings, head_dim apart)", False, "nf4", False),
    "mistral": ("Mistral", True, "nf4", False),
    "gpt_neox": ("older GPT-NeoX (fused query_key_value)", False, "nf4", False),
    "mixtral": ("mixture of experts: 3-D expert weights bitsandbytes leaves", True, "partial nf4", True),
    "falcon": ("FalconLinear layers bitsandbytes does not replace", True, "none", True),
}


def write_family(family: str, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from fedft.demo.base import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config(family, tokenizer)).save_pretrained(out)
    if not FAMILIES[family][1]:  # no chat template and no pad token: the fallback prompt, pad = eos
        tokenizer.chat_template = None
        tokenizer.pad_token = None
    tokenizer.save_pretrained(out)
    return out


def _deploy(root: Path, model_dir: Path, allow_unquantized: bool):
    """A coordinator config and two institutions (each with a policy file) for one federated round."""
    config, sites = two_institutions(root, model_dir, rows_per_site=8)
    contexts = {}
    for node, site in sites.items():
        (site / "policy.toml").write_text(f"[model]\nallow_unquantized = {str(allow_unquantized).lower()}\n")
        contexts[node] = institution({"data-path": str(site / "train.jsonl"),
                                      "policy": str(site / "policy.toml")}, node_id=node)
    overrides = "train.local_steps=2 strategy.num_rounds=1"
    if allow_unquantized:
        overrides += " model.allow_unquantized=true"
    return config, contexts, overrides


def _run_federated(config: Path, contexts: dict, overrides: str, out: Path) -> dict:
    run_job(config, contexts, out, overrides)
    return json.loads((out / "summary.json").read_text())


FRESH_PROCESS = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(input_ids=ids).logits
assert "fedft" not in sys.modules
torch.save(logits, sys.argv[3])
"""


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_loads_quantized_trains_federated_and_exports_a_model_that_matches(
        family, tmp_path, task_identity, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedft.config import load_config
    from fedft.model.adapter import get_adapter_state
    from fedft.model.load import load_peft_model, model_spec, quantization_config
    from fedft.run.export import export_run

    _, template, effective, needs_flag = FAMILIES[family]
    model_dir = write_family(family, tmp_path / family)
    config, contexts, overrides = _deploy(tmp_path, model_dir, needs_flag)

    # 1. loading counts what was quantized; a partial or failed quantization needs the flag
    if needs_flag:
        with pytest.raises(QuantizationError, match="did not take effect") as refused:
            load_peft_model(model_spec(load_config(config)))
        assert "model.allow_unquantized = true" in str(refused.value)
    cfg = load_config(config, overrides.split())
    census = load_peft_model(model_spec(cfg)).fedft_quantization
    assert census.effective == effective, census.line()

    # 2. one federated round; summary.json says what the base and the prompts really were
    run = tmp_path / "run"
    summary = _run_federated(config, contexts, overrides, run)
    assert summary["model"]["quantization"]["effective"] == effective
    prompts = summary["model"]["prompt_format"]
    assert prompts["prompts"] == ("chat template" if template else "fallback")
    assert prompts["pad_is_eos"] is (not template)
    console = capsys.readouterr().out
    assert f"model: base {effective}" in console and ("fallback" in console) is (not template)

    # 3. the adapter loads with PEFT on the NF4 base, tensor for tensor
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization_config(cfg.model),
                                                dtype=torch.float32, device_map={"": "cpu"})
    trained = PeftModel.from_pretrained(base, run / "adapter")
    from safetensors.torch import load_file

    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    loaded = get_adapter_state(trained)
    assert len(loaded) == len(saved) and any(v.abs().sum() > 0 for v in loaded.values())
    trained.eval()  # no dropout (GPT-2 has 0.1), but the 4-bit layers in train mode: the float32
    for module in trained.modules():  # dequantize-and-matmul training used, not the CPU's repacked kernel
        if type(module).__name__ == "Linear4bit":
            module.train()
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = trained(input_ids=ids).logits.float()

    # 4. the merged export loads without fedft and computes what base + adapter computed
    merged = tmp_path / "merged"
    export_run(run, merged, merge=True, stage="sft", progress=print)
    logits_file = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(merged), json.dumps(ids.tolist()), str(logits_file)],
                   check=True, timeout=300)
    fresh = torch.load(logits_file)
    difference = float((fresh - reference).abs().max() / reference.abs().max())
    exported = json.loads((merged / "fedft-export.json").read_text())
    with capsys.disabled():
        print(f"\n{family:9s} {FAMILIES[family][0]}: effective {census.effective} "
              f"({census.quantized_layers} quantized layers, {100 * census.quantized_share:.0f}% of weights); "
              f"merged export vs NF4 base + adapter: {difference:.1e} (relative); "
              f"export's own reload check {exported['reload_check']['relative_logit_difference']:.1e}")
    assert difference <= MERGED_RELATIVE_TOLERANCE
