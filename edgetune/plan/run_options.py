"""The run a user describes to ``edgetune plan`` beside the ladder: method, precision, optimizer, checkpointing, stack.

``RunOptions`` is validated on creation and turns into two things the pure planner prices: a ``Strategy`` (what is
trained, in which precision, with which optimizer) and a ``Stack`` (how the named tool stores it). Options left
empty take the stack's defaults, so ``--stack hf --method qlora`` plans what a Hugging Face QLoRA script does.
"""

from dataclasses import dataclass, replace
from typing import Literal

from edgetune.errors import EdgetuneError
from edgetune.plan.stacks import CHECKPOINTING, LOSS_KINDS, STACKS, Checkpointing, LossKind, Stack, get_stack
from edgetune.plan.strategies import PLAN_PRECISIONS, Backprop, Inference, Precision, Strategy, ZerothOrder

Method = Literal["full", "lora", "qlora", "inference"]
METHODS: tuple[Method, ...] = ("full", "lora", "qlora", "inference")
Report = Literal["allocated", "reserved", "device"]
REPORTS: tuple[Report, ...] = ("allocated", "reserved", "device")
# Command-line optimizer names and the planner's: torch's, bitsandbytes', transformers' Adafactor, edgetune's own.
OPTIMIZERS: dict[str, str] = {
    "adamw": "adamw",
    "adamw-8bit": "adamw_8bit",
    "paged-adamw": "paged_adamw",
    "paged-adamw-8bit": "paged_adamw_8bit",
    "adafactor": "adafactor",
    "sgd": "sgd",
    "adafish": "adafish",
    "scaled-adamw": "scaled_adamw",
    "hizoo": "hizoo",
    "mezo": "mezo",
    "fzoo": "fzoo",
}
ZEROTH_ORDER = ("hizoo", "mezo", "fzoo")
LORA_ONLY = ("adafish", "scaled-adamw")


@dataclass(frozen=True)
class RunOptions:
    """How a run trains, when it is not one of edgetune's strategies; every field may be left to the stack.

    Attributes:
        method: full (every parameter), lora (adapters on a 16-bit base), qlora (adapters on an NF4 base) or
            inference (generation: weights, KV cache, one forward).
        precision: the base weights' precision: fp32, bf16, fp16 or nf4 (qlora implies nf4).
        optimizer: a key of ``OPTIMIZERS`` (hizoo, mezo and fzoo are forward-only).
        checkpointing: on, off, or offload (checkpoints in host memory); default: the stack's recipe.
        stack: the tool whose storage choices are priced (``stacks.STACKS``).
        loss: full, chunked or fused, when the run differs from the stack (a Liger or Cut Cross-Entropy plugin).
        report: what the total means: allocated (the allocator's peak, ``max_memory_allocated``), reserved (what
            the caching allocator holds) or device (all memory the run needs: context and slack included).
        double_quant: NF4 double quantization, when the run differs from the stack.
    """

    method: Method | None = None
    precision: Precision | None = None
    optimizer: str | None = None
    checkpointing: Checkpointing | None = None
    stack: str = "edgetune"
    loss: LossKind | None = None
    report: Report = "device"
    double_quant: bool | None = None

    def __post_init__(self) -> None:
        for name, allowed in (
            ("method", METHODS),
            ("precision", PLAN_PRECISIONS),
            ("optimizer", tuple(OPTIMIZERS)),
            ("checkpointing", CHECKPOINTING),
            ("loss", LOSS_KINDS),
        ):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise EdgetuneError(f"unknown {name} {value!r}", f"use one of {', '.join(allowed)}")
        if self.stack not in STACKS:
            raise EdgetuneError(f"unknown stack {self.stack!r}", f"use one of {', '.join(STACKS)}")
        if self.report not in REPORTS:
            raise EdgetuneError(f"unknown report {self.report!r}", f"use one of {', '.join(REPORTS)}")
        self._check_combination()

    def _check_combination(self) -> None:
        if self.method == "qlora" and self.precision not in (None, "nf4"):
            raise EdgetuneError(f"--method qlora with --precision {self.precision}", "qlora means an nf4 base")
        if self.method == "inference" and (self.optimizer or self.checkpointing):
            raise EdgetuneError("--method inference trains nothing", "drop --optimizer and --checkpointing")
        if self.method == "full" and self.optimizer in LORA_ONLY:
            raise EdgetuneError(f"{self.optimizer} trains LoRA adapters only", "use --method lora or qlora")
        if self.method == "full" and self.precision == "nf4":
            raise EdgetuneError("--method full cannot train a 4-bit base", "use --method qlora, or bf16")
        if self.optimizer in ZEROTH_ORDER and self.checkpointing not in (None, "off"):
            raise EdgetuneError(f"{self.optimizer} runs no backward pass to checkpoint", "drop --checkpointing")

    @property
    def describes_run(self) -> bool:
        """Whether the user described a run of their own (else the plan sizes edgetune's strategies)."""
        return any(v is not None for v in (self.method, self.precision, self.optimizer, self.checkpointing))


def stack_for(options: RunOptions, device: str) -> Stack:
    """The stack preset with the run's own choices applied (loss, double quant, offloaded checkpoints)."""
    stack = get_stack(options.stack, device)
    changes: dict[str, object] = {"offload_checkpoints": _checkpointing(options, stack) == "offload"}
    if options.loss is not None:
        changes["loss"] = options.loss
        if options.loss == "chunked":  # edgetune's own chunked loss, not the preset's chunking
            changes.update(loss_kept_bytes=0.0, loss_chunks=0, loss_chunk_positions=0)
    if options.double_quant is not None:
        changes["double_quant"] = options.double_quant
    return replace(stack, **changes)


def strategy_for(options: RunOptions, stack: Stack) -> Strategy:
    """The strategy the options describe, named after what it is (e.g. ``adamw-qlora-gc``)."""
    method = options.method or ("qlora" if options.precision == "nf4" else "lora")
    precision: Precision = options.precision or ("nf4" if method == "qlora" else "bf16")
    if method == "inference":
        return Inference(name=f"inference-{precision}", base=precision, summary=f"generation in {precision}")
    optimizer = options.optimizer or "adamw"
    lora = method != "full"
    suffix = "" if (method == "qlora" or precision == "bf16") else f"-{precision}"
    if optimizer in ZEROTH_ORDER:
        return ZerothOrder(
            name=f"{optimizer}-{method}{suffix}",
            optimizer=optimizer,  # type: ignore[arg-type]  (one of ZEROTH_ORDER)
            base=precision,
            lora=lora,
            default_lr=1e-4 if lora else 1e-6,
            summary=f"{optimizer} (forward-only) on {_trained(method, precision)}",
        )
    checkpointing = _checkpointing(options, stack)
    tail = {"on": "-gc", "off": "", "offload": "-offload"}[checkpointing]
    return Backprop(
        name=f"{optimizer}-{method}{suffix}{tail}",
        optimizer=OPTIMIZERS[optimizer],  # type: ignore[arg-type]  (validated in RunOptions)
        base=precision,
        lora=lora,
        checkpointing=checkpointing != "off",
        default_lr=1e-4 if lora else 2e-5,
        summary=f"{optimizer} on {_trained(method, precision)}, checkpointing {checkpointing} ({stack.name} stack)",
    )


def _checkpointing(options: RunOptions, stack: Stack) -> Checkpointing:
    if options.checkpointing is not None:
        return options.checkpointing
    if options.optimizer in ZEROTH_ORDER or options.method == "inference":
        return "off"
    if stack.kbit_checkpointing is not None and (options.method == "qlora" or options.precision == "nf4"):
        return stack.kbit_checkpointing
    return stack.default_checkpointing


def _trained(method: str, precision: str) -> str:
    if method == "full":
        return f"every {precision} parameter"
    return f"LoRA over a {precision} base"
