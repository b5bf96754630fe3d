"""``train``: the training loop, one function you can read top to bottom.

Each step is ``edgetune.train.step.run_step``: forward, backward and the optimizer step for backprop strategies
(with gradient accumulation and clipping), a closure of forward passes for zeroth-order ones. Around the loop:
the plan decides the strategy when none is given, held-out loss is evaluated with a streamed loss, a JSONL log
records every step with its memory, checkpoints are written atomically, and a cancel token is honoured at step
boundaries. Nothing here prints or exits; progress goes through ``on_step``/``on_event``.
"""

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from edgetune.errors import EdgetuneError
from edgetune.plan.budget import Budget, budget_of_device, budget_of_size
from edgetune.plan.decide import Decision, decide, plan_run
from edgetune.plan.device import read_devices
from edgetune.plan.inventory import inspect_model
from edgetune.plan.sources import resolve_model
from edgetune.train.adapter_folder import load_into, open_init_adapter
from edgetune.train.batching import pad_token_id
from edgetune.train.config import TrainConfig
from edgetune.train.data import load_dataset
from edgetune.train.evaluation import answer_prompts, held_out_loss
from edgetune.train.loading import load_tokenizer
from edgetune.train.memory import MemoryProbe, current_memory, resident_bytes
from edgetune.train.notices import forward_warnings
from edgetune.train.run_folder import (
    plan_run_dir,
    prepare_run_dir,
    run_identity,
    save_result_weights,
    total_figure,
    truncate_step_log,
    write_summary,
    write_weights,
)
from edgetune.train.session import (
    Session,
    budget_guard,
    build_session,
    is_out_of_memory,
    release_memory,
    restore_session,
    save_session,
    shrink,
)
from edgetune.train.step import run_step
from edgetune.train.stream import BatchStream

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
    grad_norm: float | None = None
    samples: list[dict[str, str]] | None = None  # greedy answers to eval.prompts at this evaluation


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
    planned_peak_bytes: int  # tensors: the plan's estimate at the step's peak
    measured_peak_bytes: int  # tensors tracked: resident + the step's peak, the largest step
    # What the operating system or the device sees: the plan's tensors + runtime (CPU) or CUDA context + allocator
    # slack, against the largest step's reading of ``measured_total_figure``, a ``StepInfo.memory`` key.
    planned_total_bytes: int
    measured_total_bytes: int
    measured_total_figure: str
    planned_components: dict[str, int] = field(default_factory=dict)
    skipped_steps: int = 0
    adaptations: list[dict] = field(default_factory=list)
    history: list[StepInfo] = field(default_factory=list)
    # Greedy answers to eval.prompts before the first step (of this invocation) and by the final model.
    samples_before: list[dict[str, str]] | None = None
    samples_after: list[dict[str, str]] | None = None

    def to_dict(self) -> dict[str, object]:
        paths = {"run_dir": str(self.run_dir), "output_dir": str(self.output_dir)}
        return asdict(self) | paths | self.memory_ratios()

    def memory_ratios(self) -> dict[str, float | None]:
        """Measured over planned, for tensors and for the total; None before a step ran."""
        return {
            "measured_over_planned_tensors": _ratio(self.measured_peak_bytes, self.planned_peak_bytes),
            "measured_over_planned_total": _ratio(self.measured_total_bytes, self.planned_total_bytes),
        }


def _ratio(measured_bytes: int, planned_bytes: int) -> float | None:
    return round(measured_bytes / planned_bytes, 3) if measured_bytes and planned_bytes else None


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
    with forward_warnings(on_event):
        return _train(config, resume, on_step, on_event or logger.info, cancel or CancelToken())


def _train(config: TrainConfig, resume: bool, on_step, notify: Callable[[str], None], cancel: CancelToken):
    device = _device(config.train.device)
    # Everything that can refuse the run is checked before the first message, so bad input gets one line.
    source = resolve_model(config.model.name, revision=config.model.revision, on_event=notify)
    decision, budget = _decide(config, source, device)
    init = None
    if config.train.init_adapter is not None and not resume:  # a resume continues from its checkpoint instead
        init = open_init_adapter(config.train.init_adapter, decision.strategy, config.lora.rank, config.lora.alpha)
    tokenizer = load_tokenizer(source)
    data = load_dataset(config.data, tokenizer)
    total = config.train.total_steps(len(data.train))
    identity = run_identity(config, source, decision.strategy)
    run_dir = Path(config.output.dir)
    action = plan_run_dir(run_dir, identity, resume=resume, overwrite=config.output.overwrite)
    torch.manual_seed(config.train.seed)

    def make_session(strategy, *, micro_batch, accumulation, at_step=0) -> Session:
        return build_session(
            config,
            source,
            strategy,
            device,
            micro_batch=micro_batch,
            accumulation=accumulation,
            total_steps=total,
            at_step=at_step,
        )

    session = make_session(
        decision.strategy, micro_batch=config.train.batch_size, accumulation=config.train.grad_accumulation
    )
    if init is not None:
        load_into(session.model, init)
    notify(data.stats.describe())
    for warning in data.warnings:
        notify(f"warning: {warning}")
    notify(f"strategy {decision.strategy.name}: {decision.reason}")
    if init is not None:
        notify(
            f"starting from the rank-{init.rank} adapters in {init.path} (trained on {init.base or 'an unnamed base'})"
        )
    # The folder is written only once the model loaded: a model that fails to load leaves nothing behind.
    if action == "restart":
        notify(f"{run_dir} holds a run that stopped before its first checkpoint; starting it over there")
    prepare_run_dir(run_dir, identity, action)
    start, offset, skipped, val_before = 0, {"epoch": 0, "examples": 0}, 0, None
    if resume:
        session, loaded = restore_session(run_dir, identity, session, make_session)
        start, offset, skipped = loaded.step, loaded.state["data"], loaded.state["skipped"]
        val_before = loaded.state.get("val_loss_before")  # the run's loss before its first step, not this resume's
        notify(f"resumed from step {loaded.step} ({loaded.path.name})")
        truncate_step_log(run_dir / "steps.jsonl", start)
    (run_dir / "config.yaml").write_text(config.to_yaml())
    pad = pad_token_id(tokenizer)
    stream = BatchStream(data.train, session.micro_batch, pad, config.train.seed, offset)

    def evaluate() -> float:
        return held_out_loss(session.model, data.val, config.train.batch_size, pad, device, config.train.eval_batches)

    def answers() -> list[dict[str, str]] | None:
        if not config.eval.prompts:
            return None
        return answer_prompts(session.model, tokenizer, config.eval.prompts, config.eval.max_new_tokens, device)

    val_before = evaluate() if val_before is None else val_before
    notify(f"held-out loss before: {val_before:.4f}")
    samples_before = answers()
    history: list[StepInfo] = []
    measured_peak, status, nonfinite_run = 0, "finished", 0
    started, step = time.perf_counter(), start
    while step < total and not cancel.cancelled:
        position, step_started = stream.position(), time.perf_counter()
        resident = resident_bytes(session.model, session.optimizer)
        try:
            with MemoryProbe(device) as probe:
                outcome = run_step(
                    session.strategy,
                    session.model,
                    session.optimizer,
                    stream.take(session.accumulation, device),
                    max_grad_norm=config.train.max_grad_norm,
                    check_memory=budget_guard(probe, resident, config.train.budget_bytes),
                )
        except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled; the rest re-raise
            if not is_out_of_memory(error):
                raise
            release_memory(session)
            session = shrink(session, config, source, device, step + 1, str(error) or "CUDA out of memory", total)
            stream = BatchStream(data.train, session.micro_batch, pad, config.train.seed, position)
            _log_adaptation(run_dir, session, step, notify)
            continue
        step += 1
        skipped, nonfinite_run = skipped + outcome.skipped, nonfinite_run + 1 if outcome.skipped else 0
        lr = session.scheduler.get_last_lr()[0]  # the rate this step used, before the schedule moves on
        session.scheduler.step()
        measured_peak = max(
            measured_peak, resident_bytes(session.model, session.optimizer) + probe.report.peak_allocated_bytes
        )
        val = evaluate() if step % config.train.eval_every == 0 or step == total else None
        info = _step_info(step, total, outcome, lr, step_started, started, start, probe, resident, val)
        info = replace(info, samples=answers()) if val is not None and config.eval.prompts else info
        history.append(info)
        with (run_dir / "steps.jsonl").open("a") as log:
            log.write(json.dumps(asdict(info)) + "\n")
        if on_step is not None:
            on_step(info)
        if nonfinite_run >= config.train.max_nonfinite:
            status = f"stopped: {nonfinite_run} non-finite losses in a row (lower the learning rate)"
            break
        if step % config.output.checkpoint_every == 0:
            _checkpoint(run_dir, step, session, stream, skipped, identity, config, val_before, (tokenizer, source))
    if cancel.cancelled and step < total:
        status = "cancelled"
    if step % config.output.checkpoint_every != 0 or status != "finished":
        _checkpoint(run_dir, step, session, stream, skipped, identity, config, val_before, (tokenizer, source))
    val_after = evaluate()
    samples_after = history[-1].samples if history and history[-1].samples is not None else answers()
    output_dir = save_result_weights(run_dir, session.model, session.strategy, tokenizer, source)
    sized = decision.sized
    figure = total_figure(device.type, budget.kind, history[0].memory if history else {})
    result = TrainResult(
        run_dir=run_dir,
        strategy=session.strategy.name,
        strategy_reason=decision.reason,
        steps_done=step,
        status=status,
        val_loss_before=val_before,
        val_loss_after=val_after,
        output_dir=output_dir,
        planned_peak_bytes=sized.estimate.peak_bytes,
        measured_peak_bytes=measured_peak,
        samples_before=samples_before,
        samples_after=samples_after,
        planned_total_bytes=sized.total_bytes,
        measured_total_bytes=max((info.memory.get(figure, 0) for info in history), default=0),
        measured_total_figure=figure,
        planned_components={c.name: c.bytes for c in sized.overhead + sized.estimate.components},
        skipped_steps=skipped,
        adaptations=session.adaptations,
        history=history,
    )
    write_summary(run_dir, result)
    notify(f"held-out loss after: {val_after:.4f}; outputs in {output_dir}")
    return result


def _decide(config: TrainConfig, source, device: torch.device) -> tuple[Decision, Budget]:
    """The plan of this run, asked with the objects the run already has: the strategy it uses, and the budget."""
    kind = "cpu" if device.type == "cpu" else "cuda"
    budget: Budget
    if config.train.budget_bytes is not None:
        budget = budget_of_size(config.train.budget_bytes, kind, f"train.budget={config.train.budget}")
    else:
        budget = budget_of_device(read_devices()[0])
    result = plan_run(source.name, inspect_model(source), config.run_shape(), budget)
    return decide(result, config.train.strategy, force=config.train.force), budget


def _log_adaptation(run_dir: Path, session: Session, step: int, notify: Callable[[str], None]) -> None:
    change = session.adaptations[-1]
    with (run_dir / "events.jsonl").open("a") as events:
        events.write(json.dumps({"event": "out_of_memory"} | change) + "\n")
    notify(
        f"out of memory at step {step + 1}; now {session.strategy.name}, micro-batch "
        f"{session.micro_batch} x {session.accumulation} accumulation ({change})"
    )


def _step_info(step, total, outcome, lr, step_started, started, start, probe, resident, val) -> StepInfo:
    seconds = time.perf_counter() - step_started
    return StepInfo(
        step=step,
        total_steps=total,
        loss=outcome.loss,
        lr=lr,
        tokens_per_second=outcome.tokens / seconds,
        seconds=seconds,
        eta_seconds=(time.perf_counter() - started) / (step - start) * (total - step),
        memory=current_memory(probe.report.device)
        | {
            "step_peak_bytes": probe.report.peak_allocated_bytes,
            "resident_bytes": resident,
            "peak_rss_bytes": probe.report.peak_rss_bytes,
        }
        # On CUDA NVML's view of the device too: it includes the context and other processes.
        | ({"nvml_used_bytes": probe.report.nvml_used_bytes} if probe.report.nvml_used_bytes is not None else {}),
        skipped=outcome.skipped,
        val_loss=val,
        grad_norm=outcome.grad_norm,
    )


def _checkpoint(
    run_dir, step, session: Session, stream: BatchStream, skipped, identity, config, val_before, saved_with
) -> None:
    """Save a checkpoint; ``saved_with`` (tokenizer, model source) goes into a LoRA checkpoint's ``adapter/``."""
    extra = {"data": stream.position(), "skipped": skipped, "val_loss_before": val_before}
    tokenizer, source = saved_with

    def write_adapter(folder: Path) -> None:
        write_weights(folder, session.model, tokenizer, source, session.strategy)

    writer = write_adapter if session.strategy.lora else None
    save_session(
        run_dir, step, session, extra, identity=identity, keep=config.output.keep_checkpoints, write_adapter=writer
    )


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise EdgetuneError(f"device {choice} requested but CUDA is not available", "set train.device=cpu or auto")
    return torch.device(choice)
