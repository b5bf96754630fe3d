"""One optimizer step of a strategy, the only place that turns a strategy into work.

The trainer and ``edgetune probe`` both call ``run_step``, so a probe measures exactly the step a run takes.
Backprop strategies run forward and backward over every micro-batch (each loss divided by their number, so the
gradients are those of the mean), clip the gradient norm and step the optimizer. On the steps where AdaFish takes a
true Fisher, each micro-batch first backpropagates a second loss, at labels drawn from the model, through the same
forward and into AdaFish's statistics only (``edgetune.optim.adafish_true_fisher`` says why it is done here).
Zeroth-order strategies hand the optimizer a closure of forward passes under ``no_grad``, with the model in eval
mode: the perturbed losses must see the same network, and dropout in train mode would draw a different mask for
each of them.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from edgetune.plan.strategies import FZOO_DIRECTIONS, Strategy, ZerothOrder
from edgetune.train.chunked_loss import causal_lm_loss, causal_lm_loss_and_sampled_grad

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class OptimizerSettings:
    """What the optimizers take besides the parameters.

    Attributes:
        lr: learning rate.
        weight_decay: decoupled weight decay (every edgetune optimizer and torch AdamW decouple it).
        zo_eps: perturbation scale of the zeroth-order optimizers; None keeps the optimizer's default (1e-3).
        seed: seeds the zeroth-order perturbations.
    """

    lr: float
    weight_decay: float = 0.0
    zo_eps: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class StepOutcome:
    """What one step did.

    Attributes:
        loss: mean loss over the micro-batches (NaN when a zeroth-order step skipped its update).
        tokens: tokens attended to (padding excluded).
        grad_norm: total gradient norm before clipping (backprop only; None for zeroth-order steps).
        skipped: the update was not applied because a loss was not finite.
    """

    loss: float
    tokens: int
    grad_norm: float | None
    skipped: bool


def make_optimizer(
    strategy: Strategy, model: torch.nn.Module, settings: OptimizerSettings | None = None
) -> torch.optim.Optimizer:
    """The optimizer a strategy trains ``model`` with, over its trainable parameters (default: its default rate)."""
    from edgetune.optim import FZOO, AdaFish, HiZOO, ScaledAdamW

    settings = settings or OptimizerSettings(lr=strategy.default_lr)
    decay = settings.weight_decay
    if isinstance(strategy, ZerothOrder):
        trainable = [p for p in model.parameters() if p.requires_grad]
        common = {"lr": settings.lr, "seed": settings.seed, "weight_decay": decay}
        common.update({} if settings.zo_eps is None else {"eps": settings.zo_eps})
        if strategy.optimizer == "fzoo":
            return FZOO(trainable, directions=FZOO_DIRECTIONS, **common)
        return HiZOO(trainable, hessian=strategy.hessian, **common)
    if strategy.optimizer == "adafish":
        return AdaFish.from_model(model, lr=settings.lr, weight_decay=decay)
    if strategy.optimizer == "scaled_adamw":
        return ScaledAdamW.from_model(model, lr=settings.lr, weight_decay=decay)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr, weight_decay=decay)


def run_step(
    strategy: Strategy,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Batch],
    *,
    max_grad_norm: float | None = None,
    check_memory: Callable[[], None] = lambda: None,
    update: bool = True,
) -> StepOutcome:
    """One optimizer step over ``micro_batches`` (gradient accumulation when there are several).

    Args:
        strategy: decides backprop or forward-only.
        model: the model being trained, on the batches' device.
        optimizer: from ``make_optimizer``.
        micro_batches: batches with ``input_ids`` and ``labels`` (and ``attention_mask`` when padded).
        max_grad_norm: clip the total gradient norm to this (backprop); None does not clip.
        check_memory: called after each micro-batch's biggest allocations; raises to signal out of memory.
        update: False runs forward and backward but leaves the weights alone (``edgetune probe --no-update``).
    """
    tokens = sum(
        int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in micro_batches
    )
    if isinstance(strategy, ZerothOrder):
        loss, skipped = _forward_only_step(model, optimizer, micro_batches, check_memory)
        return StepOutcome(math.nan if skipped else loss, tokens, None, skipped)
    total = 0.0
    fisher = _sampled_fisher(optimizer)
    for batch in micro_batches:
        if fisher is None:
            loss = causal_lm_loss(model, batch) / len(micro_batches)
        else:
            loss, output, sampled_grad = causal_lm_loss_and_sampled_grad(model, batch, fisher.generator)
            fisher.backward(output, sampled_grad / len(micro_batches))
            loss = loss / len(micro_batches)
        loss.backward()
        check_memory()
        total += float(loss.detach())
    trainable = [p for p in model.parameters() if p.grad is not None]
    # clip_grad_norm_ with an infinite limit only measures, so the norm is logged whether or not it clips.
    limit = math.inf if max_grad_norm is None else max_grad_norm
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, limit)) if trainable else 0.0
    finite = math.isfinite(total)
    if finite and update:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(total, tokens, grad_norm, not finite)


def _sampled_fisher(optimizer: torch.optim.Optimizer):
    """AdaFish's true-Fisher request for this step, or None (other optimizers, other fisher modes, other steps)."""
    from edgetune.optim import AdaFish

    return optimizer.sampled_fisher() if isinstance(optimizer, AdaFish) else None


def _forward_only_step(model, optimizer, micro_batches: Sequence[Batch], check_memory) -> tuple[float, bool]:
    def closure() -> torch.Tensor:
        with torch.no_grad():
            loss = sum(causal_lm_loss(model, b) for b in micro_batches) / len(micro_batches)
        check_memory()
        return loss

    was_training = model.training
    model.eval()
    try:
        loss = float(optimizer.step(closure))
    finally:
        model.train(was_training)
    # HiZOO and FZOO skip the update when a loss is not finite; count it like a non-finite loss.
    log = getattr(optimizer, "log", None)
    return loss, bool(log) and log[-1].skipped
