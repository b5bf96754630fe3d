"""Figures measured by bench/convergence.py (``python bench/convergence.py --ladder``; do not edit).

Source: bench/results/convergence.json (the table: bench/results/convergence.md), 115 runs, last written 2026-12-04.
Backprop: per optimizer, means over the tasks it shares with AdamW, each at its best rate (default variant); ``lr``
is the rate least above each task's best loss (relatively, on average) of those run on all of them: the default rate.
Zeroth-order: per optimizer, its best rate's final held-out figures at the forward budget on each task it ran.
tests/plan/test_ladder_evidence.py checks that these equal what the committed results give.
"""

from typing import Any

BACKPROP: dict[str, dict[str, Any]] = {
    "adafish": {
        "loss_vs_adamw": 0.0137,
        "lr": 0.0003,
        "state_vs_adamw": 0.511,
        "step_time_vs_adamw": 1.031,
        "steps": 100,
        "steps_to_adamw_loss": (None, 70, None),
        "tasks": ("instruct", "sentiment", "text"),
        "wall_loss_vs_adamw": 0.0195,
    },
    "adamw": {
        "loss_vs_adamw": 0.0,
        "lr": 0.001,
        "state_vs_adamw": 1.0,
        "step_time_vs_adamw": 1.0,
        "steps": 100,
        "steps_to_adamw_loss": (80, 70, 100),
        "tasks": ("instruct", "sentiment", "text"),
        "wall_loss_vs_adamw": 0.0044,
    },
    "loraplus": {
        "loss_vs_adamw": -0.0133,
        "lr": 0.0001,
        "state_vs_adamw": 1.0,
        "step_time_vs_adamw": 0.985,
        "steps": 100,
        "steps_to_adamw_loss": (100, 70, 90),
        "tasks": ("instruct", "sentiment", "text"),
        "wall_loss_vs_adamw": -0.0073,
    },
    "scaled-adamw": {
        "loss_vs_adamw": 0.0028,
        "lr": 0.0003,
        "state_vs_adamw": 1.0,
        "step_time_vs_adamw": 1.005,
        "steps": 100,
        "steps_to_adamw_loss": (100, 80, None),
        "tasks": ("instruct", "sentiment", "text"),
        "wall_loss_vs_adamw": 0.007,
    },
}
ZEROTH_ORDER: dict[str, dict[str, dict[str, Any]]] = {
    "fzoo": {
        "sentiment": {"accuracy": 0.7552, "forwards": 999, "loss": 0.523, "lr": 1e-05, "seconds": 619.3, "seeds": 3}
    },
    "hizoo": {
        "sentiment": {"accuracy": 0.6979, "forwards": 999, "loss": 0.6357, "lr": 0.0003, "seconds": 564.0, "seeds": 3}
    },
    "mezo": {
        "sentiment": {"accuracy": 0.7031, "forwards": 1000, "loss": 0.6091, "lr": 0.0003, "seconds": 591.6, "seeds": 3}
    },
}
