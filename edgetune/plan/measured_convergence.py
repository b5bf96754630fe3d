"""Figures measured by bench/convergence.py (``python bench/convergence.py --ladder``; do not edit).

Source: bench/results/convergence.json (the table: bench/results/convergence.md), 0 runs, last written never.
"""

from typing import Any

BACKPROP: dict[str, dict[str, Any]] = {}
ZEROTH_ORDER: dict[str, dict[str, dict[str, Any]]] = {}
