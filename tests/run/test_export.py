"""fedft export: the adapter alone (PEFT) or one merged model that reproduces the trained model.

The reference is the training-time model itself: the NF4 base with the adapter, built by
``fedft.model.load_peft_model``, in train mode (LoRA dropout 0, so deterministic). Train
mode matters on CPU: in eval mode without gradients bitsandbytes repacks NF4 weights for a
bf16 kernel on AVX512-BF16 machines, a different computation (~3e-3 off on these logits)
from the float32 dequantize-and-matmul that training used.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fedft.config import config_to_dict, load_config
from fedft.model.adapter import get_adapter_state, save_adapter, set_adapter_state
from fedft.model.load import load_peft_model, model_spec
from fedft.run.export import METADATA_FILE, ExportError, export_run, read_export_metadata
from fedft.rundir import atomic_write_json
from simulations.commands import main
from tests.conftest import write_tiny_setup

# Measured max |merged - training model| on these logits: ~3e-6 (float32 rounding of W + BA).
LOGIT_ATOL = 1e-4


def _random_adapter(model, seed: int) -> dict[str, torch.Tensor]:
    """A nonzero adapter (B != 0) large enough to move the logits visibly."""
    gen = torch.Generator().manual_seed(seed)
    return {k: 0.2 * torch.randn(v.shape, generator=gen) for k, v in get_adapter_state(model).items()}


def _write_run(run_dir, cfg, model, state, dpo_state=None):
    save_adapter(model, state, run_dir / "adapter")
    if dpo_state is not None:
        save_adapter(model, dpo_state, run_dir / "dpo" / "adapter")
    atomic_write_json(run_dir / "summary.json", {"config": config_to_dict(cfg)})
    return run_dir


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A finished-run directory with a perturbed adapter, and the training-time model's logits."""
    root = tmp_path_factory.mktemp("export")
    cfg = load_config(write_tiny_setup(root, tiny_model_dir))
    model = load_peft_model(model_spec(cfg))
    model.train()
    state, dpo_state = _random_adapter(model, 1), _random_adapter(model, 2)
    run = _write_run(root / "run", cfg, model, state)
    ids = torch.randint(3, 90, (3, 16), generator=torch.Generator().manual_seed(3))
    reference = _logits(model, ids)
    with model.disable_adapter():
        base = _logits(model, ids)
    dpo_run = _write_run(root / "run-dpo", cfg, model, state, dpo_state)
    set_adapter_state(model, state)
    return {"cfg": cfg, "model": model, "run": run, "dpo_run": dpo_run, "state": state,
            "dpo_state": dpo_state, "ids": ids, "reference": reference, "base": base, "root": root}


@pytest.fixture(scope="module")
def merged_dir(trained):
    out = trained["root"] / "merged"
    messages = []
    export_run(trained["run"], out, merge=True, progress=messages.append)
    assert any("dequantizing the nf4 weights" in m for m in messages)
    return out


def test_merged_model_reproduces_the_training_model(trained, merged_dir):
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    logits = _logits(merged, trained["ids"])
    diff = (logits - trained["reference"]).abs().max().item()
    assert diff < LOGIT_ATOL, f"merged model is {diff:.2e} off the training-time model"
    # the adapter really is in the weights: without it the logits are far away
    assert (logits - trained["base"]).abs().max().item() > 100 * LOGIT_ATOL


def test_merged_dir_is_a_plain_checkpoint(trained, merged_dir):
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config and "auto_map" not in config
    assert config["dtype"] == "float32"
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert not list(merged_dir.glob("*.py")) and not (merged_dir / "adapter_config.json").exists()
    meta = read_export_metadata(merged_dir)
    assert meta["format"] == "merged-model" and meta["stage"] == "sft" and meta["dtype"] == "float32"
    assert meta["training_quantization"]["quantization"] == "nf4"
    assert meta["merged_into"] == "nf4 base dequantized to float32"
    assert not [p for p in merged_dir.parent.iterdir() if p.name.startswith(".merged")]


def test_merged_model_loads_without_fedft(trained, merged_dir, tmp_path):
    script = (
        "import sys, json, torch; sys.modules['fedft'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"out = {str(merged_dir)!r}\n"
        "model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)\n"
        "tokenizer = AutoTokenizer.from_pretrained(out)\n"
        f"ids = torch.tensor({trained['ids'].tolist()})\n"
        "with torch.no_grad(): logits = model(input_ids=ids).logits\n"
        "try:\n    import fedft\n    print('FEDFT IMPORTED')\nexcept ImportError:\n    pass\n"
        "print(json.dumps({'logits': logits[:, -1].tolist(), 'pad': tokenizer.pad_token}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FEDFT IMPORTED" not in proc.stdout
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    last = torch.tensor(result["logits"])
    assert (last - trained["reference"][:, -1]).abs().max().item() < LOGIT_ATOL
    assert result["pad"] is not None


def test_adapter_export_loads_with_peft_and_gives_the_same_logits(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedft.model.load import DTYPES, quantization_config

    cfg, out = trained["cfg"], trained["root"] / "adapter-only"
    export_run(trained["run"], out, progress=lambda _: None)
    assert (out / "adapter_config.json").is_file() and (out / "tokenizer.json").is_file()
    meta = read_export_metadata(out)
    assert meta["format"] == "peft-adapter" and meta["stage"] == "sft"
    assert meta["base_model_path"] == cfg.model_path and meta["merged_into"] is None
    base = AutoModelForCausalLM.from_pretrained(
        cfg.model_path, quantization_config=quantization_config(cfg.model),
        dtype=DTYPES[cfg.model.compute_dtype], device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, out)
    loaded = get_adapter_state(model)
    assert loaded.keys() == trained["state"].keys()
    assert all(torch.equal(loaded[k], trained["state"][k]) for k in loaded)
    model.train()
    diff = (_logits(model, trained["ids"]) - trained["reference"]).abs().max().item()
    assert diff < LOGIT_ATOL


def test_default_stage_is_dpo_when_the_run_has_one(trained, tmp_path):
    from safetensors.torch import load_file

    export_run(trained["dpo_run"], tmp_path / "dpo", progress=lambda _: None)
    export_run(trained["dpo_run"], tmp_path / "sft", stage="sft", progress=lambda _: None)
    assert read_export_metadata(tmp_path / "dpo")["stage"] == "dpo"
    assert read_export_metadata(tmp_path / "sft")["stage"] == "sft"
    for stage, key in (("dpo", "dpo_state"), ("sft", "state")):
        tensors = load_file(tmp_path / stage / "adapter_model.safetensors")
        assert tensors.keys() == trained[key].keys()
        assert all(torch.equal(tensors[k], trained[key][k]) for k in tensors)


def test_cli_merge_in_bfloat16(trained, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    assert main(["export", str(trained["run"]), "--out", str(out), "--merge", "--dtype", "bf16"]) == 0
    assert "exported merged model" in capsys.readouterr().out
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    diff = (_logits(model, trained["ids"]) - trained["reference"]).abs().max().item()
    assert diff < 0.05  # bfloat16 rounding of the merged weights, nothing worse


def test_unquantized_run_merges_into_the_float32_base(trained, tmp_path):
    import dataclasses

    from transformers import AutoModelForCausalLM

    cfg = trained["cfg"]
    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantization="none"))
    model = load_peft_model(model_spec(plain))
    model.train()
    run = _write_run(tmp_path / "run", plain, model, trained["state"])
    export_run(run, tmp_path / "merged", merge=True, progress=lambda _: None)
    assert read_export_metadata(tmp_path / "merged")["merged_into"] == "float32 base"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    diff = (_logits(merged, trained["ids"]) - _logits(model, trained["ids"])).abs().max().item()
    assert diff < LOGIT_ATOL


def test_refuses_a_non_empty_out_dir_and_leaves_it_alone(trained, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(trained["run"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"fedft: error: {out} already exists and is not an empty directory" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no temp dir left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    export_run(trained["run"], empty, progress=lambda _: None)  # an empty directory is fine
    assert (empty / METADATA_FILE).is_file()


def test_missing_stage_and_missing_summary_name_the_path(trained, tmp_path, capsys):
    assert main(["export", str(trained["run"]), "--out", str(tmp_path / "x"), "--stage", "dpo"]) == 2
    err = capsys.readouterr().err
    assert f"{trained['run'] / 'dpo' / 'adapter'} does not exist" in err and "no dpo adapter" in err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert f"{tmp_path / 'summary.json'} does not exist" in capsys.readouterr().err
    partial = tmp_path / "partial"
    (partial / "adapter").mkdir(parents=True)
    (partial / "summary.json").write_text((trained["run"] / "summary.json").read_text())
    with pytest.raises(ExportError, match="no adapter_config.json, adapter_model.safetensors"):
        export_run(partial, tmp_path / "y", progress=lambda _: None)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
