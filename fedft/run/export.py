"""Export a finished run: its adapter in PEFT format, or one merged standalone model.

``export_run`` reads RUN_DIR/summary.json (the resolved config names the base model and how
training quantized it) and the chosen stage's adapter (``sft``: RUN_DIR/adapter, ``dpo``:
RUN_DIR/dpo/adapter). Without ``merge`` it writes that adapter, the tokenizer and
``fedft-export.json``. With ``merge`` it rebuilds the base exactly as training loaded it,
dequantizes a 4-bit / 8-bit base to the float32 weights training computed with (the
adapter learned to correct *those*, not the original checkpoint), merges the adapter in
float32 and only then casts to the requested dtype; the result loads with plain
``AutoModelForCausalLM.from_pretrained`` (no fedft, no custom code). The output directory
appears in one rename or not at all. Nothing here trains.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from fedft.config import FedftConfig
from fedft.rundir import (
    ADAPTER_CONFIG,
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    DPO_ADAPTER_DIR,
    RunDirError,
    atomic_directory,
    atomic_write_json,
    load_run_config,
)

STAGE_DIRS = {"sft": Path(ADAPTER_DIR), "dpo": Path(DPO_ADAPTER_DIR)}
EXPORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
METADATA_FILE = "fedft-export.json"


class ExportError(RunDirError):
    """A run directory, stage or output directory cannot be exported; the message says why."""


def choose_stage(run_dir: Path, stage: str | None) -> str:
    """``stage`` if given, else ``dpo`` when the run has RUN_DIR/dpo/adapter, else ``sft``."""
    if stage is None:
        return "dpo" if (Path(run_dir) / STAGE_DIRS["dpo"]).exists() else "sft"
    if stage not in STAGE_DIRS:
        raise ExportError(f"stage {stage!r} is unknown; expected one of {', '.join(STAGE_DIRS)}")
    return stage


def stage_adapter_dir(run_dir: Path, stage: str) -> Path:
    """The PEFT adapter directory of ``stage``; an error names what is missing."""
    path = Path(run_dir) / STAGE_DIRS[stage]
    if not path.is_dir():
        raise ExportError(f"{path} does not exist: run {run_dir} has no {stage} adapter")
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (path / name).is_file()]
    if missing:
        hint = ""
        if any(p.name.startswith("client") for p in path.iterdir()):
            hint = (" (a local-only baseline keeps one adapter per client in clientN/; "
                    "there is no single adapter to export)")
        raise ExportError(f"{path} is not a complete PEFT adapter: no {', '.join(missing)}{hint}")
    return path


def check_out_dir(out: Path) -> None:
    """Refuse an output path that exists and is a file or a non-empty directory."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not an empty directory; "
                          "choose a new --out or remove it first")


def export_metadata(run_dir: Path, stage: str, cfg: FedftConfig, *, merged: bool, dtype: str) -> dict:
    """The small readable record written beside the export as fedft-export.json."""
    import peft
    import torch
    import transformers

    return {
        "format": "merged-model" if merged else "peft-adapter",
        "run_dir": str(Path(run_dir).resolve()),
        "stage": stage,
        "adapter_source": str((Path(run_dir) / STAGE_DIRS[stage]).resolve()),
        "base_model": cfg.model.path,
        "base_model_path": cfg.model_path,
        "training_quantization": {
            "quantization": cfg.model.quantization,
            "double_quant": cfg.model.double_quant,
            "compute_dtype": cfg.model.compute_dtype,
        },
        "merged_into": (None if not merged else "float32 base" if cfg.model.quantization == "none"
                        else f"{cfg.model.quantization} base dequantized to float32"),
        "dtype": EXPORT_DTYPES[dtype],
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }


def write_adapter_copy(src: Path, dst: Path, dtype: str) -> None:
    """Copy a PEFT adapter directory, its tensors cast to ``dtype`` (float32 keeps them exact)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fedft.model.load import DTYPES

    for item in src.iterdir():
        if item.is_file() and item.name != ADAPTER_WEIGHTS:
            shutil.copy2(item, dst / item.name)
    target = DTYPES[EXPORT_DTYPES[dtype]]
    with safe_open(src / ADAPTER_WEIGHTS, framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors = {k: v.to(target) if torch.is_floating_point(v) else v for k, v in tensors.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / ADAPTER_WEIGHTS, metadata=metadata)


def load_training_base_fp32(cfg: FedftConfig, device: str = "cpu",
                            progress: Callable[[str], None] = print):
    """The base as training loaded it (same quantization, same dtype), as float32 weights.

    A quantized base is dequantized: every 4-bit (or 8-bit) linear layer becomes an
    ``nn.Linear`` holding exactly the weights the quantized forward computes with, and the
    quantization config is removed, so ``save_pretrained`` writes a plain checkpoint. A base
    in which bitsandbytes quantized nothing (trained with ``model.allow_unquantized``) is
    loaded in full precision, as training computed with it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from fedft.model.load import DTYPES, quantization_config, resolve_device
    from fedft.model.quantization import quantization_census

    path = cfg.model_path
    if Path(path).is_absolute() and not Path(path).exists():
        raise ExportError(f"the run's base model {path} (model.path) does not exist on this machine")
    quant = quantization_config(cfg.model)

    def load(quantization):
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quantization, dtype=DTYPES[cfg.model.compute_dtype],
            device_map={"": resolve_device(device)}, trust_remote_code=cfg.model.trust_remote_code)

    progress(f"loading base {cfg.model.path} ({cfg.model.quantization}, {cfg.model.compute_dtype}, as in training)")
    model = load(quant)
    if quant is not None:
        census = quantization_census(model, cfg.model.quantization)
        if not census.quantized_layers:
            progress(f"bitsandbytes quantized none of its layers ({census.describe_unquantized()}): "
                     "merging into the full-precision base training used")
            model = load(None)
        else:
            progress(f"dequantizing the {cfg.model.quantization} weights to float32")
            model = model.dequantize(dtype=torch.float32)
    model = model.to(torch.float32)
    if getattr(model.config, "quantization_config", None) is not None:  # pragma: no cover - defensive
        raise ExportError("the base model still carries a quantization config after dequantizing")
    return model


def probe_ids(tokenizer, vocab_size: int) -> list[int]:
    """A few token ids to compare logits on: a short sentence, or the first ids of the vocabulary."""
    ids = tokenizer("The answer is 42, as the report says.", add_special_tokens=False)["input_ids"][:16]
    return [i for i in ids if i < vocab_size] or list(range(min(8, vocab_size)))


MERGE_TOLERANCE = {"fp32": 1e-3, "bf16": 0.1, "fp16": 0.05}  # max |logit difference| / max |logit|


def merged_model(cfg: FedftConfig, adapter: Path, tokenizer, device: str, progress: Callable[[str], None]):
    """(merged float32 model, probe ids, the unmerged base + adapter's logits on them)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = load_training_base_fp32(cfg, device, progress)
    with torch.device("meta"):
        architecture = AutoModelForCausalLM.from_config(base.config, trust_remote_code=cfg.model.trust_remote_code)
    model = PeftModel.from_pretrained(base, adapter)
    ids = probe_ids(tokenizer, base.config.get_text_config().vocab_size)
    with torch.no_grad():
        reference = model(torch.tensor([ids], device=base.device)).logits.float().cpu()
    model = model.merge_and_unload(safe_merge=True)
    from fedft.model.quantization import restore_conv1d_layers

    restored = restore_conv1d_layers(model, architecture)
    if restored:
        progress(f"restored {len(restored)} Conv1D layers to their checkpoint layout (weight [in, out])")
    return model, ids, reference


def check_merged_export(directory: Path, ids: list[int], reference, dtype: str,
                        trust_remote_code: bool = False) -> float:
    """Reload the saved merged model as any user would and compare its logits with ``reference``.

    Returns the relative difference (max |difference| / max |reference logit|); raises
    ``ExportError`` above ``MERGE_TOLERANCE[dtype]``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                        trust_remote_code=trust_remote_code)
    except Exception as err:  # the saved layout does not fit the architecture
        raise ExportError(f"the merged model does not load back ({type(err).__name__}: {err}); nothing was "
                          "written") from err
    with torch.no_grad():
        logits = reloaded(torch.tensor([ids])).logits.float()
    difference = float((logits - reference).abs().max() / reference.abs().max().clamp_min(1e-6))
    if not difference <= MERGE_TOLERANCE[dtype]:
        raise ExportError(f"the merged model reloaded gives logits {difference:.2e} (relative) away from the "
                          f"base + adapter it was merged from (allowed {MERGE_TOLERANCE[dtype]:.0e} in {dtype}); "
                          "nothing was written")
    return difference


def export_run(run_dir: Path, out: Path, *, merge: bool = False, dtype: str = "fp32",
               stage: str | None = None, device: str = "cpu",
               progress: Callable[[str], None] = print) -> Path:
    """Export ``run_dir``'s adapter (or, with ``merge``, one merged model) to ``out``.

    ``dtype`` (fp32 | bf16 | fp16) is the dtype of the written tensors; merging itself is
    always done in float32. ``out`` must not exist or be empty; it appears in one rename.
    """
    run_dir, out = Path(run_dir), Path(out)
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype {dtype!r} is unknown; expected one of {', '.join(EXPORT_DTYPES)}")
    check_out_dir(out)
    cfg = load_run_config(run_dir)
    stage = choose_stage(run_dir, stage)
    adapter = stage_adapter_dir(run_dir, stage)
    metadata = export_metadata(run_dir, stage, cfg, merged=merge, dtype=dtype)

    from fedft.model.load import DTYPES, load_tokenizer, model_spec

    tokenizer = load_tokenizer(model_spec(cfg))
    with atomic_directory(out) as tmp:
        if merge:
            model, ids, reference = merged_model(cfg, adapter, tokenizer, device, progress)
            progress(f"merged the {stage} adapter in float32; saving as {EXPORT_DTYPES[dtype]}")
            model = model.to(DTYPES[EXPORT_DTYPES[dtype]])
            model.save_pretrained(tmp)
            del model
            metadata["reload_check"] = {"relative_logit_difference": check_merged_export(tmp, ids, reference, dtype,
                                                                                    cfg.model.trust_remote_code),
                                        "tolerance": MERGE_TOLERANCE[dtype], "tokens": len(ids)}
            difference = metadata["reload_check"]["relative_logit_difference"]
            progress(f"reloaded the merged model: logits within {difference:.1e} "
                     "(relative) of the base + adapter")
        else:
            progress(f"copying the {stage} adapter ({adapter})")
            write_adapter_copy(adapter, tmp, dtype)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / METADATA_FILE, metadata)
        check_out_dir(out)  # someone may have filled it meanwhile; atomic_directory would replace it
    progress(f"exported {'merged model' if merge else 'adapter'} ({stage}, {EXPORT_DTYPES[dtype]}) to {out}")
    return out


def read_export_metadata(out: Path) -> dict:
    """The fedft-export.json of an export directory."""
    return json.loads((Path(out) / METADATA_FILE).read_text())
