"""The fine-tuning strategies edgetune sizes and runs, as data: one table, two shapes, no class hierarchy.

A strategy fixes the base precision, what is trained (LoRA adapters or every parameter), the optimizer and
whether decoder layers are recomputed in backward. ``make_optimizer`` and ``training_step`` are the only places
that turn a strategy into work, so the planner, the probe and the trainer all agree on what a step is.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from edgetune.errors import EdgetuneError
from edgetune.loading import Precision

BackpropOptimizer = Literal["adafish", "scaled_adamw", "adamw"]


@dataclass(frozen=True)
class Backprop:
    """Gradient-based training: LoRA adapters or all parameters, one optimizer, optional checkpointing."""

    name: str
    optimizer: BackpropOptimizer
    base: Precision
    lora: bool
    checkpointing: bool
    default_lr: float
    summary: str
    needs_backward: bool = True


@dataclass(frozen=True)
class ZerothOrder:
    """Forward-only training with seeded in-place perturbations (HiZOO with the Hessian, MeZO without)."""

    name: str
    hessian: bool
    base: Precision
    lora: bool
    default_lr: float
    summary: str
    checkpointing: bool = False
    needs_backward: bool = False

    @property
    def forwards_per_step(self) -> int:
        return 3 if self.hessian else 2


Strategy = Backprop | ZerothOrder

STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Backprop(
            "adafish-lora", "adafish", "bf16", True, False, 1e-3, "AdaFish on LoRA over a bf16 base, activations kept"
        ),
        Backprop(
            "adafish-lora-gc",
            "adafish",
            "bf16",
            True,
            True,
            1e-3,
            "AdaFish on LoRA over a bf16 base, gradient checkpointing",
        ),
        Backprop(
            "scaled-adamw-qlora-gc",
            "scaled_adamw",
            "nf4",
            True,
            True,
            3e-4,
            "ScaledAdamW on LoRA over a 4-bit NF4 base (QLoRA), gradient checkpointing",
        ),
        ZerothOrder("hizoo-qlora", True, "nf4", True, 1e-4, "HiZOO (forward-only) on LoRA over an NF4 base"),
        ZerothOrder("mezo-qlora", False, "nf4", True, 1e-4, "MeZO (forward-only) on LoRA over an NF4 base"),
        ZerothOrder("hizoo-full", True, "bf16", False, 1e-6, "HiZOO (forward-only) on every bf16 parameter"),
        ZerothOrder("mezo-full", False, "bf16", False, 1e-6, "MeZO (forward-only) on every bf16 parameter"),
        Backprop(
            "adamw-lora-gc",
            "adamw",
            "bf16",
            True,
            True,
            3e-4,
            "baseline: torch AdamW on LoRA over a bf16 base, gradient checkpointing",
        ),
        Backprop(
            "adamw-full-gc",
            "adamw",
            "bf16",
            False,
            True,
            2e-5,
            "baseline: full fine-tuning with torch AdamW in bf16, gradient checkpointing",
        ),
    )
}

# The recommendation rule walks this ladder from the fastest-converging strategy to the one that needs least
# memory and takes the first that fits with margin.
LADDER: tuple[str, ...] = ("adafish-lora", "adafish-lora-gc", "scaled-adamw-qlora-gc", "hizoo-qlora")


def get_strategy(name: str) -> Strategy:
    """Look a strategy up by name.

    Raises:
        EdgetuneError: unknown name (the message lists the known ones).
    """
    try:
        return STRATEGIES[name]
    except KeyError:
        raise EdgetuneError(f"unknown strategy {name!r}", f"use one of {', '.join(STRATEGIES)}") from None


def make_optimizer(strategy: Strategy, model: torch.nn.Module, lr: float | None = None, seed: int = 0):
    """The optimizer a strategy trains ``model`` with (over its trainable parameters)."""
    from edgetune.optim import AdaFish, HiZOO, ScaledAdamW

    lr = strategy.default_lr if lr is None else lr
    if isinstance(strategy, ZerothOrder):
        return HiZOO([p for p in model.parameters() if p.requires_grad], lr=lr, hessian=strategy.hessian, seed=seed)
    if strategy.optimizer == "adafish":
        return AdaFish.from_model(model, lr=lr)
    if strategy.optimizer == "scaled_adamw":
        return ScaledAdamW.from_model(model, lr=lr)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def training_step(
    strategy: Strategy, model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer
) -> torch.Tensor:
    """One optimizer step on one batch; returns the loss (detached)."""
    if isinstance(strategy, ZerothOrder):
        return optimizer.step(_forward_closure(model, batch)).detach()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _forward_closure(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        with torch.no_grad():
            return model(**batch).loss

    return closure
