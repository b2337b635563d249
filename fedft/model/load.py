"""Load a causal LM (4-bit NF4, 8-bit or full precision) and attach LoRA, once per process.

``load_peft_model`` builds base + adapter through ``from_pretrained`` exactly as for any
Hugging Face checkpoint. ``cached_peft_model`` keeps one loaded model per process and
configuration, so a long-lived worker (a Ray actor in simulation) swaps adapter tensors
between rounds instead of reloading and re-quantizing the base; ``initial_adapter_state``
is the seeded adapter every client starts from. No training loop lives here.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

import torch

from fedft.config import FedftConfig, LoraConfig, ModelConfig
from fedft.model.adapter import get_adapter_state
from fedft.model.quantization import (
    check_cpu_kernel_shapes,
    check_quantization,
    keep_training_kernel,
    quantization_census,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# How many times this process built each configuration (read by tests and logs).
LOAD_COUNTS: Counter = Counter()
_CACHE: dict = {}
_INITIAL: dict = {}
_FACTS: dict = {}  # what each cached configuration turned out to be (quantization, prompt format)
# At most this many configurations stay loaded (None: no limit). A long-lived process that serves
# whatever configs arrive (an institution's resident worker) keeps 1: a new config frees the old model.
MAX_CACHED: int | None = None
_CACHE_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelSpec:
    """What loading a model depends on, and nothing else: the key of the per-process cache."""

    path: str  # the base: a local directory or a hub id (``FedftConfig.model_path``, resolved)
    model: ModelConfig  # quantization, compute dtype, device, checkpointing
    lora: LoraConfig
    seed: int  # seeds LoRA's initialisation
    reentrant_checkpointing: bool = False  # Opacus loses per-sample gradients under non-reentrant checkpointing


def model_spec(cfg: FedftConfig) -> ModelSpec:
    """The ``ModelSpec`` of a run's configuration (reentrant checkpointing under record-level DP)."""
    return ModelSpec(cfg.model_path, cfg.model, cfg.lora, cfg.seed, cfg.privacy.record_level)


class MissingExtraError(ImportError):
    """An optional heavy dependency is not installed; the message names the fix."""


def resolve_device(spec: str) -> torch.device:
    """'auto' picks the first CUDA device when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"model.device = {spec!r} but CUDA is not available on this machine")
    return device


def quantization_config(model: ModelConfig):
    """The bitsandbytes config for ``model.quantization`` (None for full precision)."""
    if model.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:  # pragma: no cover - bitsandbytes is a core dependency
        raise MissingExtraError(
            f"model.quantization = {model.quantization!r} needs bitsandbytes: pip install bitsandbytes"
        ) from err
    if model.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=model.double_quant,
        bnb_4bit_compute_dtype=DTYPES[model.compute_dtype],
    )


def load_tokenizer(spec: ModelSpec):
    """The tokenizer of the spec's base model, with a pad token (its eos token when it has none:
    ``fedft.data.prompt_format`` records which)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.path, trust_remote_code=spec.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.fedft_pad_from_eos = True
    return tokenizer


def lora_targets(model, targets: tuple[str, ...]):
    """PEFT's ``target_modules`` for ``lora.target_modules``.

    ``all-linear`` means every linear layer but the output head. On a mixture-of-experts base
    PEFT would also put LoRA on the 3-D expert weights, at rank r x experts (and 2r for fused
    gate/up), which breaks the one-rank adapter that aggregation, heterogeneous ranks and SVD
    rely on; there the linear layers are named explicitly and the experts stay frozen.
    """
    if targets != ("all-linear",):
        return list(targets)
    if not any(p.dim() >= 3 for p in model.parameters()):
        return "all-linear"
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if module is not head and (isinstance(module, torch.nn.Linear)
                                              or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt"))})


def load_peft_model(spec: ModelSpec):
    """Base model (quantized as configured, on its device) with a fresh LoRA adapter.

    The order matters: the base is placed on its device before ``get_peft_model``, or LoRA
    weights may never receive gradients. LoRA init is seeded with ``spec.seed``.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    m = spec.model
    device = resolve_device(m.device)
    # Opacus loses per-sample gradients under non-reentrant checkpointing (silently)
    reentrant = spec.reentrant_checkpointing
    quant = quantization_config(m)
    model = AutoModelForCausalLM.from_pretrained(
        spec.path,
        quantization_config=quant,
        dtype=DTYPES[m.compute_dtype],
        device_map={"": device},
        trust_remote_code=m.trust_remote_code,
    )
    census = quantization_census(model, m.quantization)
    check_quantization(census, m.allow_unquantized)
    check_cpu_kernel_shapes(model, m.quantization, device)
    keep_training_kernel(model)
    if quant is not None and not census.quantized_layers:
        quant = None  # nothing was quantized (allowed above): train it as the full-precision model it is
    if quant is not None:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=m.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": reentrant},
        )
    elif m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
    lora = PeftLoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=lora_targets(model, spec.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(spec.seed)
    model = get_peft_model(model, lora)
    model.config.use_cache = False
    model.fedft_quantization = census
    return model


def cached_peft_model(spec: ModelSpec):
    """(model, tokenizer) for this spec, loaded at most once per process."""
    with _CACHE_LOCK:
        if spec not in _CACHE:
            if MAX_CACHED is not None and len(_CACHE) >= MAX_CACHED:
                _evict_all()
            LOAD_COUNTS[spec] += 1
            model = load_peft_model(spec)
            tokenizer = load_tokenizer(spec)
            _CACHE[spec] = (model, tokenizer)
            _INITIAL[spec] = get_adapter_state(model)
            _FACTS[spec] = model_facts(model, tokenizer)
        return _CACHE[spec]


def model_facts(model, tokenizer) -> dict:
    """What a loaded model is: its effective quantization and the prompt format its data gets."""
    from fedft.data.prompt_format import prompt_format

    return {"quantization": model.fedft_quantization.as_dict(), "quantization_line": model.fedft_quantization.line(),
            "prompt_format": prompt_format(tokenizer)}


def cached_model_facts(spec: ModelSpec) -> dict:
    """``model_facts`` of this spec's cached model (loading it if needed), for summary.json."""
    cached_peft_model(spec)
    return _FACTS[spec]


def initial_adapter_state(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The seeded LoRA initialisation of the cached model, as it was when loaded.

    The cached model's adapter is overwritten every round, so a second run in the same
    process must start from this copy, not from whatever the model last held.
    """
    cached_peft_model(spec)
    return {k: v.clone() for k, v in _INITIAL[spec].items()}


def clear_model_cache() -> None:
    """Drop every cached model (frees memory; the next call reloads)."""
    with _CACHE_LOCK:
        _evict_all()


def _evict_all() -> None:
    _CACHE.clear()
    _INITIAL.clear()
    _FACTS.clear()
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
