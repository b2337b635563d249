"""The demo's forgetting probe: held-out generic text of the kind the demo base was pretrained on.

``demo_general_texts`` draws ``pretraining_text`` lines the base never saw;
``write_demo_general_text`` writes them as ``{"text": ...}`` JSON lines
(simulations/data/demo/general.jsonl, named by the demo configs' ``report.general_text``).
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
