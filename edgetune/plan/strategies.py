"""The fine-tuning strategies edgetune sizes and runs, as data: one table, two shapes, no class hierarchy.

A strategy fixes the base precision, what is trained (LoRA adapters or every parameter), the optimizer and
whether decoder layers are recomputed in backward. Each of those is a field, so code asks ``strategy.checkpointing``
instead of reading a name. Turning a strategy into an optimizer and a step is the train wing's job
(``edgetune.train.step``), so the planner, the trainer and ``edgetune probe`` agree on what one step is.
"""

from dataclasses import dataclass
from typing import Literal

from edgetune.errors import EdgetuneError
from edgetune.plan.ladder_evidence import best_zeroth_order, measured_lr

Precision = Literal["fp32", "bf16", "fp16", "nf4"]
# What edgetune trains in; the planner also sizes fp16 for runs in other tools (``edgetune plan --precision``).
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "nf4")
PLAN_PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "fp16", "nf4")
# Bytes per element of the unquantized precisions (an NF4 base is priced by its layout, inventory.nf4_bytes).
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}
# edgetune's own optimizers, torch's AdamW and SGD, bitsandbytes' 8-bit and paged AdamW, transformers' Adafactor.
BackpropOptimizer = Literal[
    "adafish", "scaled_adamw", "adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "adafactor", "sgd"
]
ZerothOrderOptimizer = Literal["hizoo", "mezo", "fzoo"]
# FZOO's perturbed losses per step (edgetune.optim.FZOO's default ``directions``); a step costs one forward more.
FZOO_DIRECTIONS = 8
# Every linear of a Llama-style block; "all-linear" in peft terms minus the head.
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# peft's name for "every linear layer except the output head"; accepted as the only entry of a target list.
ALL_LINEAR = "all-linear"


@dataclass(frozen=True, kw_only=True)
class Backprop:
    """Gradient-based training: LoRA adapters or all parameters, one optimizer, optional checkpointing.

    Attributes:
        name: the key in ``STRATEGIES`` and in ``edgetune plan``'s table.
        optimizer: adafish, scaled_adamw or adamw (torch's).
        base: precision the base weights are loaded in.
        lora: train LoRA adapters over a frozen base (else every parameter).
        checkpointing: recompute each decoder layer in backward instead of keeping its activations.
        default_lr: the learning rate used when the config leaves ``train.lr`` empty.
        summary: one line for the plan's JSON and the docs.
    """

    name: str
    optimizer: BackpropOptimizer
    base: Precision
    lora: bool
    checkpointing: bool
    default_lr: float
    summary: str

    @property
    def needs_backward(self) -> bool:
        return True


@dataclass(frozen=True, kw_only=True)
class ZerothOrder:
    """Forward-only training with seeded in-place perturbations: HiZOO, MeZO or FZOO.

    Attributes:
        name: the key in ``STRATEGIES``.
        optimizer: hizoo (a diagonal Hessian, three forwards per step), mezo (two) or fzoo (``FZOO_DIRECTIONS`` + 1).
        base: precision the base weights are loaded in.
        lora: perturb LoRA adapters over a frozen base (else every parameter).
        default_lr: the learning rate used when the config leaves ``train.lr`` empty.
        summary: one line for the plan's JSON and the docs.
    """

    name: str
    optimizer: ZerothOrderOptimizer
    base: Precision
    lora: bool
    default_lr: float
    summary: str

    @property
    def hessian(self) -> bool:
        return self.optimizer == "hizoo"

    @property
    def checkpointing(self) -> bool:
        return False  # no backward pass, so nothing to recompute

    @property
    def needs_backward(self) -> bool:
        return False

    @property
    def forwards_per_step(self) -> int:
        return {"hizoo": 3, "mezo": 2, "fzoo": FZOO_DIRECTIONS + 1}[self.optimizer]


@dataclass(frozen=True, kw_only=True)
class Inference:
    """Generation only (``edgetune plan --method inference``): weights, KV cache and one forward's working set.

    Attributes:
        name: the plan's column name.
        base: precision the weights are loaded in.
        summary: one line for the plan's JSON.
    """

    name: str
    base: Precision
    summary: str
    lora: bool = False
    optimizer: str = "none"
    checkpointing: bool = False
    needs_backward: bool = False


Strategy = Backprop | ZerothOrder | Inference

# The LoRA strategies' default rates are the ones bench/convergence.py measured best for their optimizer
# (ladder_evidence.measured_lr; the fallback where nothing was measured); full fine-tuning's are conventional.
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Backprop(
            name="adafish-lora",
            optimizer="adafish",
            base="bf16",
            lora=True,
            checkpointing=False,
            default_lr=measured_lr("adafish", fallback=1e-3),
            summary="AdaFish on LoRA over a bf16 base, activations kept",
        ),
        Backprop(
            name="adafish-lora-gc",
            optimizer="adafish",
            base="bf16",
            lora=True,
            checkpointing=True,
            default_lr=measured_lr("adafish", fallback=1e-3),
            summary="AdaFish on LoRA over a bf16 base, gradient checkpointing",
        ),
        Backprop(
            name="scaled-adamw-qlora-gc",
            optimizer="scaled_adamw",
            base="nf4",
            lora=True,
            checkpointing=True,
            default_lr=measured_lr("scaled_adamw", fallback=3e-4),
            summary="ScaledAdamW on LoRA over a 4-bit NF4 base (QLoRA), gradient checkpointing",
        ),
        ZerothOrder(
            name="hizoo-qlora",
            optimizer="hizoo",
            base="nf4",
            lora=True,
            default_lr=measured_lr("hizoo", fallback=3e-4),
            summary="HiZOO (forward-only) on LoRA over an NF4 base",
        ),
        ZerothOrder(
            name="mezo-qlora",
            optimizer="mezo",
            base="nf4",
            lora=True,
            default_lr=measured_lr("mezo", fallback=3e-4),
            summary="MeZO (forward-only) on LoRA over an NF4 base",
        ),
        ZerothOrder(
            name="hizoo-full",
            optimizer="hizoo",
            base="bf16",
            lora=False,
            default_lr=1e-6,
            summary="HiZOO (forward-only) on every bf16 parameter",
        ),
        ZerothOrder(
            name="mezo-full",
            optimizer="mezo",
            base="bf16",
            lora=False,
            default_lr=1e-6,
            summary="MeZO (forward-only) on every bf16 parameter",
        ),
        ZerothOrder(
            name="fzoo-qlora",
            optimizer="fzoo",
            base="nf4",
            lora=True,
            default_lr=measured_lr("fzoo", fallback=1e-5),
            summary="FZOO (forward-only, 9 forwards a step) on LoRA over an NF4 base",
        ),
        ZerothOrder(
            name="fzoo-full",
            optimizer="fzoo",
            base="bf16",
            lora=False,
            default_lr=1e-6,
            summary="FZOO (forward-only, 9 forwards a step) on every bf16 parameter",
        ),
        Backprop(
            name="adamw-lora-gc",
            optimizer="adamw",
            base="bf16",
            lora=True,
            checkpointing=True,
            default_lr=measured_lr("adamw", fallback=3e-4),
            summary="baseline: torch AdamW on LoRA over a bf16 base, gradient checkpointing",
        ),
        Backprop(
            name="adamw-full-gc",
            optimizer="adamw",
            base="bf16",
            lora=False,
            checkpointing=True,
            default_lr=2e-5,
            summary="baseline: full fine-tuning with torch AdamW in bf16, gradient checkpointing",
        ),
    )
}

# The recommendation rule walks this ladder from the rung that needs the most memory to the leanest and takes the
# first that fits with margin. The forward-only rung is the optimizer bench/convergence.py measured best at equal
# forward passes (ladder_evidence.best_zeroth_order); each rung's reason quotes its measurements.
LADDER: tuple[str, ...] = (
    "adafish-lora",
    "adafish-lora-gc",
    "scaled-adamw-qlora-gc",
    f"{best_zeroth_order()}-qlora",
)


def get_strategy(name: str) -> Strategy:
    """Look a strategy up by name.

    Raises:
        EdgetuneError: unknown name (the message lists the known ones).
    """
    try:
        return STRATEGIES[name]
    except KeyError:
        raise EdgetuneError(f"unknown strategy {name!r}", f"use one of {', '.join(STRATEGIES)}") from None


def with_checkpointing(strategy: Strategy) -> Strategy | None:
    """The strategy that trains like ``strategy`` but recomputes activations, if the table has one."""
    if not strategy.needs_backward or strategy.checkpointing:
        return None
    return next(
        (
            s
            for s in STRATEGIES.values()
            if s.needs_backward
            and s.checkpointing
            and (s.optimizer, s.base, s.lora) == (strategy.optimizer, strategy.base, strategy.lora)
        ),
        None,
    )


def resolve_targets(targets: tuple[str, ...], linear_names: list[str]) -> tuple[str, ...]:
    """The module names LoRA adapts: ``targets`` as given, or every decoder linear for ``("all-linear",)``.

    edgetune's default targets are the seven linears of a Llama block, i.e. every attention and MLP linear; in a
    family that names some of them differently (GPT-NeoX ``query_key_value``, GPTBigCode ``c_attn``, Phi ``fc1``
    and ``dense``) they mean the same, every decoder linear, rather than an error or a partial match. Targets the
    user named are kept as they are. The planner and the trainer both resolve targets here.

    Raises:
        EdgetuneError: "all-linear" is mixed with other names.
    """
    if tuple(targets) == DEFAULT_LORA_TARGETS and set(linear_names) - set(targets):
        return tuple(linear_names)
    if ALL_LINEAR not in targets:
        return targets
    if len(targets) != 1:
        raise EdgetuneError(
            f"lora.targets={list(targets)} mixes {ALL_LINEAR} with module names",
            f"use [{ALL_LINEAR}] alone, or list the module names",
        )
    return tuple(linear_names)
