"""What runs after the last federated round: the DPO stage, the evaluation of every stage, the report.

``run_final_stages`` is called by the run loop (``fedft.run.loop``) once the trained adapter is
saved (and the run's summary.json written, so a failure here loses no federated work):
with ``dpo.enabled`` it preference-tunes the federated adapter (``fedft.align.stage``), then scores
the base, the federated SFT adapter and the DPO adapter on the same held-out data
(``fedft.eval.stages``, unless ``report.evaluate_stages`` is off). ``write_report`` then
writes RUN_DIR/report.md, report.json and the plots (``fedft.report.markdown``); ``fedft report
RUN_DIR`` rebuilds the report from the same files. Nothing here imports flwr.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from fedft.config import FedftConfig
from fedft.rundir import DPO_ADAPTER_DIR


def run_final_stages(cfg: FedftConfig, out_dir: Path, stage: str, state,
                     progress: Callable[[str], None] = print, scored: dict[str, dict] | None = None) -> dict:
    """DPO (when enabled) and the stage evaluation; returns what to add to summary.json.

    ``stage`` names the trained state: ``federated`` or ``centralized`` (one adapter, which
    DPO starts from) or ``local`` (one adapter per client: DPO has no single adapter to
    align, so it is skipped with a line saying so). ``scored`` maps a stage to the run's own
    held-out evaluation of that state (round 0 for the base, the last round for ``stage``):
    where it answered the same examples its answers and loss are reused.
    """
    from fedft.eval.inputs import run_pairs_path, stage_inputs
    from fedft.eval.stages import evaluate_stages
    from fedft.model.load import cached_peft_model, model_spec
    from fedft.rundir import write_evaluation

    out_dir = Path(out_dir)
    added: dict = {}
    stages: dict = {"base": None, stage: state}
    if cfg.dpo.enabled and isinstance(state, list):
        progress(f"dpo: skipped: a {stage} run holds {len(state)} separate adapters, no single one to align")
    elif cfg.dpo.enabled:
        from fedft.align.stage import run_dpo_stage
        from fedft.eval.inputs import load_adapter_state

        progress(f"dpo: preference-tuning the {stage} adapter (reference: the same adapter, frozen)")
        added["dpo"] = run_dpo_stage(cfg, state, out_dir, log=progress)
        stages["dpo"] = load_adapter_state(out_dir / DPO_ADAPTER_DIR)
    if cfg.report.evaluate_stages:
        started = time.time()
        _, tokenizer = cached_peft_model(model_spec(cfg))
        inputs = stage_inputs(cfg, tokenizer, pairs_file=run_pairs_path(out_dir))
        sources = inputs.pop("sources")
        progress(f"evaluating {', '.join(stages)} on the held-out data ...")
        evaluation = evaluate_stages(cfg, stages, num_samples=cfg.report.samples, progress=progress,
                                     scored=scored, **inputs)
        write_evaluation(out_dir, {**evaluation, **sources})
        added["evaluation_wall_s"] = round(time.time() - started, 2)
    return added


def write_report(out_dir: Path, progress: Callable[[str], None] = print) -> dict:
    """RUN_DIR/report.md, report.json and plots from the run's files (as ``fedft report`` does)."""
    from fedft.report.markdown import REPORT_MD, build_report

    report = build_report(Path(out_dir))
    progress(f"report: {Path(out_dir) / REPORT_MD} and {len(report['plots'])} plots")
    return report
