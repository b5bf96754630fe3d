"""The optimizers bench/convergence.py compares, each built in one place: add one by adding one line to OPTIMIZERS.

Backprop optimizers train the LoRA factors from the batch gradient; zeroth-order ones (forward passes only) estimate
it from perturbed losses and are compared at equal forward passes. All run at weight decay 0, edgetune's default
(torch's AdamW would use 0.01), and otherwise with their own defaults, which are what edgetune trains with.

Variants are keyword arguments for an optimizer's constructor, chosen with ``--variant`` and stored as a separate
optimizer ("adafish/identity"); "default" is edgetune's setting. Two more variants apply to every optimizer: "linear"
and "cosine" keep its default options and decay the rate to 0 over the run by ``edgetune train``'s own schedule
(``train.scheduler``: linear by default for backprop, constant for forward-only strategies, a default these variants
measured), where every other run holds it constant; they measure what a user's run does.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from adafish_variants import VARIANTS as ADAFISH_VARIANTS  # bench/adafish_variants.py

from edgetune.optim import FZOO, AdaFish, HiZOO, MeZO, ScaledAdamW
from edgetune.plan.strategies import FZOO_DIRECTIONS

ZO_EPS = 1e-3
Options = dict[str, Any]
Build = Callable[[torch.nn.Module, float, int, Options], torch.optim.Optimizer]


@dataclass(frozen=True)
class Method:
    """How to build an optimizer and which learning rates its part sweeps.

    Args:
        build: ``(model, lr, seed, variant options) -> optimizer``; the seed matters to zeroth-order ones only.
        lrs: the default grid: three rates half a decade apart around the expected best (bench/README.md says why);
            the report flags a best rate at the grid's edge, and ``--lrs`` adds the next one.
        forwards_per_step: for a zeroth-order optimizer, the forward passes of one step given its options; None
            for backprop (one forward and one backward a step).
    """

    build: Build
    lrs: tuple[float, ...]
    forwards_per_step: Callable[[Options], int] | None = None


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def loraplus(model: torch.nn.Module, lr: float, seed: int, options: Options) -> torch.optim.Optimizer:
    from peft.optimizers import create_loraplus_optimizer

    settings = {"loraplus_lr_ratio": 16.0, **options}
    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0, **settings)


def fzoo(model: torch.nn.Module, lr: float, seed: int, options: Options) -> torch.optim.Optimizer:
    """FZOO with edgetune's number of directions (the strategy's forwards per step depend on it)."""
    settings = {"eps": ZO_EPS, "directions": FZOO_DIRECTIONS, "weight_decay": 0.0, **options}
    return FZOO(trainable(model), lr=lr, seed=seed, **settings)


def adamw(model: torch.nn.Module, lr: float, seed: int, options: Options) -> torch.optim.Optimizer:
    # weight_decay=0 as everywhere here: edgetune's default (torch's AdamW would use 0.01).
    return torch.optim.AdamW(trainable(model), lr=lr, **{"weight_decay": 0.0, **options})


def mezo(model: torch.nn.Module, lr: float, seed: int, options: Options) -> torch.optim.Optimizer:
    return MeZO(trainable(model), lr=lr, seed=seed, **{"eps": ZO_EPS, **options})


def hizoo(model: torch.nn.Module, lr: float, seed: int, options: Options) -> torch.optim.Optimizer:
    return HiZOO(trainable(model), lr=lr, seed=seed, **{"eps": ZO_EPS, **options})


# One line per optimizer: builder, default lr grid, forward passes per step (zeroth-order only).
OPTIMIZERS: dict[str, Method] = {
    "adamw": Method(adamw, (3e-4, 1e-3, 3e-3)),
    "loraplus": Method(loraplus, (1e-4, 3e-4, 1e-3)),
    "scaled-adamw": Method(lambda m, lr, s, o: ScaledAdamW.from_model(m, lr=lr, **o), (1e-3, 3e-3, 1e-2)),
    "adafish": Method(lambda m, lr, s, o: AdaFish.from_model(m, lr=lr, **o), (1e-3, 3e-3, 1e-2)),
    "mezo": Method(mezo, (3e-4, 1e-3, 3e-3), lambda o: 2),
    "hizoo": Method(hizoo, (3e-4, 1e-3, 3e-3), lambda o: 3),
    # FZOO's step g / sigma is about unit size per direction over eps (its docstring): about 1/eps = 1000 times
    # MeZO's per unit of lr at eps = 1e-3, hence rates a decade or two lower.
    "fzoo": Method(fzoo, (1e-5, 3e-5, 1e-4), lambda o: o.get("directions", FZOO_DIRECTIONS) + 1),
}
# Variants: keyword arguments for the optimizer's constructor, chosen with --variant; "default" is what edgetune uses.
HIZOO_VARIANTS: dict[str, Options] = {"default": {}, "smooth-1e-3": {"hessian_smooth": 1e-3}}
VARIANTS: dict[str, dict[str, Options]] = {"adafish": ADAFISH_VARIANTS, "hizoo": HIZOO_VARIANTS}
# Variants of every optimizer: its default options under one of edgetune train's decaying schedules.
SCHEDULES: tuple[str, ...] = ("linear", "cosine")


def options(name: str, variant: str) -> Options:
    """The constructor keywords of an optimizer's variant.

    Raises:
        ValueError: the optimizer has no such variant.
    """
    table = VARIANTS.get(name, {"default": {}})
    if variant in SCHEDULES:
        return {}
    if variant not in table:
        raise ValueError(f"{name} has no variant {variant!r}; use one of {', '.join([*table, *SCHEDULES])}")
    return table[variant]


def forwards_per_step(name: str, variant: str) -> int | None:
    """Forward passes of one zeroth-order step; None for a backprop optimizer."""
    count = OPTIMIZERS[name].forwards_per_step
    return None if count is None else count(options(name, variant))
