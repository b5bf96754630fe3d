"""ScaledAdamW: AdamW on Riemannian-preconditioned LoRA gradients.

Paper: Fangzhao Zhang and Mert Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models",
ICML 2024, arXiv:2402.02347. Reference code: https://github.com/pilancilab/Riemannian_Preconditioned_LoRA
(``AdamWr``) and peft's ``create_riemannian_optimizer`` (``peft/optimizers/riemannian.py``).

Update rule, per LoRA pair (A = ``...lora_A...`` is r x in, B = ``...lora_B...`` is out x r), step t:

    g̃_A = (BᵀB + δI_r)⁻¹ g_A ,   g̃_B = g_B (AAᵀ + δI_r)⁻¹      (A, B: weights before this step; r x r in fp32)
    m ← β1·m + (1−β1)·g̃ ;  v ← β2·v + (1−β2)·g̃²
    X ← X·(1 − lr·weight_decay) − lr/(1−β1^t) · m / (√v/√(1−β2^t) + eps)

Other trainable parameters get the same update on their raw gradient, bit for bit torch.optim.AdamW. δ is absolute
and the LoRA scaling is ignored, as in the reference code; ``correct_bias=False`` (the official Mistral runs) sets
both bias corrections to 1. Deviations from the official ``AdamWr``: both preconditioners use the pre-update
weights (Jacobi, as the paper and peft; ``AdamWr`` builds the B side from the updated A); weight decay precedes
the Adam step as in torch.optim.AdamW (``AdamWr`` decays after it, a difference of lr·wd·step); pairs are found by
name, not position.

Numerics: the damped r x r matrices of all factors with equal rank, dtype, device and δ go through one
``torch.linalg.cholesky_ex`` and one batched triangular solve, with nothing read back to the host. Where ``info !=
0`` (not numerically positive definite) the factor of ``K + 1e-4·mean(diag K)·I`` is used instead: it is computed
for the whole batch every step so that the choice is a device-side ``torch.where``; if it fails too (non-finite
weights) the preconditioner is the identity, the ``AdamWr`` fallback. Moments are fp32 (fp64 for fp64 params)
whatever the parameter dtype, bf16 parameters are updated through an fp32 copy, and ``.grad`` is left untouched.
"""

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from edgetune.optim.lora_pairs import lora_partner

__all__ = ["ScaledAdamW", "state_bytes", "step_temporary_bytes"]

logger = logging.getLogger(__name__)

# Relative damping for the fallback factorisation: keeps the fp32 condition number of K below ~1e4·r.
_FALLBACK_JITTER = 1e-4
# Upper bound on the r x r matrices alive per pair during a step (2 kept inverses + factorisation workspace).
_RR_MATRICES_PER_PAIR = 18
_Job = tuple[torch.Tensor, torch.Tensor, bool]  # (factor to update, other factor, left-multiply)


def _state_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.promote_types(param.dtype, torch.float32)


def _named_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Normalise named parameters (or groups of them) into groups with a ``param_names`` list."""
    items = list(params)
    if not items:
        raise ValueError("ScaledAdamW got no parameters; pass the trainable named parameters (requires_grad=True)")
    groups = [dict(item) for item in items] if isinstance(items[0], dict) else [{"params": items}]
    for group in groups:
        entries = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
        if not all(isinstance(entry, tuple) and len(entry) == 2 for entry in entries):
            raise ValueError(
                "ScaledAdamW got parameters without names, so it cannot pair lora_A with lora_B; "
                "pass model.named_parameters() or use ScaledAdamW.from_model(model)"
            )
        group["param_names"] = [name for name, _ in entries]
        group["params"] = [param for _, param in entries]
    return groups


def _validate(group: dict[str, Any]) -> None:
    """Raise ValueError for a hyperparameter out of range (``not a <= x`` also rejects NaN)."""
    lr, betas, eps, weight_decay, delta = (group[k] for k in ("lr", "betas", "eps", "weight_decay", "delta"))
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate lr={lr}; use lr >= 0")
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"Invalid betas={betas}; use two values in [0, 1), e.g. (0.9, 0.999)")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid eps={eps}; use eps >= 0, e.g. 1e-8")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay={weight_decay}; use weight_decay >= 0")
    if not delta > 0.0:
        raise ValueError(f"Invalid delta={delta}; use delta > 0 (the ridge keeps (BᵀB + δI) invertible), e.g. 1e-6")


def _pair_lora_factors(
    param_groups: list[dict[str, Any]], strict: bool
) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, Any], dict[str, Any]]]:
    """Pair ``...lora_A...`` with ``...lora_B...`` by name across all groups; return (A, B, group_A, group_B)."""
    named = {
        name: (param, group)
        for group in param_groups
        for name, param in zip(group["param_names"], group["params"], strict=True)
    }
    pairs: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any], dict[str, Any]]] = []
    for name, (param, group) in named.items():
        role = lora_partner(name)
        if role is None:
            continue
        own, partner_name = role
        partner = named.get(partner_name)
        if partner is None:
            if strict:
                raise ValueError(
                    f"LoRA factor {name!r} has no {partner_name!r} among the optimizer's parameters; pass "
                    "both factors (e.g. ScaledAdamW.from_model(model)) or strict_pairing=False to train it as "
                    "plain AdamW"
                )
        elif own == "lora_A" and param.ndim == 2 and partner[0].ndim == 2:
            if param.shape[0] != partner[0].shape[1]:
                raise ValueError(
                    f"LoRA shapes do not chain: {name!r} is {tuple(param.shape)} (r x in) but its lora_B is "
                    f"{tuple(partner[0].shape)} (out x r); pair factors of the same adapter and rank"
                )
            pairs.append((param, partner[0], group, partner[1]))
    return pairs


def _damped_inverses(grams: torch.Tensor, delta: float) -> torch.Tensor:
    """(grams + δI)⁻¹ for a (J, r, r) batch through one Cholesky, with no host sync (fallback: module docstring)."""
    eye = torch.eye(grams.shape[-1], dtype=grams.dtype, device=grams.device)
    damped = grams + delta * eye
    factor, info = torch.linalg.cholesky_ex(damped)
    jitter = _FALLBACK_JITTER * damped.diagonal(dim1=-2, dim2=-1).mean(-1)
    jittered, info_jittered = torch.linalg.cholesky_ex(damped + jitter[:, None, None] * eye)
    failed = (info != 0)[:, None, None]
    # K⁻¹ = L⁻ᵀL⁻¹ through a triangular solve: unlike cholesky_solve/cholesky_inverse it has no error check that
    # could read info back to the host on CUDA.
    inverse_factor = torch.linalg.solve_triangular(torch.where(failed, jittered, factor), eye, upper=False)
    return torch.where(failed & (info_jittered != 0)[:, None, None], eye, inverse_factor.mT @ inverse_factor)


class ScaledAdamW(torch.optim.Optimizer):
    """AdamW whose LoRA factor gradients are first multiplied by the r x r Riemannian preconditioner.

    Args:
        params: named parameters (``model.named_parameters()``) or param groups of them; names pair the factors.
        lr: learning rate.
        betas: coefficients of the first and second moment averages.
        eps: added to the denominator.
        weight_decay: decoupled weight decay (not preconditioned).
        delta: absolute ridge δ added to BᵀB and AAᵀ before inversion.
        correct_bias: apply Adam's bias corrections (the official Mistral runs had them off).
        strict_pairing: raise when a lora_A or lora_B factor has no partner among ``params``.

    Raises:
        ValueError: for a hyperparameter out of range, parameters without names, a LoRA factor without its
            partner (with ``strict_pairing``), or a lora_A/lora_B pair whose shapes do not chain.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        delta: float = 1e-6,
        correct_bias: bool = True,
        strict_pairing: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, delta=delta, correct_bias=correct_bias
        )
        groups = _named_groups(params)
        for group in groups:
            _validate({**defaults, **group})
        super().__init__(groups, defaults)
        pairs = _pair_lora_factors(self.param_groups, strict=strict_pairing)
        paired = {id(factor) for pair in pairs for factor in pair[:2]}
        names = [
            (n, p) for group in self.param_groups for n, p in zip(group["param_names"], group["params"], strict=True)
        ]
        plain = [n for n, p in names if {"lora_A", "lora_B"} & set(n.split(".")) and id(p) not in paired]
        if plain:
            logger.warning("ScaledAdamW trains %d LoRA factors as plain AdamW (not 2-D or no partner)", len(plain))
        logger.info("ScaledAdamW preconditions %d LoRA pairs", len(pairs))

    @classmethod
    def from_model(cls, model: torch.nn.Module, **kwargs: Any) -> "ScaledAdamW":
        """Build the optimizer over the trainable parameters of ``model``.

        Args:
            model: a module with LoRA adapters (peft or loralib naming).
            **kwargs: hyperparameters for ``ScaledAdamW``.

        Returns:
            The optimizer.

        Raises:
            ValueError: as ``ScaledAdamW``, or if ``model`` has no trainable parameters.
        """
        return cls([(name, p) for name, p in model.named_parameters() if p.requires_grad], **kwargs)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Perform one optimisation step.

        Args:
            closure: optional callable that re-evaluates the model (zero_grad, forward, backward) and returns the
                loss; it runs before the gradients are read.

        Returns:
            The loss returned by ``closure``, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        inverses = self._preconditioners()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.to(_state_dtype(param))
                if param in inverses:
                    inverse, left = inverses[param]
                    grad = inverse @ grad if left else grad @ inverse
                self._adamw(param, grad, group)
        return loss

    def _preconditioners(self) -> dict[torch.Tensor, tuple[torch.Tensor, bool]]:
        """Inverse preconditioner per factor with a gradient, all built before any weight moves (Jacobi)."""
        batches: dict[tuple[Any, ...], list[_Job]] = defaultdict(list)
        for a, b, group_a, group_b in _pair_lora_factors(self.param_groups, strict=False):
            for target, other, left, group in ((a, b, True, group_a), (b, a, False, group_b)):
                if target.grad is not None:
                    key = (a.shape[0], target.device, _state_dtype(target), group["delta"])
                    batches[key].append((target, other, left))
        inverses: dict[torch.Tensor, tuple[torch.Tensor, bool]] = {}
        for (_, _, dtype, delta), jobs in batches.items():
            grams: list[torch.Tensor] = []
            for _, other, left in jobs:
                x = other.to(dtype)  # r x r products in fp32 even for bf16 factors
                grams.append(x.T @ x if left else x @ x.T)  # BᵀB for the A side, AAᵀ for the B side
            for (target, _, left), inverse in zip(jobs, _damped_inverses(torch.stack(grams), delta), strict=True):
                inverses[target] = (inverse, left)
        return inverses

    def _adamw(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        """AdamW on one tensor in the order of torch.optim.AdamW's single-tensor path."""
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, dtype=grad.dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=grad.dtype, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        lr, weight_decay = group["lr"], group["weight_decay"]
        work = param if param.dtype == grad.dtype else param.to(grad.dtype)
        if weight_decay != 0:
            work.mul_(1 - lr * weight_decay)
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1, bias_correction2 = 1.0, 1.0
        if group["correct_bias"]:
            bias_correction1, bias_correction2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
        denom = state["exp_avg_sq"].sqrt().div_(bias_correction2**0.5).add_(group["eps"])
        work.addcdiv_(state["exp_avg"], denom, value=-lr / bias_correction1)
        if work is not param:
            param.copy_(work)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``, keeping the moments in fp32 where torch would cast them to a bf16 param's dtype.

        Args:
            state_dict: a dict returned by ``state_dict()``.
        """
        super().load_state_dict(state_dict)
        saved_ids = (i for group in state_dict["param_groups"] for i in group["params"])
        id_to_param = dict(zip(saved_ids, (p for group in self.param_groups for p in group["params"]), strict=True))
        for saved_id, saved in state_dict["state"].items():
            param = id_to_param[saved_id]
            for key in ("exp_avg", "exp_avg_sq"):
                self.state[param][key] = saved[key].to(param.device, _state_dtype(param), copy=True)


def _check_sizes(
    lora_shapes: Iterable[tuple[int, int, int]], other_numel: int, param_bytes: int
) -> list[tuple[int, ...]]:
    if param_bytes < 1 or other_numel < 0:
        raise ValueError(f"Invalid param_bytes={param_bytes} or other_numel={other_numel}; use >= 1 and >= 0")
    shapes = [tuple(shape) for shape in lora_shapes]
    for shape in shapes:
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"Invalid LoRA shape {shape}; use positive (rank, in_features, out_features)")
    return shapes


def state_bytes(lora_shapes: Iterable[tuple[int, int, int]], other_numel: int = 0, *, param_bytes: int = 4) -> int:
    """Persistent state of ScaledAdamW in bytes (pure): exp_avg and exp_avg_sq per trainable element.

    Moments are fp32 for fp32/bf16/fp16 parameters (fp64 for fp64); the step counter is a Python int and the
    preconditioners are rebuilt every step (see ``step_temporary_bytes``), so nothing else is kept.

    Args:
        lora_shapes: one (rank, in_features, out_features) per LoRA pair.
        other_numel: element count of the trainable parameters that are not paired LoRA factors.
        param_bytes: bytes per element of the trainable parameters (4 for fp32, 2 for bf16).

    Returns:
        The state size in bytes.

    Raises:
        ValueError: if a shape or param_bytes is not positive, or other_numel is negative.
    """
    shapes = _check_sizes(lora_shapes, other_numel, param_bytes)
    numel = other_numel + sum(rank * (in_features + out_features) for rank, in_features, out_features in shapes)
    return 2 * max(4, param_bytes) * numel


def step_temporary_bytes(
    lora_shapes: Iterable[tuple[int, int, int]], other_numel: int = 0, *, param_bytes: int = 4
) -> int:
    """Upper bound on the bytes ScaledAdamW allocates during one step and frees after it (pure).

    Per pair at most 18 r x r matrices (two inverses kept through the step plus the factorisation workspace).
    The update runs one tensor at a time, so on top comes one tensor's working set: the preconditioned gradient
    and the denominator, plus fp32 copies of the gradient and the parameter when they are not fp32. The
    largest tensor is bounded by ``other_numel`` for unpaired parameters.

    Args:
        lora_shapes: one (rank, in_features, out_features) per LoRA pair.
        other_numel: element count of the trainable parameters that are not paired LoRA factors.
        param_bytes: bytes per element of the trainable parameters (4 for fp32, 2 for bf16).

    Returns:
        The transient size in bytes.

    Raises:
        ValueError: if a shape or param_bytes is not positive, or other_numel is negative.
    """
    shapes = _check_sizes(lora_shapes, other_numel, param_bytes)
    state_item_bytes = max(4, param_bytes)
    largest_numel = max([other_numel] + [rank * max(i, o) for rank, i, o in shapes])
    copies = 2 if param_bytes == state_item_bytes else 4
    preconditioner_bytes = sum(_RR_MATRICES_PER_PAIR * rank * rank for rank, _, _ in shapes) * state_item_bytes
    return copies * state_item_bytes * largest_numel + preconditioner_bytes
