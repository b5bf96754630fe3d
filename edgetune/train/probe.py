"""Measure real training steps: load a model the way a strategy trains it, run its steps on real data, record memory.

This is the ground truth the planner is calibrated against and the quickest way for a user to see what one
training step of a given shape costs on their machine. ``edgetune probe --strategy NAME`` measures any strategy of
``edgetune plan``'s table with the same step function ``edgetune train`` runs (``edgetune.train.step.run_step``);
``precision`` and ``checkpointing`` may override the strategy's, for calibration. Memory is the probe's peak of
newly allocated tensor bytes (CUDA: ``max_memory_allocated``) on top of what was resident before the step.
"""

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from edgetune.errors import EdgetuneError
from edgetune.plan.sources import DEFAULT_MODEL_KEY, resolve_model
from edgetune.plan.strategies import PRECISIONS, STRATEGIES, Precision, Strategy
from edgetune.train.batching import batches, pad_token_id
from edgetune.train.data import DataConfig, load_dataset
from edgetune.train.evaluation import held_out_loss
from edgetune.train.loading import LoraSettings, load_model, load_tokenizer
from edgetune.train.memory import MemoryProbe, MemoryReport, resident_bytes
from edgetune.train.notices import forward_warnings
from edgetune.train.step import OptimizerSettings, make_optimizer, run_step

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeConfig:
    """What to measure.

    Attributes:
        model: model name, path, .gguf file or hub id (see ``edgetune.plan.sources.resolve_model``).
        revision: a hub model's branch, tag or commit hash; None fetches main.
        strategy: a strategy of ``edgetune plan``'s table; it fixes the base precision, LoRA or full fine-tuning,
            checkpointing and the optimizer.
        precision: load the base in this precision instead of the strategy's (fp32, bf16, nf4; nf4 needs LoRA).
        checkpointing: override the strategy's gradient checkpointing (backprop strategies).
        lora_rank: adapter rank (LoRA strategies).
        lora_alpha: adapter scaling numerator.
        update: apply the optimizer's updates; False measures forward and backward only (backprop strategies).
        lr: learning rate; None uses the strategy's default.
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        steps: measured training steps.
        data: a .txt, .jsonl or .csv file; None uses the bundled public-domain text.
        device: ``cpu`` or ``cuda[:N]``.
        seed: seeds the data order, adapter initialisation and zeroth-order perturbations.
    """

    model: str = DEFAULT_MODEL_KEY
    revision: str | None = None
    strategy: str = "scaled-adamw-qlora-gc"
    precision: Precision | None = None
    checkpointing: bool | None = None
    lora_rank: int = 16
    lora_alpha: float = 32.0
    update: bool = True
    lr: float | None = None
    batch_size: int = 4
    seq_len: int = 128
    steps: int = 4
    data: str | None = None
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise EdgetuneError(f"unknown strategy {self.strategy!r}", f"use one of {', '.join(STRATEGIES)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise EdgetuneError(f"unknown precision {self.precision!r}", f"use one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "seq_len", "steps", "lora_rank"):
            if getattr(self, name) <= 0:
                raise EdgetuneError(f"{name} must be positive, got {getattr(self, name)}", f"pass a {name} >= 1")
        strategy = self.trained_strategy()
        if strategy.base == "nf4" and not strategy.lora:
            raise EdgetuneError(
                f"an NF4 base needs LoRA adapters, and {self.strategy} trains every parameter",
                "pick a LoRA strategy or precision bf16",
            )
        if not self.update and not strategy.needs_backward:
            raise EdgetuneError(
                f"{self.strategy} is forward-only: each step is its update",
                "drop --no-update or pick a backprop strategy",
            )
        if self.lr is not None and not 0 < self.lr < float("inf"):  # also refuses NaN
            raise EdgetuneError(f"lr must be positive and finite, got {self.lr}", "use a learning rate such as 2e-4")
        LoraSettings(rank=self.lora_rank, alpha=self.lora_alpha)  # checks alpha (NaN and inf included)
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise EdgetuneError(f"unknown device {self.device!r}", "use cpu or cuda[:N]")

    def trained_strategy(self) -> Strategy:
        """The strategy with this probe's precision and checkpointing overrides applied."""
        strategy = STRATEGIES[self.strategy]
        if self.precision is not None:
            strategy = dataclasses.replace(strategy, base=self.precision)
        if self.checkpointing is not None and strategy.needs_backward:
            strategy = dataclasses.replace(strategy, checkpointing=self.checkpointing)
        return strategy


@dataclass(frozen=True)
class ProbeStep:
    """One measured step."""

    step: int
    loss: float
    seconds: float
    tokens: int
    grad_norm: float | None
    memory: MemoryReport


@dataclass(frozen=True)
class ProbeResult:
    """Everything a probe measured."""

    config: ProbeConfig
    model_path: str
    total_params: int
    trainable_params: int
    resident_bytes: int
    load_seconds: float
    val_loss_before: float
    val_loss_after: float
    steps: list[ProbeStep] = field(default_factory=list)

    @property
    def peak_step_bytes(self) -> int:
        """Largest peak of newly allocated bytes over the measured steps."""
        return max(step.memory.peak_allocated_bytes for step in self.steps)

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"peak_step_bytes": self.peak_step_bytes}


def run_probe(config: ProbeConfig, on_event: Callable[[str], None] | None = None) -> ProbeResult:
    """Load the model and data as configured and measure ``config.steps`` training steps.

    Args:
        config: what to measure.
        on_event: receives one-line progress messages and warnings.

    Returns:
        Per-step loss, time and memory, and held-out loss before and after the steps.

    Raises:
        EdgetuneError: the model, data or device cannot be used.
    """
    with forward_warnings(on_event):
        return _probe(config, on_event or logger.info)


def _probe(config: ProbeConfig, notify: Callable[[str], None]) -> ProbeResult:
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise EdgetuneError(f"device {config.device} requested but CUDA is not available", "use --device cpu")
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    source = resolve_model(config.model, revision=config.revision, on_event=notify)
    tokenizer = load_tokenizer(source)
    data = load_dataset(DataConfig(path=config.data, seq_len=config.seq_len, seed=config.seed), tokenizer)
    strategy = config.trained_strategy()
    lora = LoraSettings(rank=config.lora_rank, alpha=config.lora_alpha) if strategy.lora else None
    model = load_model(
        source, strategy.base, device=config.device, lora=lora, gradient_checkpointing=strategy.checkpointing
    )
    load_seconds = time.perf_counter() - started
    notify(
        f"loaded {source.name} ({strategy.base}) and {data.stats.format} data in {load_seconds:.1f} s: "
        f"{len(data.train)} training and {len(data.val)} held-out examples of up to {config.seq_len} tokens"
    )
    lr = strategy.default_lr if config.lr is None else config.lr
    optimizer = make_optimizer(strategy, model, OptimizerSettings(lr=lr, seed=config.seed))
    device = torch.device(config.device)
    pad = pad_token_id(tokenizer)
    val_before = held_out_loss(model, data.val, config.batch_size, pad, device)
    steps = []
    train_batches = _cycle(data.train, config.batch_size, pad, config.seed)
    for index in range(config.steps):
        steps.append(_measured_step(strategy, model, optimizer, next(train_batches), index + 1, device, config.update))
        notify(
            f"step {index + 1}/{config.steps}: loss {steps[-1].loss:.4f}, {steps[-1].seconds:.2f} s, "
            f"peak +{steps[-1].memory.peak_allocated_bytes / 2**20:.0f} MiB"
        )
    val_after = held_out_loss(model, data.val, config.batch_size, pad, device)
    return ProbeResult(
        config=config,
        model_path=str(source.path),
        total_params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        resident_bytes=resident_bytes(model, optimizer),
        load_seconds=load_seconds,
        val_loss_before=val_before,
        val_loss_after=val_after,
        steps=steps,
    )


def _measured_step(strategy, model, optimizer, batch, step: int, device: torch.device, update: bool) -> ProbeStep:
    batch = {key: value.to(device) for key, value in batch.items()}
    started = time.perf_counter()
    # The step releases its gradients inside the region, so the next step starts from the same baseline.
    with MemoryProbe(device) as probe:
        outcome = run_step(strategy, model, optimizer, [batch], update=update)
    seconds = time.perf_counter() - started
    if not math.isfinite(outcome.loss):
        raise EdgetuneError(f"step {step} produced a non-finite loss", "lower the learning rate or use bf16/fp32")
    return ProbeStep(
        step=step,
        loss=outcome.loss,
        seconds=seconds,
        tokens=outcome.tokens,
        grad_norm=outcome.grad_norm,
        memory=probe.report,
    )


def _cycle(examples: list, batch_size: int, pad_id: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    epoch = 0
    while True:
        yield from batches(examples, batch_size, pad_id, shuffle=True, seed=seed, epoch=epoch)
        epoch += 1


def format_probe(result: ProbeResult) -> str:
    """A readable summary of a probe: setup, one row per step, held-out loss before and after."""
    config = result.config
    mib = 2**20
    strategy = config.trained_strategy()
    method = f"LoRA r={config.lora_rank}" if strategy.lora else "full fine-tuning"
    checkpointing = "on" if strategy.checkpointing else "off"
    updates = "" if config.update else " (updates off)"
    lines = [
        f"model      {result.model_path}",
        f"strategy   {config.strategy}: {strategy.base} base, {method}, checkpointing {checkpointing}, "
        f"optimizer {strategy.optimizer}{updates}",
        f"shape      batch {config.batch_size} x {config.seq_len} tokens on {config.device}",
        f"params     {result.trainable_params:,} trainable of {result.total_params:,}"
        f" ({100 * result.trainable_params / result.total_params:.2f}%)",
        f"resident   {result.resident_bytes / mib:,.0f} MiB (weights, adapters, optimizer state)",
        "",
        f"{'step':>4}  {'loss':>8}  {'seconds':>8}  {'tokens/s':>9}  {'peak MiB':>9}  {'peak RSS MiB':>12}",
    ]
    for step in result.steps:
        rss = step.memory.peak_rss_bytes
        lines.append(
            f"{step.step:>4}  {step.loss:>8.4f}  {step.seconds:>8.2f}  {step.tokens / step.seconds:>9.0f}  "
            f"{step.memory.peak_allocated_bytes / mib:>9.0f}  {rss / mib if rss else float('nan'):>12.0f}"
        )
    lines += [
        "",
        f"held-out loss {result.val_loss_before:.4f} before, {result.val_loss_after:.4f} after "
        f"{len(result.steps)} steps",
        f"peak step memory {result.peak_step_bytes / mib:,.0f} MiB on top of the resident "
        f"{result.resident_bytes / mib:,.0f} MiB",
    ]
    return "\n".join(lines)
