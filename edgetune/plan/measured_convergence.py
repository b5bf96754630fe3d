"""Figures measured by bench/convergence.py (``python bench/convergence.py --ladder``; do not edit).

Source: bench/results/convergence.json (the table: bench/results/convergence.md), 7 runs, last written 2026-12-03.
Backprop: per optimizer, means over the tasks it shares with AdamW, each at its best rate (default variant).
Zeroth-order: per optimizer, its best rate's final held-out figures at the forward budget on each task it ran.
tests/plan/test_ladder_evidence.py checks that these equal what the committed results give.
"""

from typing import Any

BACKPROP: dict[str, dict[str, Any]] = {
    "adafish": {
        "loss_vs_adamw": 0.0153,
        "state_vs_adamw": 0.511,
        "step_time_vs_adamw": 1.073,
        "steps": 100,
        "steps_to_adamw_loss": (None,),
        "tasks": ("text",),
        "wall_loss_vs_adamw": 0.0118,
    },
    "adamw": {
        "loss_vs_adamw": 0.0,
        "state_vs_adamw": 1.0,
        "step_time_vs_adamw": 1.0,
        "steps": 100,
        "steps_to_adamw_loss": (100,),
        "tasks": ("text",),
        "wall_loss_vs_adamw": 0.0,
    },
}
ZEROTH_ORDER: dict[str, dict[str, dict[str, Any]]] = {
    "mezo": {
        "sentiment": {"accuracy": 0.5, "forwards": 1000, "loss": 2.7542, "lr": 0.001, "seconds": 709.0, "seeds": 1}
    }
}
