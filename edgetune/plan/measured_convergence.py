"""Figures measured by bench/convergence.py (``python bench/convergence.py --ladder``; do not edit).

Source: bench/results/convergence.json (the table: bench/results/convergence.md), 38 runs, last written 2026-12-04.
Backprop: per optimizer, means over the tasks it shares with AdamW, each at its best rate (default variant).
Zeroth-order: per optimizer, its best rate's final held-out figures at the forward budget on each task it ran.
tests/plan/test_ladder_evidence.py checks that these equal what the committed results give.
"""

from typing import Any

BACKPROP: dict[str, dict[str, Any]] = {
    "adafish": {
        "loss_vs_adamw": 0.0936,
        "state_vs_adamw": 0.511,
        "step_time_vs_adamw": 1.011,
        "steps": 100,
        "steps_to_adamw_loss": (None, None, None),
        "tasks": ("instruct", "sentiment", "text"),
        "wall_loss_vs_adamw": 0.0911,
    },
    "adamw": {
        "loss_vs_adamw": 0.0,
        "state_vs_adamw": 1.0,
        "step_time_vs_adamw": 1.0,
        "steps": 100,
        "steps_to_adamw_loss": (100, 20, 100),
        "tasks": ("instruct", "sentiment", "text"),
        "wall_loss_vs_adamw": 0.0,
    },
    "loraplus": {
        "loss_vs_adamw": -0.0194,
        "state_vs_adamw": 1.0,
        "step_time_vs_adamw": 1.055,
        "steps": 100,
        "steps_to_adamw_loss": (100, 90),
        "tasks": ("instruct", "text"),
        "wall_loss_vs_adamw": -0.0137,
    },
    "scaled-adamw": {
        "loss_vs_adamw": 0.0038,
        "state_vs_adamw": 1.0,
        "step_time_vs_adamw": 1.07,
        "steps": 100,
        "steps_to_adamw_loss": (100, None),
        "tasks": ("instruct", "text"),
        "wall_loss_vs_adamw": 0.0097,
    },
}
ZEROTH_ORDER: dict[str, dict[str, dict[str, Any]]] = {
    "fzoo": {
        "sentiment": {"accuracy": 0.7552, "forwards": 999, "loss": 0.523, "lr": 1e-05, "seconds": 619.3, "seeds": 3}
    },
    "hizoo": {
        "sentiment": {"accuracy": 0.7031, "forwards": 999, "loss": 0.6287, "lr": 0.0003, "seconds": 608.6, "seeds": 1}
    },
    "mezo": {
        "sentiment": {"accuracy": 0.7031, "forwards": 1000, "loss": 0.6091, "lr": 0.0003, "seconds": 591.6, "seeds": 3}
    },
}
