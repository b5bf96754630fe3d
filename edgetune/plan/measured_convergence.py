"""Figures measured by bench/convergence.py (``python bench/convergence.py --ladder``; do not edit).

Source: bench/results/convergence.json (the table: bench/results/convergence.md), 34 runs, last written 2026-12-04.
Backprop: per optimizer, means over the tasks it shares with AdamW, each at its best rate (default variant).
Zeroth-order: per optimizer, its best rate's final held-out figures at the forward budget on each task it ran.
tests/plan/test_ladder_evidence.py checks that these equal what the committed results give.
"""

from typing import Any

BACKPROP: dict[str, dict[str, Any]] = {
    "adafish": {
        "loss_vs_adamw": 0.0478,
        "state_vs_adamw": 0.511,
        "step_time_vs_adamw": 1.061,
        "steps": 100,
        "steps_to_adamw_loss": (None, None),
        "tasks": ("sentiment", "text"),
        "wall_loss_vs_adamw": 0.0441,
    },
    "adamw": {
        "loss_vs_adamw": 0.0,
        "state_vs_adamw": 1.0,
        "step_time_vs_adamw": 1.0,
        "steps": 100,
        "steps_to_adamw_loss": (20, 100),
        "tasks": ("sentiment", "text"),
        "wall_loss_vs_adamw": 0.0,
    },
    "loraplus": {
        "loss_vs_adamw": -0.0166,
        "state_vs_adamw": 1.0,
        "step_time_vs_adamw": 1.132,
        "steps": 100,
        "steps_to_adamw_loss": (90,),
        "tasks": ("text",),
        "wall_loss_vs_adamw": -0.0053,
    },
    "scaled-adamw": {
        "loss_vs_adamw": 0.0095,
        "state_vs_adamw": 1.0,
        "step_time_vs_adamw": 1.1,
        "steps": 100,
        "steps_to_adamw_loss": (None,),
        "tasks": ("text",),
        "wall_loss_vs_adamw": 0.019,
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
