"""How much memory one institution's client needs: 4-bit base, LoRA, optimizer, activations.

Pure arithmetic on a decoder's shape (the numbers in its ``config.json``), so an
institution can size its GPU before downloading anything. Weight bytes are exact for
bitsandbytes' storage (NF4 packs two weights per byte and keeps one absmax per 64-weight
block: fp32, or 8-bit plus a second-level fp32 per 256 blocks with double quantization);
activation bytes are an estimate (see ``activation_bytes``). ``python -m fedft.model.memory``
prints the table in docs/deployment.md.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
NF4_BLOCK = 64  # weights per absmax (bitsandbytes' 4-bit default)
DOUBLE_QUANT_BLOCK = 256  # absmax values per second-level constant


@dataclass(frozen=True)
class DecoderShape:
    """The numbers of a Llama-style decoder's config.json that decide its size."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer of one decoder block: q, k, v, o, gate, up, down."""
        h, i, kv = self.hidden, self.intermediate, self.kv_width
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    @classmethod
    def from_hf_config(cls, config, name: str = "") -> "DecoderShape":
        return cls(name or getattr(config, "name_or_path", "") or config.model_type,
                   config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, getattr(config, "num_key_value_heads", None)
                   or config.num_attention_heads, config.vocab_size, bool(config.tie_word_embeddings))


# Public config.json values of common base models (Hugging Face hub, as released).
COMMON_MODELS = (
    DecoderShape("Llama-3.2-1B", 2048, 8192, 16, 32, 8, 128256, True),
    DecoderShape("Llama-3.2-3B", 3072, 8192, 28, 24, 8, 128256, True),
    DecoderShape("Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, False),
    DecoderShape("Mistral-7B-v0.3", 4096, 14336, 32, 32, 8, 32768, False),
    DecoderShape("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, False),
    DecoderShape("Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, False),
)


def quantized_linear_bytes(num_weights: int, quantization: str, double_quant: bool = True) -> float:
    """Bytes bitsandbytes stores for a linear layer's weights (biases aside)."""
    if quantization == "nf4":
        absmax = num_weights / NF4_BLOCK
        constants = absmax * 1 + absmax / DOUBLE_QUANT_BLOCK * 4 if double_quant else absmax * 4
        return num_weights / 2 + constants
    if quantization == "int8":
        return num_weights * 1 + num_weights ** 0.5 * 4  # one fp32 scale per row (approx. sqrt)
    return num_weights * 2  # 16-bit


def base_weight_bytes(shape: DecoderShape, quantization: str = "nf4", double_quant: bool = True,
                      dtype_bytes: int = 2, prepared_for_training: bool = True) -> float:
    """The base model in memory: quantized linear layers, then the embeddings, head and norms.

    Those stay in ``dtype_bytes`` as loaded; but training a quantized base goes through peft's
    ``prepare_model_for_kbit_training``, which casts every parameter that is not quantized to
    float32 (``prepared_for_training``, the default), doubling them at 16-bit compute dtypes.
    """
    linear = sum(i * o for i, o in shape.linear_shapes()) * shape.layers
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)
    norms = shape.hidden * (2 * shape.layers + 1)
    rest = 4 if prepared_for_training and quantization != "none" else dtype_bytes
    return quantized_linear_bytes(linear, quantization, double_quant) + (embeddings + norms) * rest


def lora_parameters(shape: DecoderShape, rank: int) -> int:
    """LoRA on every linear layer of every block ("all-linear"): r * (in + out) each."""
    return rank * sum(i + o for i, o in shape.linear_shapes()) * shape.layers


def activation_bytes(shape: DecoderShape, batch: int, seq: int, checkpointing: bool, dtype_bytes: int = 2) -> float:
    """An estimate of the activations kept for the backward pass.

    Per block, about ``seq * batch * (34 * hidden + 5 * heads * seq)`` bytes at 16 bits
    (Korthikanti et al., 2022, without sequence parallelism; an eager attention, so an
    upper bound with SDPA / flash attention). With gradient checkpointing only each block's
    input is kept, plus one block recomputed at a time. The fp32 logits, the loss's
    log-softmax and the logits' gradient (``4 * 3 * batch * seq * vocab``) are added in both
    cases: at 128k vocabularies they dominate.
    """
    per_block = seq * batch * (34 * shape.hidden + 5 * shape.heads * seq) * dtype_bytes / 2
    if checkpointing:
        kept = shape.layers * seq * batch * shape.hidden * dtype_bytes + per_block
    else:
        kept = shape.layers * per_block
    return kept + 12 * batch * seq * shape.vocab


def client_memory(shape: DecoderShape, *, rank: int = 16, batch: int = 4, seq: int = 512,
                  quantization: str = "nf4", checkpointing: bool = True) -> dict[str, float]:
    """GiB one client needs to QLoRA-train ``shape``: weights, LoRA + AdamW, activations."""
    lora = lora_parameters(shape, rank)
    parts = {
        "base weights": base_weight_bytes(shape, quantization),
        "LoRA + grads + AdamW": lora * 16,  # fp32 weight, gradient, two moments
        "activations (est.)": activation_bytes(shape, batch, seq, checkpointing),
    }
    parts = {k: v / GIB for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    parts["LoRA MB on the wire (fp32)"] = lora * 4 / 1024**2
    return parts


def memory_table(shapes=COMMON_MODELS, **kwargs) -> str:
    """A Markdown table of ``client_memory`` for each model."""
    rows = [(s.name, client_memory(s, **kwargs)) for s in shapes]
    columns = list(rows[0][1])
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, parts in rows:
        lines.append(f"| {name} | " + " | ".join(f"{parts[c]:.1f}" for c in columns) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("rank 16 on all linear layers, batch 4 x 512 tokens, gradient checkpointing, NF4 double quant (GiB)")
    print(memory_table())
