"""The GPU check (simulations/gpu_check.py): its dry run prints every figure with numbers; its verdicts judge them."""

from __future__ import annotations

import json
import re

import pytest

from simulations import gpu_check, gpu_check_measure

FIGURES = ("tokens/s fedft", "tokens/s peft", "ratio fedft/peft", "memory estimate GiB", "DP-SGD step s",
           "non-DP step s", "DP-SGD step ratio")
GPU_ONLY = ("memory peak GiB (fedft)", "memory peak GiB (peft)", "memory peak/estimate")
NUMBER = r"(\d+\.\d+)"


@pytest.mark.slow  # starts Ray (the 2-client simulation); 40 to 90 s on 2 CPU cores
def test_dry_run_prints_every_figure_with_numbers_and_writes_them_as_json(tmp_path, capsys):
    out = tmp_path / "gpu-check.json"
    code = gpu_check.main(["--dry-run", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    for label in FIGURES:
        assert re.search(rf"^{re.escape(label)}\s+{NUMBER}\s+{NUMBER}$", text, re.M), (label, text)
    for label in GPU_ONLY:
        assert re.search(rf"^{re.escape(label)}\s+n/a \(no CUDA\)\s+n/a \(no CUDA\)$", text, re.M), label
    sim = re.search(rf"^simulation result: 2 rounds x 2 clients in {NUMBER} s .*train loss {NUMBER}, "
                    rf"eval loss {NUMBER}$", text, re.M)
    assert sim, text
    for name in ("throughput", "memory", "dp_sgd", "simulation"):
        assert re.search(rf"^verdict {name}:", text, re.M), name
    assert re.search(r"^verdict simulation:\s+OK ", text, re.M)

    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["simulation"]["rounds"] == 2
    for key, model in report["models"].items():
        assert model["errors"] == {}, model["errors"]
        fedft, peft, dp = model["fedft"], model["peft"], model["dp_sgd"]
        assert fedft["tokens_per_s"] > 0 and peft["tokens_per_s"] > 0 and dp["tokens_per_s"] > 0
        assert dp["non_dp_tokens_per_s"] / dp["tokens_per_s"] == pytest.approx(dp["per_token_ratio"])
        assert dp["blocker"] is None and dp["noise_generator"] == "fedft secure_generator()"
        assert model["estimate_gib"]["total"] > 0
    # the printed ratio is the JSON's tokens/s divided, per model, in the order of --models
    printed = re.search(rf"^ratio fedft/peft\s+{NUMBER}\s+{NUMBER}$", text, re.M).groups()
    for value, key in zip(printed, ("1b", "8b")):
        m = report["models"][key]
        assert float(value) == pytest.approx(m["fedft"]["tokens_per_s"] / m["peft"]["tokens_per_s"], abs=1e-3)


def test_the_tiny_models_are_the_published_families_in_miniature():
    for key, tiny in gpu_check.DRY_TARGETS.items():
        real = gpu_check.GPU_TARGETS[key].shape
        assert tiny.shape.tied_embeddings == real.tied_embeddings
        assert tiny.shape.kv_heads < tiny.shape.heads and real.kv_heads < real.heads  # grouped-query attention
        assert tiny.shape.vocab == len(gpu_check.build_char_tokenizer())
        widths = {w for pair in tiny.shape.linear_shapes() for w in pair}
        assert all(w % 64 == 0 for w in widths), widths  # bitsandbytes' NF4 CPU kernel
    assert gpu_check.GPU_TARGETS["1b"].shape.hidden == 2048 and gpu_check.GPU_TARGETS["8b"].shape.layers == 32


def test_token_counting_examples_count_what_a_loop_takes():
    examples = gpu_check_measure.random_examples(gpu_check.DRY_TARGETS["1b"], count=5)
    counted = gpu_check_measure.TokenCountingExamples(examples)
    assert len(counted) == 5 and all(len(e.input_ids) == 64 for e in examples)
    taken = [counted[i] for i in (0, 3)]
    assert counted.tokens == 128 and taken == [examples[0], examples[3]]
    assert max(max(e.input_ids) for e in examples) < gpu_check.DRY_TARGETS["1b"].shape.vocab


def _model(fedft_tps, peft_tps, peak=None, blocker=None, dp_ratio=2.0):
    return {"fedft": {"tokens_per_s": fedft_tps, "peak_gib": peak}, "peft": {"tokens_per_s": peft_tps},
            "estimate_gib": {"total": 10.0}, "errors": {},
            "dp_sgd": {"per_token_ratio": dp_ratio, "blocker": blocker}}


def test_verdicts_flag_a_slow_loop_a_blocked_dp_step_and_a_failed_simulation():
    found = gpu_check.verdicts({"1b": _model(95.0, 100.0, peak=9.0),
                                "8b": _model(80.0, 100.0, peak=12.0, blocker="generator on cpu")},
                               None, "fedft simulate failed (exit code 1)", on_gpu=True)
    assert found["throughput"].startswith("SLOW") and "0.95x / 0.80x" in found["throughput"]
    assert found["memory"].startswith("OVER") and "0.90x / 1.20x of the estimate" in found["memory"]
    assert found["dp_sgd"].startswith("BLOCKED") and "generator on cpu" in found["dp_sgd"]
    assert found["simulation"] == "FAILED  fedft simulate failed (exit code 1)"
    ok = gpu_check.verdicts({"1b": _model(99.0, 100.0, peak=10.0)}, {"rounds": 2, "clients": 2, "wall_s": 1.0,
                                                          "run_wall_s": 1.0, "train_loss": 1.0, "eval_loss": 2.0},
                            None, on_gpu=True)
    assert all(ok[name].startswith("OK") for name in ("throughput", "memory", "dp_sgd", "simulation")), ok
    failed = gpu_check.verdicts({"1b": {**_model(None, 100.0), "dp_sgd": None}}, None, None, on_gpu=False)
    assert failed["throughput"].startswith("FAILED") and failed["dp_sgd"].startswith("FAILED")
    assert failed["memory"].startswith("n/a (no CUDA)") and failed["simulation"] == "SKIPPED"


def test_arguments_are_checked(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--dry-run", "--models", "1b,70b"])
    assert "--models 70b: choose from 1b, 8b" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--dry-run", "--warmup", "0"])
    assert gpu_check.parse_args(["--dry-run", "--models", " 8B "]).models == ["8b"]


def test_a_noise_generator_failing_on_the_device_is_a_blocker_and_the_step_is_still_timed(tmp_path, monkeypatch):
    import torch

    target = gpu_check.DRY_TARGETS["1b"]
    model_dir = gpu_check.build_random_model(target.shape, tmp_path / "1b", torch.device("cpu"), torch.float32)
    config = gpu_check.write_check_setup(tmp_path, model_dir, dry_run=True)
    cfg = gpu_check_measure.load_config(config, [f"train.batch_size={target.batch}"])
    cpu_only = object()  # stands for a CPU generator handed to noise on CUDA tensors
    real = gpu_check_measure.train_local_dp
    used = []

    def train_local_dp(*args, noise_generator, **kwargs):
        if noise_generator is cpu_only:
            raise RuntimeError("Expected a 'cuda' device type for generator but found 'cpu'")
        used.append(noise_generator)
        return real(*args, noise_generator=noise_generator, **kwargs)

    monkeypatch.setattr(gpu_check_measure, "secure_generator", lambda: cpu_only)
    monkeypatch.setattr(gpu_check_measure, "train_local_dp", train_local_dp)
    try:
        dp = gpu_check_measure.measure_dp(cfg, gpu_check_measure.random_examples(target, 8 * target.batch), target)
    finally:
        gpu_check_measure.release_memory()
    assert "secure_generator()" in dp["blocker"] and "found 'cpu'" in dp["blocker"]
    assert dp["noise_generator"] == "torch.Generator(device='cpu') (workaround)"
    assert len(used) == 2 and all(isinstance(g, torch.Generator) for g in used)  # warm-up and timed rounds
    assert dp["step_s"] > 0 and dp["per_token_ratio"] > 0
    found = gpu_check.verdicts({"1b": {**_model(1.0, 1.0), "dp_sgd": dp}}, None, None, on_gpu=False)
    assert found["dp_sgd"].startswith("BLOCKED")
