"""The GPU check's table, verdicts and header (``simulations.gpu_check``): pure text from its results."""

from __future__ import annotations

import math

NA = "n/a (no CUDA)"
MIN_THROUGHPUT_RATIO = 0.9  # fedft's loop may be at most 10% slower than plain peft


def number(value, digits: int = 2, na: bool = False) -> str:
    """A cell: the value; "n/a (no CUDA)" for a GPU-only figure measured on the CPU (``na``), else "failed"."""
    if value is None:
        return NA if na else "failed"
    return f"{value:.{digits}f}"


def get(result: dict, section: str, key: str):
    part = result.get(section)
    return None if part is None else part.get(key)


def ratio(a, b):
    return a / b if a is not None and b else None


def figure_rows(results: dict, on_gpu: bool) -> list[tuple[str, list[str]]]:
    """(label, one cell per model) for the table; the labels are what a reader (and the test) looks for."""
    models = list(results.values())

    def row(label, values, digits=2, gpu_only=False):
        return label, [number(v, digits, gpu_only and not on_gpu) for v in values]

    return [
        row("tokens/s fedft", [get(m, "fedft", "tokens_per_s") for m in models], 1),
        row("tokens/s peft", [get(m, "peft", "tokens_per_s") for m in models], 1),
        row("ratio fedft/peft", [ratio(get(m, "fedft", "tokens_per_s"), get(m, "peft", "tokens_per_s"))
                                 for m in models], 3),
        row("memory peak GiB (fedft)", [get(m, "fedft", "peak_gib") for m in models], 2, True),
        row("memory peak GiB (peft)", [get(m, "peft", "peak_gib") for m in models], 2, True),
        row("memory estimate GiB", [m["estimate_gib"]["total"] for m in models], 3),
        row("memory peak/estimate", [ratio(get(m, "fedft", "peak_gib"), m["estimate_gib"]["total"])
                                     for m in models], 3, True),
        row("DP-SGD step s", [get(m, "dp_sgd", "step_s") for m in models], 3),
        row("non-DP step s", [get(m, "dp_sgd", "non_dp_step_s") for m in models], 3),
        row("DP-SGD step ratio", [get(m, "dp_sgd", "per_token_ratio") for m in models], 3),
    ]


def print_table(results: dict, simulation: dict | None, sim_error: str | None, on_gpu: bool) -> None:
    rows = figure_rows(results, on_gpu)
    names = [m["model"] for m in results.values()]
    width = max(len(label) for label, _ in rows) + 2
    cells = [max([len(n)] + [len(r[1][i]) for r in rows]) + 2 for i, n in enumerate(names)]
    print("\n" + "figure".ljust(width) + "".join(n.rjust(c) for n, c in zip(names, cells)))
    for label, values in rows:
        print(label.ljust(width) + "".join(v.rjust(c) for v, c in zip(values, cells)))
    print(f"simulation result: {simulation_text(simulation, sim_error)}")


def simulation_text(simulation: dict | None, error: str | None) -> str:
    if simulation is None:
        return f"failed: {error}" if error else "skipped (--skip-simulation)"
    return (f"{simulation['rounds']} rounds x {simulation['clients']} clients in {simulation['wall_s']:.1f} s "
            f"(run {simulation['run_wall_s']:.1f} s), train loss {number(simulation['train_loss'], 3)}, "
            f"eval loss {number(simulation['eval_loss'], 3)}")


def verdicts(results: dict, simulation: dict | None, sim_error: str | None, on_gpu: bool) -> dict[str, str]:
    """One line per figure: OK / SLOW / OVER / BLOCKED / FAILED and the numbers behind it."""
    keys = list(results)
    where = "" if on_gpu else " (CPU dry run: not a GPU figure)"
    out = {}
    ratios = [ratio(get(results[k], "fedft", "tokens_per_s"), get(results[k], "peft", "tokens_per_s")) for k in keys]
    if any(r is None for r in ratios):
        out["throughput"] = "FAILED  a loop did not run (see its error above)"
    else:
        word = "OK" if min(ratios) >= MIN_THROUGHPUT_RATIO else "SLOW"
        out["throughput"] = (f"{word}  fedft at {' / '.join(f'{r:.2f}x' for r in ratios)} of plain peft "
                             f"({' / '.join(keys)}); OK at >= {MIN_THROUGHPUT_RATIO:.2f}x{where}")
    peaks = [ratio(get(results[k], "fedft", "peak_gib"), results[k]["estimate_gib"]["total"]) for k in keys]
    if not on_gpu:
        totals = " / ".join(number(results[k]["estimate_gib"]["total"], 3) for k in keys)
        out["memory"] = f"{NA}; the estimate alone: {totals} GiB ({' / '.join(keys)})"
    elif any(p is None for p in peaks):
        out["memory"] = "FAILED  fedft's loop did not run"
    else:
        word = "OK" if max(peaks) <= 1.0 else "OVER"
        out["memory"] = (f"{word}  peak at {' / '.join(f'{p:.2f}x' for p in peaks)} of the estimate "
                         f"({' / '.join(keys)}); OK when the estimate is not exceeded")
    dp = [results[k].get("dp_sgd") for k in keys]
    if any(d is None for d in dp):
        out["dp_sgd"] = "FAILED  a DP-SGD round did not run (see its error above)"
    else:
        word = "BLOCKED" if any(d["blocker"] for d in dp) else "OK"
        costs = " / ".join(f"{d['per_token_ratio']:.2f}x" for d in dp)
        blockers = "".join(f"; {d['blocker']}" for d in dp if d["blocker"])
        out["dp_sgd"] = f"{word}  a DP-SGD token costs {costs} a non-DP token ({' / '.join(keys)}){where}{blockers}"
    if simulation is None:
        out["simulation"] = f"FAILED  {sim_error}" if sim_error else "SKIPPED"
    else:
        ok = simulation["rounds"] == 2 and all(
            v is not None and math.isfinite(v) for v in (simulation["train_loss"], simulation["eval_loss"]))
        out["simulation"] = f"{'OK' if ok else 'FAILED'}  {simulation_text(simulation, None)}"
    return out


def header(targets: list, dry_run: bool) -> str:
    """What the check measures, on which device and library versions, for ``targets`` (``gpu_check.Target``)."""
    import bitsandbytes
    import peft
    import torch
    import transformers

    device = "CPU" if dry_run else torch.cuda.get_device_name(0)
    lines = [
        "fedft GPU check" + (" -- DRY RUN on the CPU: tiny models of the same family, GPU-only figures n/a"
                             if dry_run else ""),
        f"device {device}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}",
        "What it measures, per model (random weights with the published shapes, NF4 double-quant base, LoRA r=16 "
        "on all linear layers, gradient checkpointing):",
        "  tokens/s      fedft's client loop (cached_peft_model + train_local) and a plain peft + bitsandbytes "
        "loop on the same batches, and their ratio",
        "  memory        peak GPU memory of fedft's loop (torch.cuda.max_memory_allocated) against "
        "fedft.model.memory's estimate (python -m fedft.model.memory)",
        "  DP-SGD        a record-level DP-SGD round (train_local_dp) against a non-DP round on the same model, "
        "per token",
        "then: fedft simulate, 2 clients x 2 rounds on the 1B shape (Flower's Simulation Engine)",
    ]
    for target in targets:
        lines.append(f"  {target.shape.name}: batch {target.batch} x {target.seq} tokens, {target.warmup} warm-up + "
                     f"{target.steps} timed steps")
    return "\n".join(lines)
