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
from edgetune.loading import load_model, load_tokenizer
from edgetune.memory import MemoryProbe, current_memory, resident_bytes
from edgetune.run_dir import prepare_run_dir, run_identity, save_result_weights, write_summary
from edgetune.sources import resolve_model
from edgetune.strategies import STRATEGIES, Strategy, ZerothOrder, make_optimizer

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
        EdgetuneError: the model, data, output folder, strategy or checkpoint cannot be used.
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
    (run_dir / "config.yaml").write_text(config.to_yaml())
    lora = config.lora.to_settings() if strategy.lora else None
    model = load_model(source, strategy.base, device=device, lora=lora, gradient_checkpointing=strategy.checkpointing)
    lr = config.train.lr if config.train.lr is not None else strategy.default_lr
    optimizer = make_optimizer(strategy, model, lr=lr, seed=config.train.seed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_decay(config.train.steps))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    position = {"epoch": 0, "batch": 0}
    start, skipped, nonfinite_run = 0, 0, 0
    torch.manual_seed(config.train.seed)
    if resume:
        start, position, skipped = _restore(run_dir, identity, trainable, optimizer, scheduler, notify)
    pad = pad_token_id(tokenizer)
    val_before = held_out_loss(model, data.val, config.train.batch_size, pad, device, config.train.eval_batches)
    notify(f"held-out loss before: {val_before:.4f}")
    log_path = run_dir / "steps.jsonl"
    history: list[StepInfo] = []
    resident = resident_bytes(model, optimizer)
    measured_peak, status = resident, "finished"
    stream = _batch_stream(data.train, config, pad, position)
    started, step = time.perf_counter(), start
    for step in range(start + 1, config.train.steps + 1):
        if cancel.cancelled:
            status, step = "cancelled", step - 1
            break
        step_started = time.perf_counter()
        with MemoryProbe(device) as probe:
            loss, tokens = _one_step(strategy, model, optimizer, stream, config.train.grad_accumulation, device)
        finite = math.isfinite(loss)
        skipped += 0 if finite else 1
        nonfinite_run = 0 if finite else nonfinite_run + 1
        scheduler.step()
        measured_peak = max(measured_peak, resident_bytes(model, optimizer) + probe.report.peak_allocated_bytes)
        seconds = time.perf_counter() - step_started
        val = None
        if step % config.train.eval_every == 0 or step == config.train.steps:
            val = held_out_loss(model, data.val, config.train.batch_size, pad, device, config.train.eval_batches)
        info = StepInfo(
            step=step,
            total_steps=config.train.steps,
            loss=loss,
            lr=scheduler.get_last_lr()[0],
            tokens_per_second=tokens / seconds,
            seconds=seconds,
            eta_seconds=(time.perf_counter() - started) / (step - start) * (config.train.steps - step),
            memory=current_memory(device)
            | {
                "step_peak_bytes": probe.report.peak_allocated_bytes,
                "resident_bytes": resident,
                "peak_rss_bytes": probe.report.peak_rss_bytes,
            },
            skipped=not finite,
            val_loss=val,
        )
        history.append(info)
        with log_path.open("a") as log:
            log.write(json.dumps(asdict(info)) + "\n")
        if on_step is not None:
            on_step(info)
        if nonfinite_run >= config.train.max_nonfinite:
            status = f"stopped: {nonfinite_run} non-finite losses in a row (lower the learning rate)"
            break
        if step % config.output.checkpoint_every == 0:
            _checkpoint(run_dir, step, trainable, optimizer, scheduler, stream, skipped, identity, config)
    if step % config.output.checkpoint_every != 0 or status != "finished":
        _checkpoint(run_dir, step, trainable, optimizer, scheduler, stream, skipped, identity, config)
    val_after = held_out_loss(model, data.val, config.train.batch_size, pad, device, config.train.eval_batches)
    output_dir = save_result_weights(run_dir, model, strategy, tokenizer)
    result = TrainResult(
        run_dir=run_dir,
        strategy=strategy.name,
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
        history=history,
    )
    write_summary(run_dir, result)
    notify(f"held-out loss after: {val_after:.4f}; outputs in {output_dir}")
    return result


def _one_step(strategy: Strategy, model, optimizer, stream: "_Stream", accumulation: int, device) -> tuple[float, int]:
    """One optimizer step over ``accumulation`` micro-batches; returns (mean loss, tokens)."""
    micro = [{k: v.to(device) for k, v in next(stream).items()} for _ in range(accumulation)]
    tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    if isinstance(strategy, ZerothOrder):

        def closure() -> torch.Tensor:
            with torch.no_grad():
                return sum(model(**b).loss for b in micro) / accumulation

        return float(optimizer.step(closure)), tokens
    total = 0.0
    for batch in micro:
        loss = model(**batch).loss / accumulation
        loss.backward()
        total += float(loss)
    if math.isfinite(total):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, tokens


class _Stream:
    """Training batches in a seeded order whose position (epoch, batch) can be saved and restored."""

    def __init__(self, examples: list, batch_size: int, pad: int, seed: int, epoch: int, batch: int) -> None:
        self.examples, self.batch_size, self.pad, self.seed = examples, batch_size, pad, seed
        self.epoch, self.batch = epoch, batch
        self._iterator = self._epoch_iterator()

    def _epoch_iterator(self) -> Iterator[dict[str, torch.Tensor]]:
        return batches(
            self.examples, self.batch_size, self.pad, shuffle=True, seed=self.seed, epoch=self.epoch, start=self.batch
        )

    def __next__(self) -> dict[str, torch.Tensor]:
        try:
            item = next(self._iterator)
        except StopIteration:
            self.epoch, self.batch = self.epoch + 1, 0
            self._iterator = self._epoch_iterator()
            item = next(self._iterator)
        self.batch += 1
        return item

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}


def _batch_stream(examples, config: TrainConfig, pad: int, position: dict[str, int]) -> _Stream:
    return _Stream(examples, config.train.batch_size, pad, config.train.seed, position["epoch"], position["batch"])


def _checkpoint(run_dir, step, trainable, optimizer, scheduler, stream, skipped, identity, config) -> None:
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in trainable.items()}
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng_state(),
        "data": stream.position(),
        "skipped": skipped,
        "step": step,
    }
    save_checkpoint(run_dir, step, tensors, state, identity=identity, keep=config.output.keep_checkpoints)


def _restore(run_dir, identity, trainable, optimizer, scheduler, notify) -> tuple[int, dict[str, int], int]:
    loaded = load_latest_checkpoint(run_dir, identity)
    if loaded is None:
        raise EdgetuneError(
            f"{run_dir} holds no complete checkpoint to resume from", "start the run again without --resume"
        )
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(loaded.tensors[name].to(parameter.device))
    optimizer.load_state_dict(loaded.state["optimizer"])
    scheduler.load_state_dict(loaded.state["scheduler"])
    restore_rng_state(loaded.state["rng"])
    notify(f"resumed from step {loaded.step} ({loaded.path.name})")
    return loaded.step, loaded.state["data"], loaded.state["skipped"]


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
    if config.train.strategy is None:
        if plan.recommended is None:
            levers = "; ".join(lv.change for lv in plan.levers[:2])
            raise EdgetuneError("no strategy fits the memory available", f"try: {levers}")
        chosen = plan.recommended
        return STRATEGIES[chosen], f"recommended by the plan: {plan.reason}", plan.plans[chosen]
    chosen = config.train.strategy
    sized = plan.plans[chosen]
    if not sized.fits and not config.train.force:
        raise EdgetuneError(
            f"strategy {chosen} needs {sized.total_bytes / 2**30:.2f} GiB but {plan.budget.usable_bytes / 2**30:.2f} "
            f"GiB is usable ({plan.budget.source})",
            f"pick {plan.recommended or 'a smaller setting'} or pass train.force=true to try anyway",
        )
    return STRATEGIES[chosen], "chosen in the config", sized


def _linear_decay(total_steps: int) -> Callable[[int], float]:
    # Linear decay to 10% of the initial rate: simple, and a real schedule whose state resumes with the run.
    return lambda step: max(0.1, 1.0 - 0.9 * step / max(total_steps, 1))


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise EdgetuneError(f"device {choice} requested but CUDA is not available", "set train.device=cpu or auto")
    return torch.device(choice)
