"""Measure real training steps: load a model the way edgetune trains it, run steps on real data, record memory.

This is the ground truth the planner is calibrated against and the quickest way for a user to see what one
training step of a given shape costs on their machine. Each step is forward + backward (+ an optimizer update
when one is chosen) on a batch of the data set; memory is the probe's peak of newly allocated tensor bytes
(CUDA: ``max_memory_allocated``) on top of what was resident before the step (weights, adapters).
"""

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from edgetune.data import DataConfig, batches, load_dataset, pad_token_id
from edgetune.errors import EdgetuneError
from edgetune.evaluation import held_out_loss
from edgetune.loading import PRECISIONS, LoraSettings, Precision, load_model, load_tokenizer
from edgetune.memory import MemoryProbe, MemoryReport, resident_bytes
from edgetune.sources import DEFAULT_MODEL_KEY, resolve_model

logger = logging.getLogger(__name__)

ProbeOptimizer = Literal["none", "adamw"]


@dataclass(frozen=True)
class ProbeConfig:
    """What to measure.

    Attributes:
        model: model name or path (see ``edgetune.sources.resolve_model``).
        precision: base weights: fp32, bf16, or nf4 (4-bit QLoRA base; needs LoRA).
        lora_rank: adapter rank; 0 trains every parameter (full fine-tuning).
        lora_alpha: adapter scaling numerator.
        gradient_checkpointing: recompute decoder layers in backward.
        optimizer: ``adamw`` applies torch AdamW updates; ``none`` measures forward + backward only.
        lr: learning rate of the optimizer.
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        steps: measured training steps.
        data: a .txt, .jsonl or .csv file; None uses the bundled public-domain text.
        device: ``cpu`` or ``cuda[:N]``.
        seed: seeds the data order and adapter initialisation.
    """

    model: str = DEFAULT_MODEL_KEY
    precision: Precision = "nf4"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    gradient_checkpointing: bool = True
    optimizer: ProbeOptimizer = "adamw"
    lr: float = 2e-4
    batch_size: int = 4
    seq_len: int = 256
    steps: int = 4
    data: str | None = None
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EdgetuneError(f"unknown precision {self.precision!r}", f"use one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "seq_len", "steps"):
            if getattr(self, name) <= 0:
                raise EdgetuneError(f"{name} must be positive, got {getattr(self, name)}", f"pass a {name} >= 1")
        if self.lora_rank < 0:
            raise EdgetuneError(f"lora_rank must be >= 0, got {self.lora_rank}", "use 0 for full fine-tuning")
        if self.precision == "nf4" and self.lora_rank == 0:
            raise EdgetuneError("an NF4 base needs LoRA adapters", "set lora_rank >= 1 or use precision bf16")
        if self.optimizer not in ("none", "adamw"):
            raise EdgetuneError(f"unknown probe optimizer {self.optimizer!r}", "use adamw or none")
        if self.lr <= 0:
            raise EdgetuneError(f"lr must be positive, got {self.lr}", "use a learning rate such as 2e-4")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise EdgetuneError(f"unknown device {self.device!r}", "use cpu or cuda[:N]")


@dataclass(frozen=True)
class ProbeStep:
    """One measured step."""

    step: int
    loss: float
    seconds: float
    tokens: int
    grad_norm: float
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
        on_event: receives one-line progress messages.

    Returns:
        Per-step loss, time and memory, and held-out loss before and after the steps.

    Raises:
        EdgetuneError: the model, data or device cannot be used.
    """
    notify = on_event or (lambda message: logger.info(message))
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise EdgetuneError(f"device {config.device} requested but CUDA is not available", "use --device cpu")
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    source = resolve_model(config.model, on_event=notify)
    tokenizer = load_tokenizer(source)
    data = load_dataset(DataConfig(path=config.data, seq_len=config.seq_len, seed=config.seed), tokenizer)
    lora = LoraSettings(rank=config.lora_rank, alpha=config.lora_alpha) if config.lora_rank else None
    model = load_model(
        source, config.precision, device=config.device, lora=lora, gradient_checkpointing=config.gradient_checkpointing
    )
    load_seconds = time.perf_counter() - started
    notify(
        f"loaded {source.name} ({config.precision}) and {data.stats.format} data in {load_seconds:.1f} s: "
        f"{len(data.train)} training and {len(data.val)} held-out examples of up to {config.seq_len} tokens"
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr) if config.optimizer == "adamw" else None
    device = torch.device(config.device)
    val_before = held_out_loss(model, data.val, config.batch_size, pad_token_id(tokenizer), device)
    steps = []
    train_batches = _cycle(data.train, config.batch_size, pad_token_id(tokenizer), config.seed)
    for index in range(config.steps):
        steps.append(_measured_step(model, next(train_batches), optimizer, index + 1, device))
        notify(
            f"step {index + 1}/{config.steps}: loss {steps[-1].loss:.4f}, {steps[-1].seconds:.2f} s, "
            f"peak +{steps[-1].memory.peak_allocated_bytes / 2**20:.0f} MiB"
        )
    val_after = held_out_loss(model, data.val, config.batch_size, pad_token_id(tokenizer), device)
    return ProbeResult(
        config=config,
        model_path=str(source.path),
        total_params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in trainable),
        resident_bytes=resident_bytes(model, optimizer),
        load_seconds=load_seconds,
        val_loss_before=val_before,
        val_loss_after=val_after,
        steps=steps,
    )


def _measured_step(model, batch, optimizer, step: int, device: torch.device) -> ProbeStep:
    batch = {key: value.to(device) for key, value in batch.items()}
    started = time.perf_counter()
    with MemoryProbe(device) as probe:
        loss = model(**batch).loss
        loss.backward()
        parameters = [p for p in model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm=float("inf")))
        if optimizer is not None:
            optimizer.step()
        # Gradients are released inside the region so that the next step starts from the same baseline.
        model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    if not torch.isfinite(loss):
        raise EdgetuneError(f"step {step} produced a non-finite loss", "lower the learning rate or use bf16/fp32")
    tokens = int(batch["attention_mask"].sum())
    return ProbeStep(
        step=step, loss=float(loss), seconds=seconds, tokens=tokens, grad_norm=grad_norm, memory=probe.report
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
    method = f"LoRA r={config.lora_rank}" if config.lora_rank else "full fine-tuning"
    checkpointing = "on" if config.gradient_checkpointing else "off"
    lines = [
        f"model      {result.model_path}",
        f"setup      {config.precision} base, {method}, checkpointing {checkpointing}, optimizer {config.optimizer}",
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
