"""What a training run holds between steps, and how it changes after running out of memory.

A ``Session`` is the strategy with its model, optimizer and scheduler, plus the micro-batch and gradient
accumulation it runs with; ``save_session`` and ``restore_session`` put it into a checkpoint and back. Out of
memory (a CUDA OOM, or on CPU the memory probe passing ``train.budget``), the trainer calls ``shrink``: first
the micro-batch is halved while accumulation doubles, so the effective batch and the step count stay the same;
at micro-batch 1 the run moves one rung down ``strategies.LADDER`` and carries its trained LoRA adapters over.
Every change is appended to ``adaptations``, which checkpoints keep, so a resumed run continues in the same shape.
The learning-rate schedule continues across both (``edgetune.train.schedule``).
"""

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgetune.errors import EdgetuneError
from edgetune.plan.strategies import LADDER, STRATEGIES, Strategy
from edgetune.train.checkpoint import capture_rng_state, load_latest_checkpoint, restore_rng_state, save_checkpoint
from edgetune.train.loading import load_model
from edgetune.train.schedule import default_schedule, make_scheduler, restore_scheduler
from edgetune.train.step import OptimizerSettings, make_optimizer

logger = logging.getLogger(__name__)


class MemoryBudgetExceeded(Exception):
    """The memory probe saw the step pass the configured budget (the CPU stand-in for a CUDA OOM)."""


@dataclass
class Session:
    """The mutable state of a run: strategy, model, optimizer, scheduler and batch shape."""

    strategy: Strategy
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    micro_batch: int
    accumulation: int
    adaptations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def describe(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this session's shape."""
        return {
            "strategy": self.strategy.name,
            "micro_batch": self.micro_batch,
            "accumulation": self.accumulation,
            "adaptations": list(self.adaptations),
        }


def build_session(
    config,
    source,
    strategy: Strategy,
    device: torch.device,
    *,
    micro_batch: int,
    accumulation: int,
    total_steps: int,
    at_step: int = 0,
) -> Session:
    """Load the model the way ``strategy`` trains it and make its optimizer and its schedule (at ``at_step``)."""
    lora = config.lora.to_settings() if strategy.lora else None
    model = load_model(source, strategy.base, device=device, lora=lora, gradient_checkpointing=strategy.checkpointing)
    train = config.train
    settings = OptimizerSettings(
        lr=train.lr if train.lr is not None else strategy.default_lr,
        weight_decay=train.weight_decay,
        zo_eps=train.zo_eps,
        seed=train.seed,
    )
    optimizer = make_optimizer(strategy, model, settings)
    scheduler = make_scheduler(
        optimizer,
        train.scheduler or default_schedule(strategy.needs_backward),
        warmup_steps=train.warmup(total_steps),
        total_steps=total_steps,
        at_step=at_step,
    )
    return Session(strategy, model, optimizer, scheduler, micro_batch, accumulation)


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA OOM, the CPU allocator failing, or the budget probe firing."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryBudgetExceeded)):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def release_memory(session: Session) -> None:
    """Drop gradients and cached blocks left by the failed step."""
    session.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def shrink(session: Session, config, source, device: torch.device, step: int, reason: str, total_steps: int) -> Session:
    """A session that needs less memory: half the micro-batch, else the next rung of the ladder.

    Raises:
        EdgetuneError: already at micro-batch 1 on the leanest strategy (or a full-parameter one).
    """
    divisor = next((d for d in range(session.micro_batch // 2, 0, -1) if session.micro_batch % d == 0), None)
    if divisor is not None and session.micro_batch > 1:
        change = {
            "step": step,
            "reason": reason,
            "micro_batch": divisor,
            "accumulation": session.accumulation * session.micro_batch // divisor,
        }
        session.micro_batch, session.accumulation = change["micro_batch"], change["accumulation"]
        session.adaptations.append(change)
        return session
    lower = _next_rung(session.strategy)
    if lower is None:
        raise EdgetuneError(
            f"out of memory at step {step} with micro-batch 1 on {session.strategy.name} ({reason})",
            "shorten data.seq_len, lower lora.rank, or free memory; the last checkpoint is kept",
        )
    moved = build_session(
        config,
        source,
        lower,
        device,
        micro_batch=session.micro_batch,
        accumulation=session.accumulation,
        total_steps=total_steps,
        at_step=session.scheduler.last_epoch,  # the failed step runs again, at the rate it was to run with
    )
    carry_adapters(session, moved)
    moved.adaptations = session.adaptations + [{"step": step, "reason": reason, "strategy": lower.name}]
    return moved


def _next_rung(strategy: Strategy) -> Strategy | None:
    if not strategy.lora:
        return None  # full-parameter weights cannot be carried into adapters without losing the finished steps
    if strategy.name in LADDER:
        index = LADDER.index(strategy.name)
        return STRATEGIES[LADDER[index + 1]] if index + 1 < len(LADDER) else None
    return STRATEGIES[LADDER[-1]]


def carry_adapters(source: Session, target: Session) -> None:
    """Copy trained LoRA weights into a session whose base differs (e.g. bf16 to NF4); names and shapes match."""
    wanted = target.trainable
    with torch.no_grad():
        for name, parameter in source.trainable.items():
            if name in wanted and wanted[name].shape == parameter.shape:
                wanted[name].copy_(parameter.to(wanted[name].device, wanted[name].dtype))


def budget_guard(probe, resident_bytes: int, budget_bytes: int | None) -> Callable[[], None]:
    """A check the step calls after its biggest allocations; raises when the budget is passed."""

    def check() -> None:
        if budget_bytes is None:
            return
        used = resident_bytes + probe.sample().peak_allocated_bytes
        if used > budget_bytes:
            raise MemoryBudgetExceeded(f"{used / 2**20:,.2f} MiB used, budget {budget_bytes / 2**20:,.2f} MiB")

    return check


def save_session(
    run_dir: Path,
    step: int,
    session: Session,
    extra: dict[str, Any],
    *,
    identity,
    keep: int,
    write_adapter: Callable[[Path], None] | None = None,
) -> None:
    """Checkpoint the trainable weights, optimizer, schedule, RNG states and shape of a session, plus ``extra``.

    ``write_adapter`` (LoRA runs) also puts the adapters in peft format into the checkpoint's ``adapter/``. Resume
    reads ``tensors.safetensors`` all the same: it holds every trainable parameter under the model's own names for
    any strategy (full-parameter runs have no adapter, older checkpoints no ``adapter/``), so resuming never depends
    on how a peft version names the keys of its files. The second copy costs little, since adapters are small.
    """
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in session.trainable.items()}
    state = {
        "optimizer": session.optimizer.state_dict(),
        "scheduler": session.scheduler.state_dict(),
        "rng": capture_rng_state(),
        "step": step,
        "session": session.describe(),
    } | extra
    try:
        save_checkpoint(run_dir, step, tensors, state, identity=identity, keep=keep, write_adapter=write_adapter)
    except OSError as exc:
        # save_checkpoint removed its partial folder; the checkpoints before this one are untouched.
        raise EdgetuneError(
            f"cannot write the checkpoint of step {step} in {run_dir / 'checkpoints'} ({exc.strerror or exc}); "
            "the earlier checkpoints are kept",
            f"free disk space, then continue with `edgetune train --resume {run_dir}`",
        ) from exc


def restore_session(run_dir: Path, identity, session: Session, rebuild: Callable[..., Session]):
    """The session of the newest complete checkpoint, and that checkpoint (step, state).

    ``rebuild(strategy, micro_batch=, accumulation=)`` makes a fresh session when the run had moved down the ladder
    before it stopped.

    Raises:
        EdgetuneError: the folder holds no complete checkpoint, or one of another run.
    """
    loaded = load_latest_checkpoint(run_dir, identity)
    if loaded is None:
        raise EdgetuneError(
            f"{run_dir} holds no complete checkpoint to resume from", "start the run again without --resume"
        )
    shape = loaded.state["session"]
    if shape["strategy"] != session.strategy.name:
        session = rebuild(
            STRATEGIES[shape["strategy"]], micro_batch=shape["micro_batch"], accumulation=shape["accumulation"]
        )
    session.micro_batch, session.accumulation = shape["micro_batch"], shape["accumulation"]
    session.adaptations = list(shape["adaptations"])
    with torch.no_grad():
        for name, parameter in session.trainable.items():
            parameter.copy_(loaded.tensors[name].to(parameter.device))
    session.optimizer.load_state_dict(loaded.state["optimizer"])
    restore_scheduler(session.scheduler, loaded.state["scheduler"])
    restore_rng_state(loaded.state["rng"])
    return session, loaded
