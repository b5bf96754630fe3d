"""AdaFish: LoRA optimizer with an r x r generalized-Fisher preconditioner in place of Adam's second moment.

Paper: Jiang Hu and Quanzheng Li, "AdaFish: Fast low-rank parameter-efficient fine-tuning by using second-order
information", arXiv:2403.13128 (2024). Reference code: none public. The paper's update rule is not public either, so
this is the reconstruction "AdaFish-R" of edgetune's lora-optimizers.md section 2.4, following the NG+ lineage
(arXiv:2106.07454) for the generalized Fisher; exponent, damping form, bias correction and weight decay are
design choices, not the paper's.

Update rule, per LoRA pair (peft convention: A = lora_A.weight is r x in, B = lora_B.weight is out x r), step t:

    H_A = g_A g_Aᵀ,  H_B = g_Bᵀ g_B                     (r x r; "batch" Fisher from the batch gradient)
      or the per-sample versions mean_i G_i G_iᵀ / mean_i G_iᵀ G_i  ("per_sample", via PerSampleFisher hooks)
    F ← β2·F + (1−β2)·H ;  M ← β1·M + (1−β1)·g ;  F̂ = F/(1−β2^t) ;  M̂ = M/(1−β1^t)
    every inv_every steps: F̂ = Q diag(Λ) Qᵀ, Λ ← max(Λ, 0), λ = damping·mean(Λ) + 1e-12,
                           P = Q diag((Λ + λ)^(−power)) Qᵀ
    D_A = P_A M̂_A ;  D_B = M̂_B P_B ;  if shape_scale and power == 0.5: D_A ·= √in, D_B ·= √out
    X ← X − lr·(D + weight_decay·X)                      (decoupled weight decay, as AdamW)

Special case (fisher="identity", or power=0 in any mode): F̂ ≡ I gives P = (1 + damping + 1e-12)^(−power)·I, so each
factor moves by lr·c·M̂ with c = (1 + damping)^(−power)·(√fan if the shape scale applies): SGD with AdamW's
bias-corrected first moment and decoupled weight decay, i.e. AdamW with its √v̂ + eps replaced by the constant 1/c.

Per-sample normalisation. G_i is the gradient of example i's own loss ℓ_i, and mean_i runs over the N examples of
the step, however many micro-batches carried them: a step of k accumulated micro-batches (each loss divided by k, as
the trainer does) gets the H of one batch of the N examples. The Fisher is an expectation over examples, so it must
not depend on the micro-batch x accumulation shape, which the trainer may change mid-run; averaging per micro-batch
instead would shrink H k² times and grow the step k times at power ½ (k² at power 1). ``zero_grad`` drops the
hooks' statistics with the gradients, so a backward whose step was skipped does not leak into the next step
(adafish_hooks.py has the derivation).

Pairs are found by name (``...lora_A.<adapter>.weight`` / ``...lora_B.<adapter>.weight``, same param group); other
trainable parameters get torch's AdamW update. Fisher and P are fp32; M has the parameter's dtype, as AdamW's moments.
"""

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, get_args

import torch

from edgetune.errors import EdgetuneError
from edgetune.optim.adafish_hooks import PerSampleFisher
from edgetune.optim.lora_pairs import lora_partner

__all__ = ["AdaFish", "state_bytes"]

logger = logging.getLogger(__name__)

FisherMode = Literal["batch", "per_sample", "identity"]
_FISHER_MODES: tuple[str, ...] = get_args(FisherMode)
_TINY = 1e-12  # keeps (Λ + λ) invertible when a Fisher is exactly zero (B = 0 at initialisation)


def _pair_names(names: list[str], params: list[torch.Tensor]) -> dict[int, tuple[str, str]]:
    """Map id(param) -> (name, side) for LoRA factors paired by name inside one param group."""
    by_name = dict(zip(names, params, strict=True))
    sides: dict[int, tuple[str, str]] = {}
    for name, a in by_name.items():
        role = lora_partner(name)
        if role is None or role[0] != "lora_A" or not name.endswith(".weight"):
            continue
        b_name = role[1]
        b = by_name.get(b_name)
        # Embedding and conv LoRA have other names or shapes; they fall through to AdamW.
        if b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            continue
        if a.requires_grad and b.requires_grad:
            sides[id(a)] = (name, "left")
            sides[id(b)] = (b_name, "right")
    return sides


class AdaFish(torch.optim.Optimizer):
    """Fisher-preconditioned LoRA optimizer (reconstructed AdaFish, see the module docstring).

    Args:
        params: named parameters, e.g. ``model.named_parameters()``, or named param groups.
        lr: learning rate.
        betas: (β1 for the first moment, β2 for the Fisher EMA and AdamW's second moment).
        eps: AdamW epsilon, used only for parameters that are not LoRA factors.
        damping: relative damping; λ = damping · mean eigenvalue of the Fisher.
        power: exponent of the preconditioner (0.5 is Adam-like, 1 is the NG+ natural gradient).
        inv_every: recompute the preconditioner every this many steps.
        fisher: "batch" (from the batch gradient), "per_sample" (needs ``fisher_hooks``) or "identity".
        weight_decay: decoupled weight decay.
        shape_scale: with power 0.5, multiply the step by √fan so AdamW learning rates transfer.
        fisher_hooks: the PerSampleFisher that feeds fisher="per_sample"; None otherwise.

    Raises:
        ValueError: if a hyperparameter is out of range.
        EdgetuneError: if the parameters are unnamed or contain no LoRA pair.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        damping: float = 1e-3,
        power: float = 0.5,
        inv_every: int = 1,
        fisher: FisherMode = "batch",
        weight_decay: float = 0.0,
        shape_scale: bool = True,
        fisher_hooks: PerSampleFisher | None = None,
    ) -> None:
        if (fisher == "per_sample") != (fisher_hooks is not None):
            raise ValueError(
                f"Invalid fisher_hooks for fisher={fisher!r}: {fisher_hooks!r}; pass a PerSampleFisher exactly "
                "when fisher='per_sample' (AdaFish.from_model does it for you)"
            )
        self._factors: dict[int, tuple[str, str]] = {}  # filled by add_param_group, which super() calls
        self.fisher_hooks = fisher_hooks  # public so callers can remove() the hooks
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            damping=damping,
            power=power,
            inv_every=inv_every,
            fisher=fisher,
            weight_decay=weight_decay,
            shape_scale=shape_scale,
        )
        _validate(defaults)
        super().__init__(params, defaults)
        if not self._factors:
            count = sum(len(g["params"]) for g in self.param_groups)
            raise EdgetuneError(
                f"no LoRA pair (...lora_A.<adapter>.weight / ...lora_B.<adapter>.weight) among {count} parameters",
                "apply a peft LoRA adapter to the model first, or use torch.optim.AdamW",
            )
        logger.debug("AdaFish preconditions %d LoRA factors; other parameters get AdamW", len(self._factors))

    @classmethod
    def from_model(cls, model: torch.nn.Module, **kwargs: Any) -> "AdaFish":
        """Build AdaFish over the trainable parameters of a peft LoRA model.

        Args:
            model: the model with LoRA adapters.
            **kwargs: hyperparameters of AdaFish; fisher="per_sample" also registers PerSampleFisher hooks.

        Returns:
            The optimizer; with fisher="per_sample" its hooks are ``optimizer.fisher_hooks``.

        Raises:
            ValueError: if a hyperparameter is out of range.
            EdgetuneError: if the model has no trainable LoRA pair.
        """
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        hooks = PerSampleFisher(model) if kwargs.get("fisher") == "per_sample" else None
        try:
            return cls(named, fisher_hooks=hooks, **kwargs)
        except (ValueError, EdgetuneError):
            if hooks is not None:
                hooks.remove()
            raise

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group and pair its LoRA factors by name.

        Args:
            param_group: a torch param group built from named parameters.

        Raises:
            EdgetuneError: if the group's parameters carry no names.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "param_names" not in group:
            raise EdgetuneError(
                "AdaFish got parameters without names, so it cannot pair lora_A with lora_B",
                "pass model.named_parameters() or use AdaFish.from_model(model)",
            )
        self._factors.update(_pair_names(group["param_names"], group["params"]))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from ``state_dict()``, keeping the r x r statistics in fp32.

        Args:
            state_dict: the optimizer state, as returned by ``state_dict()``.
        """
        # torch casts floating state to the parameter dtype on load; bf16 factors would lose fp32 Fisher precision.
        fp32 = {i: {k: s[k] for k in ("fisher", "precond") if k in s} for i, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        saved_ids = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        for i, p in zip(saved_ids, params, strict=True):
            for key, value in fp32.get(i, {}).items():
                self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients, and with fisher="per_sample" the hooks' statistics gathered with them.

        Args:
            set_to_none: as for ``torch.optim.Optimizer.zero_grad``.
        """
        super().zero_grad(set_to_none=set_to_none)
        # The statistics describe the accumulated gradient: kept past it, a skipped step's backward would be counted
        # in the next step's Fisher, and its micro-batches in the next step's accumulation count.
        if self.fisher_hooks is not None:
            self.fisher_hooks.clear()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Perform one optimization step.

        Args:
            closure: optional; re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.

        Raises:
            EdgetuneError: with fisher="per_sample", if no statistics were captured for a factor that has a gradient.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            factors = [p for p in group["params"] if id(p) in self._factors and p.grad is not None]
            # Gathered before any update, so a missing per-sample statistic leaves every parameter untouched.
            work.append((group, factors, [self._fisher_sample(group, p) for p in factors]))
        for group, factors, samples in work:
            self._adamw(group, [p for p in group["params"] if id(p) not in self._factors and p.grad is not None])
            refresh = [p for p, h in zip(factors, samples, strict=True) if self._update_moments(group, p, h)]
            self._refresh_preconditioners(group, refresh)
            for p in factors:
                self._apply(group, p)
        return loss

    def _update_moments(self, group: dict[str, Any], p: torch.Tensor, fisher_sample: torch.Tensor | None) -> bool:
        """Advance M and F of one factor; return whether its preconditioner is due."""
        beta1, beta2 = group["betas"]
        side = self._factors[id(p)][1]
        state = self.state[p]
        if not state:
            rank = p.shape[0] if side == "left" else p.shape[1]
            eye = torch.eye(rank, dtype=torch.float32, device=p.device)
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["fisher"] = eye.clone() if group["fisher"] == "identity" else torch.zeros_like(eye)
            state["precond"] = eye
        state["step"] += 1
        state["exp_avg"].lerp_(p.grad.to(state["exp_avg"].dtype), 1 - beta1)
        if fisher_sample is not None:
            state["fisher"].mul_(beta2).add_(fisher_sample, alpha=1 - beta2)
        return state["step"] == 1 or state["step"] % group["inv_every"] == 0

    def _fisher_sample(self, group: dict[str, Any], p: torch.Tensor) -> torch.Tensor | None:
        """The r x r Fisher of this step for one factor, in fp32; None when it is frozen at I."""
        name, side = self._factors[id(p)]
        if group["fisher"] == "identity":
            return None
        if group["fisher"] == "per_sample":
            stat = None if self.fisher_hooks is None else self.fisher_hooks.pop(p)
            if stat is None:
                raise EdgetuneError(
                    f"no per-sample Fisher was captured for {name}",
                    "run forward and backward on the model that AdaFish.from_model(model, fisher='per_sample') "
                    "hooked before calling step()",
                )
            return stat
        g = p.grad.float()
        return g @ g.mT if side == "left" else g.mT @ g

    def _refresh_preconditioners(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Recompute P = (F̂ + λI)^-power for the given factors, one batched eigh per rank."""
        by_rank: dict[int, list[torch.Tensor]] = {}
        for p in params:
            by_rank.setdefault(self.state[p]["fisher"].shape[0], []).append(p)
        beta2 = group["betas"][1]
        for same_rank in by_rank.values():
            # F is frozen at I in identity mode, so it gets no bias correction.
            frozen = group["fisher"] == "identity"
            fisher = torch.stack(
                [self.state[p]["fisher"] / (1.0 if frozen else 1 - beta2 ** self.state[p]["step"]) for p in same_rank]
            )
            # (P, r, r): one decomposition for all factors of this rank, no host sync per matrix.
            eigvals, eigvecs = torch.linalg.eigh(fisher)
            eigvals = eigvals.clamp(min=0)
            lam = group["damping"] * eigvals.mean(dim=-1, keepdim=True) + _TINY
            scale = (eigvals + lam).pow(-group["power"])
            precond = (eigvecs * scale.unsqueeze(-2)) @ eigvecs.mT
            for p, new in zip(same_rank, precond.unbind(0), strict=True):
                self.state[p]["precond"].copy_(new)

    def _apply(self, group: dict[str, Any], p: torch.Tensor) -> None:
        """X ← X − lr·(D + weight_decay·X) for one LoRA factor."""
        state = self.state[p]
        _, side = self._factors[id(p)]
        bias_correction1 = 1 - group["betas"][0] ** state["step"]
        m_hat = state["exp_avg"].float() / bias_correction1
        direction = state["precond"] @ m_hat if side == "left" else m_hat @ state["precond"]
        if group["shape_scale"] and group["power"] == 0.5:
            # RMS of (ggᵀ)^-½ g is 1/√fan per element; rescaling makes AdamW learning rates carry over.
            fan = p.shape[1] if side == "left" else p.shape[0]
            direction.mul_(math.sqrt(fan))
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction.to(p.dtype), alpha=-group["lr"])

    def _adamw(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """torch.optim.AdamW's single-tensor update for parameters that are not LoRA factors."""
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            step = state["step"]
            p.mul_(1 - group["lr"] * group["weight_decay"])
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            step_size = group["lr"] / (1 - beta1**step)
            denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
            p.addcdiv_(state["exp_avg"], denom, value=-step_size)


_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("lr", lambda v: 0.0 <= v < math.inf, "a finite lr >= 0"),
    ("betas", lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v), "two values in [0, 1), e.g. (0.9, 0.99)"),
    ("eps", lambda v: 0.0 <= v < math.inf, "a finite eps >= 0, e.g. 1e-8"),
    ("damping", lambda v: 0.0 < v < math.inf, "a finite damping > 0, e.g. 1e-3"),
    ("power", lambda v: 0.0 <= v <= 1.0, "a power in [0, 1] (0.5 Adam-like, 1 natural gradient)"),
    ("inv_every", lambda v: type(v) is int and v >= 1, "an integer >= 1"),
    ("fisher", lambda v: v in _FISHER_MODES, f"one of {', '.join(_FISHER_MODES)}"),
    ("weight_decay", lambda v: 0.0 <= v < math.inf, "a finite weight_decay >= 0"),
    ("shape_scale", lambda v: isinstance(v, bool), "True or False"),
)


def _validate(hyper: dict[str, Any]) -> None:
    """Raise ValueError (torch.optim convention) for an out-of-range hyperparameter."""
    for key, is_valid, fix in _RULES:
        if not is_valid(hyper[key]):
            raise ValueError(f"Invalid {key}: {hyper[key]!r}; use {fix}")


def state_bytes(lora_shapes: Iterable[tuple[int, int, int]], other_numel: int = 0, *, param_bytes: int = 4) -> int:
    """Persistent optimizer state of AdaFish in bytes (pure; step temporaries not counted).

    Per LoRA pair: first moments of A and B in the parameter dtype, plus four fp32 r x r matrices (Fisher and
    preconditioner per factor). Other trainable parameters carry AdamW's two moments.

    Args:
        lora_shapes: one (rank, in_features, out_features) per LoRA pair.
        other_numel: element count of trainable parameters that are not LoRA factors.
        param_bytes: bytes per element of the trainable parameters (4 for fp32, 2 for bf16).

    Returns:
        The state size in bytes.

    Raises:
        ValueError: if a shape, the count or param_bytes is not positive (counts may be 0).
    """
    if param_bytes < 1 or other_numel < 0:
        raise ValueError(f"Invalid param_bytes={param_bytes} or other_numel={other_numel}; use >= 1 and >= 0")
    total_bytes = 2 * param_bytes * other_numel
    for rank, in_features, out_features in lora_shapes:
        if min(rank, in_features, out_features) < 1:
            raise ValueError(f"Invalid LoRA shape {(rank, in_features, out_features)}; use positive sizes")
        total_bytes += param_bytes * rank * (in_features + out_features) + 4 * 4 * rank * rank
    return total_bytes
