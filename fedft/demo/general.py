"""Evaluate every stage of a run (base, local, centralized, federated, DPO) on the same held-out data.

For each model state, ``evaluate_stages`` measures: answer loss and perplexity (exp of the
mean answer-token loss) on the held-out SFT set; exact match overall, per task and, when
the training data says which institution mostly holds which task, per institution;
preference accuracy and mean reward margin of DPO's implicit reward against one reference
for all stages (the run's federated or centralized SFT adapter, the DPO reference, which
so scores 50%; the base model when there is neither) and the reference-free likelihood
accuracy (``fedft.dpo.preference_scores``); a forgetting probe (perplexity on general
text the base model knew); and a few generated samples. The result is written atomically
to ``RUN_DIR/evaluation.json``. ``evaluate_run`` does the same from a finished run's files.
A state of ``None`` is the base model: the seeded initial adapter, whose B = 0 makes it
compute exactly the base (as summary.json's "base" entry does). Weights are never trained
here, and the model's adapter is restored afterwards. Nothing here imports flwr.

At the end of a run loop (``state`` / ``dpo_state``: adapter tensors held in memory)::

    inputs = stage_inputs(cfg, tokenizer)
    sources = inputs.pop("sources")
    evaluate_stages(cfg, {"base": None, "federated": state, "dpo": dpo_state}, out_dir=run_dir, **inputs)
"""

from __future__ import annotations

import json
from pathlib import Path
# The demo base (``fedft.demo.build_base_model(seed=0)``) pretrained on pretraining_text(20000, seed=1).
DEMO_PRETRAIN_LINES, DEMO_PRETRAIN_SEED = 20000, 1
GENERAL_TEXT_SEED = 1001  # never used to train the demo base


# ---------------------------------------------------------------------------------------
# Inputs from files
# ---------------------------------------------------------------------------------------

def demo_general_texts(num_lines: int = 200, seed: int = GENERAL_TEXT_SEED) -> list[str]:
    """Held-out generic text of the demo base's kind: ``pretraining_text`` lines it never saw."""
    from fedft.demo.base import pretraining_text

    if seed == DEMO_PRETRAIN_SEED:
        raise ValueError(f"seed {seed} is the demo base's pretraining seed; the probe must be held out")
    seen = set(pretraining_text(DEMO_PRETRAIN_LINES, DEMO_PRETRAIN_SEED))
    out: list[str] = []
    for line in pretraining_text(num_lines * 20, seed):
        if line not in seen and line not in out:
            out.append(line)
            if len(out) == num_lines:
                return out
    raise ValueError(f"could not draw {num_lines} unseen general lines")  # pragma: no cover


def write_demo_general_text(path: Path, num_lines: int = 200) -> Path:
    """Write the demo's forgetting probe as ``{"text": ...}`` JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in demo_general_texts(num_lines)))
    return path
