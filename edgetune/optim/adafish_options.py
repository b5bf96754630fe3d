"""AdaFish's options: their types and validation, the Fisher refresh rule, the damping schedule and the state size.

The update rule that uses them is in adafish.py's module docstring. Each option is a param-group hyperparameter,
saved and restored by ``state_dict``; what each is for:
- ``power`` p ∈ [0, 1]: ½ whitens like Adam's √v (with ``shape_scale``, AdamW learning rates carry over), 1 is NG+'s
  natural gradient, whose step size the damping then sets. Other values get no shape scale; graft them.
- ``damping`` δ, relative to the Fisher's mean eigenvalue, so it does not depend on the loss scale. With
  ``damping_schedule`` "linear" or "exponential" it moves from δ_0 = ``damping`` to δ_T = ``damping_final`` over
  ``damping_steps`` steps (``relative_damping``): a large δ while the EMA holds few samples makes P ≈ λ^(−p)·I, i.e.
  momentum SGD, and the preconditioning takes over as δ falls.
- ``fisher_beta`` β_F: the Fisher EMA's rate, separate from AdamW's β2 (non-LoRA parameters and the graft keep β2).
  Bias correction by the count n of Fisher steps makes F̂ = H at the first one: a warm start from step 1, so a
  separate warm-start option would change nothing at step 1.
- ``fisher_every`` k: the Fisher is refreshed at steps 1, 1 + k, ... (``fisher_due``); in between F stays as it is.
  The hooked modes gather nothing on other steps (their hooks are disarmed), and "true" runs its extra backward only
  on Fisher steps, which divides its cost by k.
- ``inv_every``: recompute P every this many steps (one batched r x r eigh per rank). P changes between Fisher steps
  only through a damping schedule.
- ``graft`` "adamw": learning-rate grafting (Agarwal et al. 2020, arXiv:2002.11803; distributed Shampoo's "Adam
  grafting"): the preconditioner chooses each factor's direction, AdamW's update its Frobenius norm, so AdamW's
  learning rate carries over at any power and damping. It costs AdamW's second moment per factor: AdaFish's state
  then equals AdamW's plus the r x r matrices (``state_bytes(..., graft=True)``).
- ``seed``: seeds the true Fisher's label draws, one generator per (seed, step) (adafish_true_fisher.py).
"""

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, get_args

__all__ = [
    "HOOKED_MODES",
    "DampingSchedule",
    "FisherMode",
    "Graft",
    "fisher_beta",
    "fisher_due",
    "relative_damping",
    "state_bytes",
    "validate",
]

FisherMode = Literal["batch", "per_sample", "true", "identity"]
DampingSchedule = Literal["constant", "linear", "exponential"]
Graft = Literal["none", "adamw"]
HOOKED_MODES: tuple[str, ...] = ("per_sample", "true")  # the modes whose statistics come from PerSampleFisher hooks
_FISHER_MODES: tuple[str, ...] = get_args(FisherMode)
_SCHEDULES: tuple[str, ...] = get_args(DampingSchedule)
_GRAFTS: tuple[str, ...] = get_args(Graft)


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 1


_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("lr", lambda v: 0.0 <= v < math.inf, "a finite lr >= 0"),
    ("betas", lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v), "two values in [0, 1), e.g. (0.9, 0.99)"),
    ("eps", lambda v: 0.0 <= v < math.inf, "a finite eps >= 0, e.g. 1e-8"),
    ("damping", lambda v: 0.0 < v < math.inf, "a finite damping > 0, e.g. 1e-3"),
    ("power", lambda v: 0.0 <= v <= 1.0, "a power in [0, 1] (0.5 Adam-like, 1 natural gradient)"),
    ("inv_every", _is_count, "an integer >= 1"),
    ("fisher", lambda v: v in _FISHER_MODES, f"one of {', '.join(_FISHER_MODES)}"),
    ("weight_decay", lambda v: 0.0 <= v < math.inf, "a finite weight_decay >= 0"),
    ("shape_scale", lambda v: isinstance(v, bool), "True or False"),
    ("fisher_beta", lambda v: v is None or 0.0 <= v < 1.0, "None (use betas[1]) or a value in [0, 1), e.g. 0.95"),
    ("fisher_every", _is_count, "an integer >= 1 (refresh the Fisher every this many steps)"),
    ("damping_schedule", lambda v: v in _SCHEDULES, f"one of {', '.join(_SCHEDULES)}"),
    ("damping_final", lambda v: v is None or 0.0 < v < math.inf, "None or a finite damping_final > 0, e.g. 1e-4"),
    ("damping_steps", _is_count, "an integer >= 1 (steps over which the damping moves to damping_final)"),
    ("graft", lambda v: v in _GRAFTS, f"one of {', '.join(_GRAFTS)}"),
    ("seed", lambda v: type(v) is int and 0 <= v < 2**31, "an integer in [0, 2**31)"),
)


def validate(hyper: dict[str, Any]) -> None:
    """Check AdaFish's hyperparameters (one param group's, or the defaults).

    Args:
        hyper: the hyperparameters by name.

    Raises:
        ValueError: naming the first invalid value and what to use instead (torch.optim's convention).
    """
    for key, is_valid, fix in _RULES:
        try:
            valid = is_valid(hyper[key])
        except TypeError:  # e.g. a string where a number belongs
            valid = False
        if not valid:
            raise ValueError(f"Invalid {key}: {hyper[key]!r}; use {fix}")
    if hyper["damping_schedule"] != "constant" and hyper["damping_final"] is None:
        raise ValueError(
            f"Invalid damping_final: None with damping_schedule={hyper['damping_schedule']!r}; set the relative "
            "damping to reach after damping_steps steps, e.g. damping_final=1e-4"
        )


def fisher_due(hyper: dict[str, Any], step: int) -> bool:
    """Whether step ``step`` (from 1) refreshes the Fisher EMA: steps 1, 1 + k, 1 + 2k, ... for k = fisher_every.

    Step 1 always does, so the preconditioner never starts from the zero matrix.
    """
    return (step - 1) % hyper["fisher_every"] == 0


def fisher_beta(hyper: dict[str, Any]) -> float:
    """The Fisher EMA's rate: ``fisher_beta``, or AdamW's β2 (``betas[1]``) when it is None."""
    return hyper["betas"][1] if hyper["fisher_beta"] is None else hyper["fisher_beta"]


def relative_damping(hyper: dict[str, Any], step: int) -> float:
    """The relative damping δ_t of step ``step`` (counted from 1); λ = δ_t · mean eigenvalue of the Fisher.

    With δ_0 = damping, δ_T = damping_final, T = damping_steps and s = min(step − 1, T) / T:

        constant:     δ_t = δ_0
        linear:       δ_t = δ_0 + (δ_T − δ_0)·s
        exponential:  δ_t = δ_0 · (δ_T / δ_0)^s     (geometric: δ ← ω·δ every step, ω = (δ_T/δ_0)^(1/T), the
                                                     multiplicative update of Levenberg-Marquardt/K-FAC damping,
                                                     on a fixed path instead of the reduction-ratio test)

    and δ_t = δ_T from step T + 1 on.
    """
    start = hyper["damping"]
    if hyper["damping_schedule"] == "constant":
        return start
    end = hyper["damping_final"]
    progress = min(step - 1, hyper["damping_steps"]) / hyper["damping_steps"]
    if hyper["damping_schedule"] == "linear":
        return start + (end - start) * progress
    return start * (end / start) ** progress


def state_bytes(
    lora_shapes: Iterable[tuple[int, int, int]], other_numel: int = 0, *, param_bytes: int = 4, graft: bool = False
) -> int:
    """Persistent optimizer state of AdaFish in bytes (pure; step temporaries not counted).

    Per LoRA pair: first moments of A and B in the parameter dtype, plus four fp32 r x r matrices (Fisher and
    preconditioner per factor); with ``graft="adamw"`` also AdamW's second moments of A and B. Other trainable
    parameters carry AdamW's two moments.

    Args:
        lora_shapes: one (rank, in_features, out_features) per LoRA pair.
        other_numel: element count of trainable parameters that are not LoRA factors.
        param_bytes: bytes per element of the trainable parameters (4 for fp32, 2 for bf16).
        graft: whether the optimizer grafts AdamW's step norm (``graft="adamw"``).

    Returns:
        The state size in bytes.

    Raises:
        ValueError: if a shape, the count or param_bytes is not positive (counts may be 0).
    """
    if param_bytes < 1 or other_numel < 0:
        raise ValueError(f"Invalid param_bytes={param_bytes} or other_numel={other_numel}; use >= 1 and >= 0")
    moments = 2 if graft else 1
    total_bytes = 2 * param_bytes * other_numel
    for rank, in_features, out_features in lora_shapes:
        if min(rank, in_features, out_features) < 1:
            raise ValueError(f"Invalid LoRA shape {(rank, in_features, out_features)}; use positive sizes")
        total_bytes += moments * param_bytes * rank * (in_features + out_features) + 4 * 4 * rank * rank
    return total_bytes
