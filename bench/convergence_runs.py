"""One run of bench/convergence.py: train with backprop or a zeroth-order optimizer and record the held-out curve.

A curve point is ``step``, ``forwards`` (forward passes so far: one per backprop step, every closure call of a
zeroth-order step), ``train_s`` (seconds spent in training steps so far, evaluations excluded), the held-out ``loss``
(and ``accuracy`` for sentiment) and ``eval_s``, the evaluation's own time.
"""

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from convergence_tasks import Batch, Task

logger = logging.getLogger("bench.convergence")
Scheduler = torch.optim.lr_scheduler.LRScheduler


@dataclass(frozen=True)
class Budget:
    """Steps, forward passes, evaluation spacing and batch size shared by the runs of one command.

    Args:
        steps: backprop steps per run.
        eval_every: backprop steps between evaluations (there is one at step 0 and one at the last step too).
        forwards: forward passes per zeroth-order run; it takes ``forwards // forwards_per_step`` steps.
        zo_eval_every: an evaluation each time a zeroth-order run passes another multiple of this many forwards.
        batch_size: examples per training batch, backprop and zeroth-order alike.
    """

    steps: int = 100
    eval_every: int = 10
    forwards: int = 1000
    zo_eval_every: int = 100
    batch_size: int = 4


def evaluate(model: torch.nn.Module, task: Task, step: int, forwards: int, train_s: float) -> dict[str, Any]:
    """One curve point: where training is, and the held-out figures in eval mode (timed apart from training)."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        scores = task.evaluate(model)
    model.train(was_training)
    logger.info("  step %d (%d forwards, %.0f s training): %s", step, forwards, train_s, scores)
    return {"step": step, "forwards": forwards, "train_s": train_s, **scores, "eval_s": time.perf_counter() - start}


def train_backprop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    task: Task,
    seed: int,
    budget: Budget,
    scheduler: Scheduler | None = None,
) -> dict[str, Any]:
    """``budget.steps`` steps of forward, backward and ``optimizer.step()``, evaluating every ``eval_every`` steps;
    ``scheduler`` (None: a constant rate) sets the rate of each next step.

    Returns:
        ``curve``, ``train_loss`` and ``step_s`` per step, ``forwards_per_step`` (1) and ``state_bytes``.
    """
    batches, step_s, losses = task.batches(seed, budget.batch_size), [], []
    curve = [evaluate(model, task, 0, 0, 0.0)]
    for step in range(1, budget.steps + 1):
        batch = next(batches)
        model.train()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        # AdaFish with the true Fisher asks for the gradient at labels drawn from the model on some steps.
        fisher = optimizer.sampled_fisher() if hasattr(optimizer, "sampled_fisher") else None
        if fisher is None:
            loss = task.loss(model, batch)
        else:
            loss, output, sampled_grad = task.sampled_loss(model, batch, fisher.generator)
            fisher.backward(output, sampled_grad)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        step_s.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        if step % budget.eval_every == 0 or step == budget.steps:
            curve.append(evaluate(model, task, step, step, sum(step_s)))
    state = state_bytes(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return {"curve": curve, "train_loss": losses, "step_s": step_s, "forwards_per_step": 1, "state_bytes": state}


@torch.no_grad()
def train_zeroth_order(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    task: Task,
    seed: int,
    budget: Budget,
    steps: int,
    scheduler: Scheduler | None = None,
) -> dict[str, Any]:
    """``steps`` forward-only steps in eval mode; an evaluation each time another ``zo_eval_every`` forwards pass.

    The forward passes are counted, not assumed: every call of the closure is one.

    Returns:
        As ``train_backprop``, with the measured ``forwards_per_step`` and HiZOO's ``skipped_steps``.
    """
    model.eval()  # a step's perturbed forwards must see the same network (no dropout)
    batches, step_s, losses, forwards = task.batches(seed, budget.batch_size), [], [], 0
    curve = [evaluate(model, task, 0, 0, 0.0)]
    for step in range(1, steps + 1):
        batch, calls = next(batches), [0]

        def closure(batch: Batch = batch, calls: list[int] = calls) -> torch.Tensor:
            calls[0] += 1
            return task.loss(model, batch)

        start = time.perf_counter()
        losses.append(float(optimizer.step(closure)))
        if scheduler is not None:
            scheduler.step()
        step_s.append(time.perf_counter() - start)
        passed = forwards // budget.zo_eval_every < (forwards + calls[0]) // budget.zo_eval_every
        forwards += calls[0]
        if passed or step == steps:
            curve.append(evaluate(model, task, step, forwards, sum(step_s)))
    if hasattr(optimizer, "close"):  # HiZOO's worker threads
        optimizer.close()
    skipped = optimizer.state.get("skipped_steps", 0) if isinstance(optimizer.state, dict) else 0
    return {
        "curve": curve,
        "train_loss": losses,
        "step_s": step_s,
        "forwards_per_step": forwards / max(steps, 1),
        "state_bytes": state_bytes(optimizer),
        "skipped_steps": int(skipped),
    }


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct tensor storages in the optimizer's state (moments, Fisher, Hessian...)."""
    tensors = [v for s in optimizer.state.values() if isinstance(s, dict) for v in s.values()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if torch.is_tensor(t)}
    return sum(storages.values())
