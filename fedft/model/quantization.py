"""What quantization actually did to a loaded base, and the refusals when it did not do what was asked.

bitsandbytes (through transformers) replaces only ``torch.nn.Linear`` layers of exactly that
type and GPT-2's ``Conv1D``: a subclass such as Falcon's ``FalconLinear`` stays in full
precision, and so do mixture-of-experts weights stored as 3-D tensors (Mixtral's
``MixtralExperts``). The output head (and whatever transformers keeps in float32 on purpose)
is never quantized. ``quantization_census`` counts what was quantized and what was not, by
layer type and by weight count; ``check_quantization`` refuses a base whose requested
quantization did not take effect (unless ``model.allow_unquantized``) and a 4-bit base whose
layer shapes bitsandbytes' CPU kernel cannot run. ``restore_conv1d_layers`` undoes the one
layout change dequantizing makes (``Conv1D`` comes back as ``nn.Linear``) before a merged
model is saved. ``keep_training_kernel`` stops bitsandbytes from switching a CPU base to its
inference-only weight layout. Nothing here loads files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

QUANTIZED_TYPES = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}
CPU_NF4_OUT_MULTIPLE = 32  # bitsandbytes' CPU NF4 kernel packs output rows in blocks of 32


class QuantizationError(ValueError):
    """The requested quantization did not take effect, or the quantized base cannot run here."""


@dataclass
class QuantizationCensus:
    """How many weight layers (and weights) of a loaded base are quantized, and which types are not."""

    requested: str
    quantized_layers: int = 0
    quantized_weights: int = 0
    unquantized: dict[str, list[int]] = field(default_factory=dict)  # type -> [layers, weights]
    kept_full_precision: list[str] = field(default_factory=list)  # skipped on purpose (the output head)

    @property
    def unquantized_weights(self) -> int:
        return sum(weights for _, weights in self.unquantized.values())

    @property
    def quantized_share(self) -> float:
        total = self.quantized_weights + self.unquantized_weights
        return self.quantized_weights / total if total else 0.0

    @property
    def effective(self) -> str:
        """``nf4`` / ``int8`` when every weight layer is, ``none`` when none is, else ``partial nf4``."""
        if self.requested == "none" or not self.quantized_layers:
            return "none"
        return self.requested if not self.unquantized else f"partial {self.requested}"

    def describe_unquantized(self) -> str:
        return ", ".join(f"{layers} {name} ({weights:,} weights)"
                         for name, (layers, weights) in sorted(self.unquantized.items()))

    def line(self) -> str:
        """One console line: what the base is computed with."""
        if self.requested == "none":
            return "base in full precision (model.quantization = 'none')"
        text = (f"base {self.effective}: {self.quantized_layers} {QUANTIZED_TYPES[self.requested]} layers, "
                f"{100 * self.quantized_share:.0f}% of the weight-layer weights")
        if self.unquantized:
            text += f"; in full precision: {self.describe_unquantized()}"
        return text

    def as_dict(self) -> dict:
        return {"requested": self.requested, "effective": self.effective,
                "quantized_layers": self.quantized_layers, "quantized_weights": self.quantized_weights,
                "quantized_share": round(self.quantized_share, 6),
                "unquantized": {name: {"layers": layers, "weights": weights}
                                for name, (layers, weights) in sorted(self.unquantized.items())},
                "kept_full_precision": sorted(self.kept_full_precision)}


def _is_weight_layer(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _skipped_names(model) -> set[str]:
    """Modules transformers keeps in full precision on purpose (the output head, tied weights)."""
    quantizer = getattr(model, "hf_quantizer", None)
    names = set(getattr(quantizer, "modules_to_not_convert", None) or ())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names.update(name for name, module in model.named_modules() if head is not None and module is head)
    return names


def quantization_census(model, requested: str) -> QuantizationCensus:
    """Count the quantized and the full-precision weight layers of a loaded (not yet LoRA-wrapped) base.

    Weight layers are linear layers (any ``nn.Linear``, ``Conv1D``) and modules holding 3-D
    weight tensors (fused mixture-of-experts weights). Those transformers keeps in full
    precision on purpose are listed apart and do not count against the request.
    """
    census = QuantizationCensus(requested)
    quantized_type = QUANTIZED_TYPES.get(requested)
    skipped = _skipped_names(model)
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind == quantized_type:
            census.quantized_layers += 1
            census.quantized_weights += module.in_features * module.out_features
            continue
        if _is_weight_layer(module):
            if name in skipped or any(name.endswith(f".{s}") or name == s for s in skipped):
                census.kept_full_precision.append(name)
                continue
            weights = module.weight.numel()
        else:
            if "Conv" in kind:  # a vision tower's convolutions are not expert weights
                continue
            stacked = [p for p in module.parameters(recurse=False) if p.dim() == 3 and p.is_floating_point()]
            if not stacked:
                continue
            kind = f"{kind} (3-D expert weights)"
            weights = sum(p.numel() for p in stacked)
        layers, total = census.unquantized.get(kind, [0, 0])
        census.unquantized[kind] = [layers + 1, total + weights]
    return census


def check_quantization(census: QuantizationCensus, allow_unquantized: bool) -> None:
    """Refuse a base whose requested quantization left weight layers in full precision."""
    if census.requested == "none" or not census.unquantized or allow_unquantized:
        return
    share = 100 * (1 - census.quantized_share)
    what = ("none of its weight layers were" if not census.quantized_layers
            else f"{share:.0f}% of its weight-layer weights were not")
    raise QuantizationError(
        f"model.quantization = {census.requested!r} did not take effect: {what} quantized "
        f"({census.describe_unquantized()} stay in full precision; bitsandbytes replaces only layers of type "
        "torch.nn.Linear and Conv1D). Training would need the memory of an unquantized model. Set "
        "model.allow_unquantized = true to train anyway (summary.json records the effective quantization), "
        "or model.quantization = 'none' to ask for full precision")


def check_cpu_kernel_shapes(model, requested: str, device) -> None:
    """Refuse 4-bit layers that bitsandbytes' CPU kernel cannot pack (output size not a multiple of 32)."""
    if requested != "nf4" or device.type != "cpu":
        return
    bad = [f"{name} ({module.in_features} -> {module.out_features})" for name, module in model.named_modules()
           if type(module).__name__ == QUANTIZED_TYPES["nf4"]
           and (module.out_features % CPU_NF4_OUT_MULTIPLE or module.in_features % 2)]
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise QuantizationError(
            f"bitsandbytes' NF4 kernel on the CPU needs every 4-bit layer's output size to be a multiple of "
            f"{CPU_NF4_OUT_MULTIPLE} (and its input size even); this base has {len(bad)} that are not: {shown}. "
            "Run on a CUDA GPU (model.device), or set model.quantization = 'int8' or 'none'")


def keep_training_kernel(model) -> None:
    """Keep every 4-bit layer on the kernel that back-propagates.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit layer's weights for a faster
    inference kernel the first time the layer runs in eval mode on an input without gradients,
    and keeps them that way. That kernel has no backward: every later training step of the same
    model gets silently wrong gradients (each LoRA layer's gradient misses the path back through
    the frozen 4-bit weights after it). fedft evaluates and trains one cached model in a process
    (round 0's held-out scores before a centralized run, the stage scores before DPO), so the
    repacking is switched off; scores then also come from the same kernel on every CPU.
    """
    for module in model.modules():
        if type(module).__name__ == QUANTIZED_TYPES["nf4"]:
            module.support_avx512bf16_for_cpu = False


def restore_conv1d_layers(model, architecture) -> list[str]:
    """Turn dequantized ``nn.Linear`` layers back into the ``Conv1D`` layers ``architecture`` has.

    bitsandbytes quantizes GPT-2-style ``Conv1D`` (weight [in, out]) as a linear layer
    (weight [out, in]); dequantizing gives an ``nn.Linear``, whose weights a checkpoint of the
    original architecture would load transposed or not at all. ``architecture`` is the same
    model class built on the meta device. Returns the names of the layers restored.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    originals = {name: module for name, module in architecture.named_modules() if isinstance(module, Conv1D)}
    restored = []
    for name, module in list(model.named_modules()):
        if name in originals and type(module) is torch.nn.Linear:
            layer = Conv1D(module.out_features, module.in_features)
            layer.weight = torch.nn.Parameter(module.weight.detach().t().contiguous())
            if module.bias is not None:
                layer.bias = torch.nn.Parameter(module.bias.detach().clone())
            else:  # pragma: no cover - GPT-2's Conv1D always has a bias
                layer.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype))
            model.set_submodule(name, layer.to(module.weight.device))
            restored.append(name)
    return restored
