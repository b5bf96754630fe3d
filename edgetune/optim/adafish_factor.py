"""One LoRA factor's AdaFish update, on its state dict: Fisher sample, moments, preconditioner and step.

The formulas are in adafish.py's module docstring; ``side`` is "left" for lora_A (r x in: P multiplies from the left)
and "right" for lora_B (out x r: from the right). The optimizer class does the bookkeeping (pairing, hooks, groups).
"""

import math
from typing import Any

import torch

from edgetune.optim.adafish_options import fisher_beta, relative_damping

__all__ = ["apply_step", "batch_fisher", "init_state", "refresh_preconditioners", "update_moments"]

_TINY = 1e-12  # keeps (Λ + λ) invertible when a Fisher is exactly zero (B = 0 at initialisation)


def batch_fisher(grad: torch.Tensor, side: str) -> torch.Tensor:
    """H = g gᵀ (left) or gᵀ g (right) from the batch gradient, r x r in fp32."""
    g = grad.float()
    return g @ g.mT if side == "left" else g.mT @ g


def init_state(p: torch.Tensor, side: str, fisher_mode: str) -> dict[str, Any]:
    """A factor's fresh state: zero moments, F = 0 (I when frozen in identity mode) and P = I."""
    rank = p.shape[0] if side == "left" else p.shape[1]
    eye = torch.eye(rank, dtype=torch.float32, device=p.device)
    return {
        "step": 0,
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "fisher": eye.clone() if fisher_mode == "identity" else torch.zeros_like(eye),
        "fisher_updates": 0,  # n, the count of Fisher steps: F's bias correction is 1 − β_F^n
        "fisher_ready": fisher_mode == "identity",  # whether F holds a non-zero statistic yet
        "precond": eye,
    }


def update_moments(
    state: dict[str, Any], grad: torch.Tensor, group: dict[str, Any], fisher_sample: torch.Tensor | None
) -> bool:
    """Advance M, v (graft only) and, on a Fisher step, F; return whether the preconditioner is due.

    A factor's Fisher starts at its first non-zero statistic: lora_A's is exactly zero while B = 0 (peft's
    initialisation), and counting it would leave F̂ = 0, so P = (1e-12)^(−power)·I, for up to fisher_every or
    inv_every steps while M grows. Until then the statistic is not counted (F, n stay 0; the caller keeps asking for
    one every step) and P stays I, harmless because g, and so M, is zero with it; the first real statistic refreshes P
    whatever inv_every says.

    Args:
        state: the factor's state (from ``init_state``), updated in place.
        grad: the factor's gradient.
        group: its param group.
        fisher_sample: this step's H, or None when F is not refreshed at this step.

    Returns:
        True when P should be recomputed: at step 1, every ``inv_every`` steps and at the first real statistic, but
        never while F holds none (outside identity mode).
    """
    beta1, beta2 = group["betas"]
    state["step"] += 1
    state["exp_avg"].lerp_(grad.to(state["exp_avg"].dtype), 1 - beta1)
    if group["graft"] == "adamw":
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"], memory_format=torch.preserve_format)
        g = grad.to(state["exp_avg_sq"].dtype)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
    first = False
    if fisher_sample is not None and not state["fisher_ready"]:
        # A host sync, but only until the factor's first non-zero statistic (step 1 or 2).
        first = state["fisher_ready"] = bool(fisher_sample.any())
    if fisher_sample is not None and state["fisher_ready"]:
        rate = fisher_beta(group)
        state["fisher"].mul_(rate).add_(fisher_sample, alpha=1 - rate)
        state["fisher_updates"] += 1
    if group["fisher"] != "identity" and state["fisher_updates"] == 0:
        return False
    return first or state["step"] == 1 or state["step"] % group["inv_every"] == 0


def refresh_preconditioners(states: list[dict[str, Any]], group: dict[str, Any]) -> None:
    """Recompute P = (F̂ + λI)^-power, λ = δ_t·mean(Λ) + 1e-12, for factors of one group, one batched eigh per rank."""
    by_rank: dict[int, list[dict[str, Any]]] = {}
    for state in states:
        by_rank.setdefault(state["fisher"].shape[0], []).append(state)
    rate = fisher_beta(group)
    frozen = group["fisher"] == "identity"  # F is frozen at I in identity mode, so it gets no bias correction
    for same_rank in by_rank.values():
        fisher = torch.stack([s["fisher"] / (1.0 if frozen else 1 - rate ** s["fisher_updates"]) for s in same_rank])
        # (P, r, r): one decomposition for all factors of this rank, no host sync per matrix.
        eigvals, eigvecs = torch.linalg.eigh(fisher)
        eigvals = eigvals.clamp(min=0)
        relative = [relative_damping(group, s["step"]) for s in same_rank]
        relative_t = torch.tensor(relative, dtype=eigvals.dtype, device=eigvals.device).unsqueeze(-1)
        lam = relative_t * eigvals.mean(dim=-1, keepdim=True) + _TINY
        scale = (eigvals + lam).pow(-group["power"])
        precond = (eigvecs * scale.unsqueeze(-2)) @ eigvecs.mT
        for state, new in zip(same_rank, precond.unbind(0), strict=True):
            state["precond"].copy_(new)


def apply_step(p: torch.Tensor, state: dict[str, Any], side: str, group: dict[str, Any]) -> None:
    """X ← X − lr·(D + weight_decay·X), D = P M̂ (left) or M̂ P (right), grafted or shape-scaled."""
    beta1, beta2 = group["betas"]
    m_hat = state["exp_avg"].float() / (1 - beta1 ** state["step"])
    direction = state["precond"] @ m_hat if side == "left" else m_hat @ state["precond"]
    if group["graft"] == "adamw":
        # AdamW's step length, the preconditioner's direction; on device (no .item(), so no host sync).
        v_hat = state["exp_avg_sq"].float() / (1 - beta2 ** state["step"])
        adamw_norm = torch.linalg.vector_norm(m_hat / (v_hat.sqrt_() + group["eps"]))
        direction.mul_(adamw_norm / torch.linalg.vector_norm(direction).clamp(min=_TINY))
    elif group["shape_scale"] and group["power"] == 0.5:
        # RMS of (ggᵀ)^-½ g is 1/√fan per element; rescaling makes AdamW learning rates carry over.
        fan = p.shape[1] if side == "left" else p.shape[0]
        direction.mul_(math.sqrt(fan))
    p.mul_(1 - group["lr"] * group["weight_decay"])
    p.add_(direction.to(p.dtype), alpha=-group["lr"])
