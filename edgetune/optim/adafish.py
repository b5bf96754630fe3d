"""AdaFish: LoRA optimizer with an r x r generalized-Fisher preconditioner in place of Adam's second moment.

Paper: Jiang Hu and Quanzheng Li, "AdaFish: Fast low-rank parameter-efficient fine-tuning by using second-order
information", arXiv:2403.13128 (2024). Reference code: none public. The paper's update rule is not public either, so
this is the reconstruction "AdaFish-R" of edgetune's lora-optimizers.md section 2.4, following the NG+ lineage
(arXiv:2106.07454) for the generalized Fisher; exponent, damping form, bias correction and weight decay are
design choices, not the paper's, and so are the options (adafish_options.py), which exist to explore them.

Update rule, per LoRA pair (peft convention: A = lora_A.weight is r x in, B = lora_B.weight is out x r), step t:

    H_A, H_B (r x r), by ``fisher``:
      "batch":       H_A = g_A g_Aᵀ,  H_B = g_Bᵀ g_B            from the batch gradient
      "per_sample":  mean_i G_i G_iᵀ / mean_i G_iᵀ G_i          empirical, via PerSampleFisher hooks
      "true":        the same with labels drawn from the model  (adafish_true_fisher.py; the training step feeds it)
      "identity":    F ≡ I
    if t is a Fisher step, (t − 1) % fisher_every == 0, or F has had no non-zero H yet (lora_A while B = 0):
        if H ≠ 0 or n > 0:  F ← β_F·F + (1−β_F)·H ;  n ← n + 1   β_F = fisher_beta (None: betas[1]); F₀ = 0, n₀ = 0
    M ← β1·M + (1−β1)·g ;  M̂ = M/(1−β1^t) ;  F̂ = F/(1−β_F^n)
    if (n > 0 or fisher == "identity") and (t == 1 or t % inv_every == 0 or n just became 1):   (P₀ = I)
        F̂ = Q diag(Λ) Qᵀ, Λ ← max(Λ, 0), λ = δ_t·mean(Λ) + 1e-12,  P = Q diag((Λ + λ)^(−power)) Qᵀ
    D_A = P_A M̂_A ;  D_B = M̂_B P_B
    graft="adamw":                   D ← D · ‖U‖_F / ‖D‖_F per factor, U = M̂ / (√v̂ + eps) AdamW's update,
                                     v ← β2·v + (1−β2)·g², v̂ = v/(1−β2^t)
    otherwise, shape_scale and power == 0.5:   D_A ·= √in, D_B ·= √out
    X ← X − lr·(D + weight_decay·X)                           (decoupled weight decay, as AdamW)

Every option is a param-group hyperparameter, saved and restored by ``state_dict``; adafish_options.py says why each
exists and what it costs. adafish_factor.py holds the per-factor maths above.

Special case (fisher="identity", or power=0 in any mode): F̂ ≡ I gives P = (1 + δ + 1e-12)^(−power)·I, so each
factor moves by lr·c·M̂ with c = (1 + damping)^(−power)·(√fan if the shape scale applies): SGD with AdamW's
bias-corrected first moment and decoupled weight decay, i.e. AdamW with its √v̂ + eps replaced by the constant 1/c.

Per-sample normalisation: G_i is the gradient of example i's own loss and mean_i runs over the N examples of the
step, however many accumulated micro-batches carried them, so the Fisher does not depend on the micro-batch x
accumulation shape; ``zero_grad`` drops the hooks' statistics with the gradients (adafish_hooks.py derives both).

Pairs are found by name (``...lora_A.<adapter>.weight`` / ``...lora_B.<adapter>.weight``, same param group); other
trainable parameters get torch's AdamW update. Fisher and P are fp32; M (and v) have the parameter's dtype, as
AdamW's moments.
"""

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from edgetune.errors import EdgetuneError
from edgetune.optim.adafish_factor import apply_step, batch_fisher, init_state, refresh_preconditioners, update_moments
from edgetune.optim.adafish_hooks import PerSampleFisher
from edgetune.optim.adafish_options import (
    HOOKED_MODES,
    DampingSchedule,
    FisherMode,
    Graft,
    fisher_due,
    state_bytes,
    validate,
)
from edgetune.optim.adafish_true_fisher import SampledFisher, label_generator
from edgetune.optim.lora_pairs import factor_sides

__all__ = ["AdaFish", "state_bytes"]

logger = logging.getLogger(__name__)


class AdaFish(torch.optim.Optimizer):
    """Fisher-preconditioned LoRA optimizer (reconstructed AdaFish, see the module docstring for every formula).

    Args:
        params: named parameters, e.g. ``model.named_parameters()``, or named param groups.
        lr: learning rate.
        betas: (β1 for the first moment, β2 for AdamW's second moment and, unless fisher_beta is set, the Fisher EMA).
        eps: AdamW epsilon, for parameters that are not LoRA factors and for the graft.
        damping: relative damping δ; λ = δ · mean eigenvalue of the Fisher (the start value of a damping schedule).
        power: exponent of the preconditioner, in [0, 1] (0.5 is Adam-like, 1 is the NG+ natural gradient).
        inv_every: recompute the preconditioner every this many steps.
        fisher: "batch" (from the batch gradient), "per_sample" (empirical, needs ``fisher_hooks``), "true" (labels
            sampled from the model, needs ``fisher_hooks`` and a step that calls ``sampled_fisher``) or "identity".
        weight_decay: decoupled weight decay.
        shape_scale: with power 0.5 and no graft, multiply the step by √fan so AdamW learning rates transfer.
        fisher_hooks: the PerSampleFisher that feeds fisher="per_sample" or "true"; None otherwise.
        fisher_beta: EMA rate of the Fisher; None uses betas[1].
        fisher_every: refresh the Fisher at steps 1, 1 + k, 1 + 2k, ... for k = fisher_every.
        damping_schedule: "constant", "linear" or "exponential" (from damping to damping_final).
        damping_final: the relative damping reached after damping_steps steps; needed by a schedule.
        damping_steps: steps over which a schedule moves the damping.
        graft: "adamw" rescales each factor's step to the norm of AdamW's; "none" keeps the preconditioned norm.
        seed: seeds the label draws of fisher="true".

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
        *,
        fisher_beta: float | None = None,
        fisher_every: int = 1,
        damping_schedule: DampingSchedule = "constant",
        damping_final: float | None = None,
        damping_steps: int = 100,
        graft: Graft = "none",
        seed: int = 0,
    ) -> None:
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
            fisher_beta=fisher_beta,
            fisher_every=fisher_every,
            damping_schedule=damping_schedule,
            damping_final=damping_final,
            damping_steps=damping_steps,
            graft=graft,
            seed=seed,
        )
        self._check(defaults)
        super().__init__(params, defaults)
        if not self._factors:
            count = sum(len(g["params"]) for g in self.param_groups)
            raise EdgetuneError(
                f"no LoRA pair (...lora_A.<adapter>.weight / ...lora_B.<adapter>.weight) among {count} parameters",
                "apply a peft LoRA adapter to the model first, or use torch.optim.AdamW",
            )
        self._arm_hooks()
        logger.debug("AdaFish preconditions %d LoRA factors; other parameters get AdamW", len(self._factors))

    @classmethod
    def from_model(cls, model: torch.nn.Module, **kwargs: Any) -> "AdaFish":
        """Build AdaFish over the trainable parameters of a peft LoRA model.

        Args:
            model: the model with LoRA adapters.
            **kwargs: hyperparameters of AdaFish; fisher="per_sample" or "true" also registers PerSampleFisher hooks.

        Returns:
            The optimizer; with a hooked fisher mode its hooks are ``optimizer.fisher_hooks``.

        Raises:
            ValueError: if a hyperparameter is out of range.
            EdgetuneError: if the model has no trainable LoRA pair.
        """
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        hooks = PerSampleFisher(model) if kwargs.get("fisher") in HOOKED_MODES else None
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
            ValueError: if a hyperparameter of the group is out of range.
            EdgetuneError: if the group's parameters carry no names.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check(group)
        if "param_names" not in group:
            raise EdgetuneError(
                "AdaFish got parameters without names, so it cannot pair lora_A with lora_B",
                "pass model.named_parameters() or use AdaFish.from_model(model)",
            )
        self._factors.update(factor_sides(group["param_names"], group["params"]))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from ``state_dict()``, keeping the r x r statistics in fp32.

        Args:
            state_dict: the optimizer state, as returned by ``state_dict()``.

        Raises:
            ValueError: if the saved hyperparameters are invalid or need hooks this optimizer lacks (or the reverse).
        """
        # torch casts floating state to the parameter dtype on load; bf16 factors would lose fp32 Fisher precision.
        fp32 = {i: {k: s[k] for k in ("fisher", "precond") if k in s} for i, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)  # a state saved before this option existed ran with its default
            self._check(group)
        saved_ids = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        for i, p in zip(saved_ids, params, strict=True):
            for key, value in fp32.get(i, {}).items():
                self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)
            if "fisher" in self.state[p]:  # a state saved before these keys existed: every step was a Fisher step
                self.state[p].setdefault("fisher_updates", self.state[p]["step"])
                self.state[p].setdefault("fisher_ready", True)
        self._arm_hooks()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients, and with a hooked fisher mode the hooks' statistics gathered with them.

        Args:
            set_to_none: as for ``torch.optim.Optimizer.zero_grad``.
        """
        super().zero_grad(set_to_none=set_to_none)
        # The statistics describe the accumulated gradient: kept past it, a skipped step's backward would be counted
        # in the next step's Fisher, and its micro-batches in the next step's accumulation count.
        if self.fisher_hooks is not None:
            self.fisher_hooks.clear()

    def fisher_due(self) -> bool:
        """Whether the next ``step()`` refreshes the Fisher of some factor (so its forward and backward gather).

        True on the Fisher steps of ``fisher_every``, and on every step while a factor's Fisher has had only zero
        statistics (lora_A's while B = 0; adafish_factor.update_moments says why).
        """
        step = self._next_step()
        waiting = any(not s.get("fisher_ready", False) for p, s in self.state.items() if id(p) in self._factors)
        return any(g["fisher"] != "identity" and (waiting or fisher_due(g, step)) for g in self.param_groups)

    def sampled_fisher(self) -> SampledFisher | None:
        """What the training step needs to feed the next step's true Fisher, or None when it takes none.

        The step calls it before its forward passes and, for each micro-batch, backpropagates the sampled-label loss
        through ``SampledFisher.backward`` before the data loss (``edgetune.train.step.run_step`` does).

        Returns:
            The request (generator, weights, hooks) with fisher="true" on a Fisher step; None otherwise.
        """
        if not any(g["fisher"] == "true" for g in self.param_groups) or not self.fisher_due():
            return None
        if self.fisher_hooks is None:  # _check makes this unreachable; it narrows the type
            return None
        weights = tuple(p for g in self.param_groups for p in g["params"] if id(p) in self._factors)
        generator = label_generator(weights[0].device, self.param_groups[0]["seed"], self._next_step())
        return SampledFisher(generator, weights, self.fisher_hooks)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Perform one optimization step.

        Args:
            closure: optional; re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.

        Raises:
            EdgetuneError: with a hooked fisher mode on a Fisher step, if no statistics were captured for a factor
                that has a gradient.
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
            for p in factors:
                if not self.state[p]:
                    self.state[p].update(init_state(p, self._factors[id(p)][1], group["fisher"]))
            due = [p for p, h in zip(factors, samples, strict=True) if update_moments(self.state[p], p.grad, group, h)]
            refresh_preconditioners([self.state[p] for p in due], group)
            for p in factors:
                apply_step(p, self.state[p], self._factors[id(p)][1], group)
        self._arm_hooks()
        return loss

    def _check(self, hyper: dict[str, Any]) -> None:
        """Validate one group's hyperparameters, and that hooks exist exactly for the hooked fisher modes."""
        validate(hyper)
        if (hyper["fisher"] in HOOKED_MODES) != (self.fisher_hooks is not None):
            raise ValueError(
                f"Invalid fisher_hooks for fisher={hyper['fisher']!r}: {self.fisher_hooks!r}; pass a PerSampleFisher "
                "exactly when fisher is 'per_sample' or 'true' (AdaFish.from_model does it for you)"
            )

    def _next_step(self) -> int:
        """The count (from 1) that the next step() gives the LoRA factors."""
        return 1 + max((s.get("step", 0) for p, s in self.state.items() if id(p) in self._factors), default=0)

    def _arm_hooks(self) -> None:
        """Set the hooks for the next step: capture only if it is a Fisher step; count every backward for the
        empirical Fisher, only ``SampledFisher.backward`` for the true one."""
        if self.fisher_hooks is not None:
            self.fisher_hooks.armed = self.fisher_due()
            self.fisher_hooks.collecting = any(g["fisher"] == "per_sample" for g in self.param_groups)

    def _fisher_sample(self, group: dict[str, Any], p: torch.Tensor) -> torch.Tensor | None:
        """The r x r Fisher of this step for one factor, in fp32; None when F is not refreshed at this step."""
        name, side = self._factors[id(p)]
        state = self.state.get(p, {})  # .get: the state is a defaultdict
        step = state.get("step", 0) + 1
        hooked = group["fisher"] in HOOKED_MODES and self.fisher_hooks is not None
        stat = self.fisher_hooks.pop(p) if hooked else None  # popped on every step: nothing outlives its step
        # A factor whose Fisher has seen only zeros (lora_A while B = 0) asks for one every step until it gets one.
        due = fisher_due(group, step) or not state.get("fisher_ready", False)
        if group["fisher"] == "identity" or not due:
            return None
        if group["fisher"] == "batch":
            return batch_fisher(p.grad, side)
        if stat is None:
            how = (
                "run forward and backward on the model that AdaFish.from_model(model, fisher='per_sample') hooked"
                if group["fisher"] == "per_sample"
                else "train with edgetune.train.step.run_step, or call SampledFisher.backward from "
                "optimizer.sampled_fisher() for each micro-batch"
            )
            kind = "per-sample" if group["fisher"] == "per_sample" else "true (sampled-label)"
            raise EdgetuneError(f"no {kind} Fisher was captured for {name} at step {step}", how)
        return stat

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
