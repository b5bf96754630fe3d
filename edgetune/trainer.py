"""``train``: the training loop, one function you can read top to bottom.

Backprop strategies run forward, backward and the optimizer step (with gradient accumulation, checkpointing
switched on at load time); zeroth-order strategies hand the optimizer a closure that runs forward passes only.
Around the loop: the plan decides the strategy when none is given, held-out loss is evaluated with a streamed
loss, a JSONL log records every step with its memory, checkpoints are written atomically, and a cancel token
is honoured at step boundaries. Nothing here prints or exits; progress goes through ``on_step``/``on_event``.
"""

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from edgetune.budget import StrategyPlan
from edgetune.checkpoint import capture_rng_state, load_latest_checkpoint, restore_rng_state, save_checkpoint
from edgetune.config import TrainConfig
from edgetune.data import batches, load_dataset, pad_token_id
from edgetune.errors import EdgetuneError
from edgetune.evaluation import held_out_loss
from edgetune.loading import load_tokenizer
from edgetune.memory import MemoryProbe, current_memory, resident_bytes
from edgetune.run_dir import prepare_run_dir, run_identity, save_result_weights, write_summary
from edgetune.session import (
    Session,
    budget_guard,
    build_session,
    is_out_of_memory,
    release_memory,
    shrink,
)
from edgetune.sources import resolve_model
from edgetune.strategies import STRATEGIES, Strategy, ZerothOrder

logger = logging.getLogger(__name__)


class CancelToken:
    """Set from any thread (a Cancel button, a signal handler); the loop saves a checkpoint and returns."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass(frozen=True)
class StepInfo:
    """What one finished step reports to ``on_step`` and to the JSONL log."""

    step: int
    total_steps: int
    loss: float
    lr: float
    tokens_per_second: float
    seconds: float
    eta_seconds: float
    memory: dict[str, int]
    skipped: bool = False
    val_loss: float | None = None


@dataclass(frozen=True)
class TrainResult:
    """The outcome of ``train``."""

    run_dir: Path
    strategy: str
    strategy_reason: str
    steps_done: int
    status: str  # "finished", "cancelled" or "stopped: <why>"
    val_loss_before: float
    val_loss_after: float
    output_dir: Path
    planned_peak_bytes: int
    measured_peak_bytes: int
    planned_components: dict[str, int] = field(default_factory=dict)
    skipped_steps: int = 0
    adaptations: list[dict] = field(default_factory=list)
    history: list[StepInfo] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"run_dir": str(self.run_dir), "output_dir": str(self.output_dir)}


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
    on_event: Callable[[str], None] | None = None,
    cancel: CancelToken | None = None,
) -> TrainResult:
    """Fine-tune as ``config`` says and save the result in ``config.output.dir``.

    Raises:
        EdgetuneError: the model, data, output folder, strategy or checkpoint cannot be used, or memory runs out
            with nothing left to shrink.
    """
    notify = on_event or (lambda message: logger.info(message))
    cancel = cancel or CancelToken()
    device = _device(config.train.device)
    source = resolve_model(config.model.name, on_event=notify)
    tokenizer = load_tokenizer(source)
    data = load_dataset(config.data, tokenizer)
    strategy, reason, sized = _choose_strategy(config, source, device)
    notify(f"strategy {strategy.name}: {reason}")
    identity = run_identity(config, source, strategy)
    run_dir = prepare_run_dir(Path(config.output.dir), identity, resume=resume, overwrite=config.output.overwrite)
    schedule = _linear_decay(config.train.steps)
    torch.manual_seed(config.train.seed)
    session = build_session(
        config,
        source,
        strategy,
        device,
        micro_batch=config.train.batch_size,
        accumulation=config.train.grad_accumulation,
        schedule=schedule,
    )
    start, offset, skipped = 0, {"epoch": 0, "examples": 0}, 0
    if resume:
        session, start, offset, skipped = _restore(run_dir, identity, session, config, source, device, schedule, notify)
        _truncate_log(run_dir / "steps.jsonl", start)
    (run_dir / "config.yaml").write_text(config.to_yaml())
    pad = pad_token_id(tokenizer)
    stream = _Stream(data.train, session.micro_batch, pad, config.train.seed, offset)
    val_before = held_out_loss(session.model, data.val, config.train.batch_size, pad, device, config.train.eval_batches)
    notify(f"held-out loss before: {val_before:.4f}")
    history: list[StepInfo] = []
    measured_peak, status, nonfinite_run = 0, "finished", 0
    started, step = time.perf_counter(), start
    budget = config.train.budget_bytes
    while step < config.train.steps and not cancel.cancelled:
        position, step_started = stream.position(), time.perf_counter()
        resident = resident_bytes(session.model, session.optimizer)
        try:
            with MemoryProbe(device) as probe:
                loss, tokens = _one_step(session, stream, device, budget_guard(probe, resident, budget))
        except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled; the rest re-raise
            if not is_out_of_memory(error):
                raise
            release_memory(session)
            session = shrink(session, config, source, device, step + 1, str(error) or "CUDA out of memory", schedule)
            stream = _Stream(data.train, session.micro_batch, pad, config.train.seed, position)
            with (run_dir / "events.jsonl").open("a") as events:
                events.write(json.dumps({"event": "out_of_memory"} | session.adaptations[-1]) + "\n")
            notify(
                f"out of memory at step {step + 1}; now {session.strategy.name}, micro-batch "
                f"{session.micro_batch} x {session.accumulation} accumulation ({session.adaptations[-1]})"
            )
            continue
        step += 1
        finite = math.isfinite(loss)
        skipped, nonfinite_run = skipped + (not finite), 0 if finite else nonfinite_run + 1
        lr = session.scheduler.get_last_lr()[0]  # the rate this step used, before the schedule moves on
        session.scheduler.step()
        measured_peak = max(
            measured_peak, resident_bytes(session.model, session.optimizer) + probe.report.peak_allocated_bytes
        )
        val = None
        if step % config.train.eval_every == 0 or step == config.train.steps:
            val = held_out_loss(
                session.model, data.val, config.train.batch_size, pad, device, config.train.eval_batches
            )
        info = _step_info(step, config, loss, lr, tokens, step_started, started, start, probe, resident, val)
        history.append(info)
        with (run_dir / "steps.jsonl").open("a") as log:
            log.write(json.dumps(asdict(info)) + "\n")
        if on_step is not None:
            on_step(info)
        if nonfinite_run >= config.train.max_nonfinite:
            status = f"stopped: {nonfinite_run} non-finite losses in a row (lower the learning rate)"
            break
        if step % config.output.checkpoint_every == 0:
            _checkpoint(run_dir, step, session, stream, skipped, identity, config)
    if cancel.cancelled and step < config.train.steps:
        status = "cancelled"
    if step % config.output.checkpoint_every != 0 or status != "finished":
        _checkpoint(run_dir, step, session, stream, skipped, identity, config)
    val_after = held_out_loss(session.model, data.val, config.train.batch_size, pad, device, config.train.eval_batches)
    output_dir = save_result_weights(run_dir, session.model, session.strategy, tokenizer)
    result = TrainResult(
        run_dir=run_dir,
        strategy=session.strategy.name,
        strategy_reason=reason,
        steps_done=step,
        status=status,
        val_loss_before=val_before,
        val_loss_after=val_after,
        output_dir=output_dir,
        planned_peak_bytes=sized.estimate.peak_bytes,
        measured_peak_bytes=measured_peak,
        planned_components={c.name: c.bytes for c in sized.overhead + sized.estimate.components},
        skipped_steps=skipped,
        adaptations=session.adaptations,
        history=history,
    )
    write_summary(run_dir, result)
    notify(f"held-out loss after: {val_after:.4f}; outputs in {output_dir}")
    return result


def _step_info(step, config, loss, lr, tokens, step_started, started, start, probe, resident, val) -> StepInfo:
    seconds = time.perf_counter() - step_started
    return StepInfo(
        step=step,
        total_steps=config.train.steps,
        loss=loss,
        lr=lr,
        tokens_per_second=tokens / seconds,
        seconds=seconds,
        eta_seconds=(time.perf_counter() - started) / (step - start) * (config.train.steps - step),
        memory=current_memory(probe.report.device)
        | {
            "step_peak_bytes": probe.report.peak_allocated_bytes,
            "resident_bytes": resident,
            "peak_rss_bytes": probe.report.peak_rss_bytes,
        }
        # On CUDA NVML's view of the device too: it includes the context and other processes.
        | ({"nvml_used_bytes": probe.report.nvml_used_bytes} if probe.report.nvml_used_bytes is not None else {}),
        skipped=not math.isfinite(loss),
        val_loss=val,
    )


def _one_step(session: Session, stream: "_Stream", device, check_memory: Callable[[], None]) -> tuple[float, int]:
    """One optimizer step over ``accumulation`` micro-batches; returns (mean loss, tokens)."""
    micro = [{k: v.to(device) for k, v in next(stream).items()} for _ in range(session.accumulation)]
    tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    model, optimizer = session.model, session.optimizer
    if isinstance(session.strategy, ZerothOrder):

        def closure() -> torch.Tensor:
            with torch.no_grad():
                loss = sum(model(**b).loss for b in micro) / len(micro)
            check_memory()
            return loss

        loss = float(optimizer.step(closure))
        # HiZOO skips the update when l+, l- or l0 is not finite; count it like a non-finite loss.
        skipped = bool(getattr(optimizer, "log", None)) and optimizer.log[-1].skipped
        return (math.nan if skipped else loss), tokens
    total = 0.0
    for batch in micro:
        loss = model(**batch).loss / len(micro)
        loss.backward()
        check_memory()
        total += float(loss.detach())
    if math.isfinite(total):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, tokens


class _Stream:
    """Training batches in a seeded order; the position counts examples, so it survives a micro-batch change."""

    def __init__(self, examples: list, micro_batch: int, pad: int, seed: int, position: dict[str, int]) -> None:
        self.examples, self.micro_batch, self.pad, self.seed = examples, micro_batch, pad, seed
        self.epoch, self.consumed = position["epoch"], position["examples"]
        if self.consumed >= len(examples):  # saved right after the epoch's last (partial) batch
            self.epoch, self.consumed = self.epoch + 1, 0
        self._iterator = self._epoch_iterator()

    def _epoch_iterator(self) -> Iterator[dict[str, torch.Tensor]]:
        # The order depends on (seed, epoch) only, so skipping consumed // micro_batch batches lands exactly.
        return batches(
            self.examples,
            self.micro_batch,
            self.pad,
            shuffle=True,
            seed=self.seed,
            epoch=self.epoch,
            start=self.consumed // self.micro_batch,
        )

    def __next__(self) -> dict[str, torch.Tensor]:
        try:
            item = next(self._iterator)
        except StopIteration:
            self.epoch, self.consumed = self.epoch + 1, 0
            self._iterator = self._epoch_iterator()
            item = next(self._iterator)
        self.consumed += item["input_ids"].shape[0]
        return item

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "examples": self.consumed}


def _checkpoint(run_dir, step, session: Session, stream: _Stream, skipped, identity, config) -> None:
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in session.trainable.items()}
    state = {
        "optimizer": session.optimizer.state_dict(),
        "scheduler": session.scheduler.state_dict(),
        "rng": capture_rng_state(),
        "data": stream.position(),
        "skipped": skipped,
        "step": step,
        "session": session.describe(),
    }
    save_checkpoint(run_dir, step, tensors, state, identity=identity, keep=config.output.keep_checkpoints)


def _restore(run_dir, identity, session: Session, config, source, device, schedule, notify):
    loaded = load_latest_checkpoint(run_dir, identity)
    if loaded is None:
        raise EdgetuneError(
            f"{run_dir} holds no complete checkpoint to resume from", "start the run again without --resume"
        )
    shape = loaded.state["session"]
    if shape["strategy"] != session.strategy.name:  # the run had moved down the ladder before it stopped
        session = build_session(
            config,
            source,
            STRATEGIES[shape["strategy"]],
            device,
            micro_batch=shape["micro_batch"],
            accumulation=shape["accumulation"],
            schedule=schedule,
        )
    session.micro_batch, session.accumulation = shape["micro_batch"], shape["accumulation"]
    session.adaptations = list(shape["adaptations"])
    with torch.no_grad():
        for name, parameter in session.trainable.items():
            parameter.copy_(loaded.tensors[name].to(parameter.device))
    session.optimizer.load_state_dict(loaded.state["optimizer"])
    session.scheduler.load_state_dict(loaded.state["scheduler"])
    # The schedule is a function of train.steps, which a resumed run may have extended: recompute the rate.
    for group, base_lr in zip(session.optimizer.param_groups, session.scheduler.base_lrs, strict=True):
        group["lr"] = base_lr * schedule(session.scheduler.last_epoch)
    session.scheduler._last_lr = [group["lr"] for group in session.optimizer.param_groups]
    restore_rng_state(loaded.state["rng"])
    notify(f"resumed from step {loaded.step} ({loaded.path.name})")
    return session, loaded.step, loaded.state["data"], loaded.state["skipped"]


def _choose_strategy(config: TrainConfig, source, device: torch.device) -> tuple[Strategy, str, StrategyPlan]:
    from edgetune import api

    budget = config.train.budget
    plan = api.plan(
        source.name if source.kind == "default" else str(source.path),
        batch_size=config.train.batch_size,
        seq_len=config.data.seq_len,
        lora_rank=config.lora.rank,
        lora_targets=tuple(config.lora.targets),
        budget=budget,
        budget_device="cpu" if device.type == "cpu" else "cuda",
    )
    if plan.spec.max_positions and config.data.seq_len > plan.spec.max_positions:
        raise EdgetuneError(
            f"data.seq_len={config.data.seq_len} is longer than the model's {plan.spec.max_positions} positions",
            f"set data.seq_len to at most {plan.spec.max_positions}",
        )
    if config.train.strategy is None:
        if plan.recommended is None:
            levers = "; ".join(lv.change for lv in plan.levers[:2])
            raise EdgetuneError("no strategy fits the memory available", f"try: {levers}")
        chosen = plan.recommended
        return STRATEGIES[chosen], f"recommended by the plan: {plan.reason}", plan.plans[chosen]
    chosen = config.train.strategy
    sized = plan.plans[chosen]
    if not sized.fits and not config.train.force:
        usable = max(plan.budget.usable_bytes, 0) / 2**30
        raise EdgetuneError(
            f"strategy {chosen} needs {sized.total_bytes / 2**30:.2f} GiB but {usable:.2f} GiB is usable "
            f"after the safety margin ({plan.budget.source})",
            f"pick {plan.recommended or 'a smaller setting'} or pass train.force=true to try anyway",
        )
    return STRATEGIES[chosen], "chosen in the config", sized


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint a run resumes from; they will be run again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _linear_decay(total_steps: int) -> Callable[[int], float]:
    # Linear decay to 10% of the initial rate: simple, and a real schedule whose state resumes with the run.
    return lambda step: max(0.1, 1.0 - 0.9 * step / max(total_steps, 1))


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise EdgetuneError(f"device {choice} requested but CUDA is not available", "set train.device=cpu or auto")
    return torch.device(choice)
