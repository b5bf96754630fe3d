"""The learning-rate schedule of a run, in one place: made by ``transformers.get_scheduler``, moved by public calls.

A schedule is a function of the step and the run's total steps. Three events need the rate of a step other than
the next one: a resume (the checkpoint's ``scheduler.state_dict()``, and maybe more total steps than before), an
out-of-memory move to another strategy (a new optimizer whose schedule must continue where the old one was), and
nothing else. ``move_to`` serves both through ``scheduler.step()``, which is how torch sets every group's rate.
"""

import warnings
from typing import Any, Literal

import torch

SchedulerKind = Literal["linear", "cosine", "constant"]
SCHEDULERS: tuple[SchedulerKind, ...] = ("linear", "cosine", "constant")


def default_schedule(needs_backward: bool) -> SchedulerKind:
    """The schedule a strategy trains with when ``train.scheduler`` is null: linear decay to 0 for backprop, a
    constant rate for the forward-only optimizers.

    Forward-only, measured: on bench/convergence.py's sentiment task (1,000 forward passes, each optimizer at its best
    constant rate, seed 0), decaying that rate linearly to 0 ended every one of them higher than holding it: MeZO
    0.657 against 0.593, HiZOO 0.667 against 0.629, FZOO 0.595 against 0.586 (``python bench/convergence.py
    --task sentiment --optimizer mezo,hizoo --variant linear --lrs 3e-4 --seeds 0``, and fzoo at 1e-5;
    bench/results/convergence.md). A zeroth-order step is already a small, noisy estimate, and the decay halves the
    mean step over a run; MeZO's and HiZOO's published runs hold the rate constant too. Backprop keeps transformers'
    Trainer default (linear), which the benchmark did not set against a constant rate.
    """
    return "linear" if needs_backward else "constant"


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: SchedulerKind,
    *,
    warmup_steps: int,
    total_steps: int,
    at_step: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule transformers' Trainer uses for ``kind``, with the rate of ``at_step`` already set.

    ``linear`` decays to 0 at ``total_steps``, ``cosine`` follows half a cosine to 0, ``constant`` holds the rate;
    each first warms up linearly from 0 over ``warmup_steps``.
    """
    from transformers import get_scheduler

    name = "constant_with_warmup" if kind == "constant" and warmup_steps else kind
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    if at_step:
        move_to(scheduler, at_step)
    return scheduler


def restore_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict[str, Any]) -> None:
    """Load a checkpoint's scheduler state into a freshly made scheduler of the same kind.

    The state carries the step reached and the initial rates; the rate function comes from the new scheduler,
    so a resumed run that was given more steps decays over its new length from where it stopped.
    """
    scheduler.load_state_dict(state)
    move_to(scheduler, scheduler.last_epoch)


def move_to(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Set every parameter group's rate to the schedule's rate at ``step``."""
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():
        # torch warns when a scheduler steps before its optimizer ever did; here no update is skipped.
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
