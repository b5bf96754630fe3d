"""Per-sample r x r generalized Fisher for AdaFish, collected by hooks on peft's LoRA linears.

For a LoRA linear y = x Wᵀ (W is lora_A.weight, r x in, or lora_B.weight, out x r), sample i contributes
G_i = Σ_t dy_{i,t}ᵀ x_{i,t} to the batch gradient. Following NG+ (the loss is a batch mean, so the per-sample gradient
is b·G_i) the statistics are

    lora_A (left):  F = mean_i (b G_i)(b G_i)ᵀ = b Σ_i G_i G_iᵀ      (r x r)
    lora_B (right): F = mean_i (b G_i)ᵀ(b G_i) = b Σ_i G_iᵀ G_i      (r x r)

which equal mean_i ∇ℓ_i ∇ℓ_iᵀ (resp. ∇ℓ_iᵀ ∇ℓ_i) exactly when the loss is the mean of per-sample losses ℓ_i.
A forward hook keeps the layer input and puts a gradient hook on the output; the statistic is formed when that
gradient arrives, so each capture lives from forward to backward: O(b·T·in) floats per adapted linear.
Under non-reentrant gradient checkpointing the forward runs twice; only the first forward's output is part of the
graph that backward walks, so only its gradient hook fires and nothing is counted twice.
"""

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["PerSampleFisher"]

_LORA_LINEAR = re.compile(r"\.lora_([AB])\.[^.]+$")


class PerSampleFisher:
    """Registers hooks on every peft ``lora_A.<adapter>`` / ``lora_B.<adapter>`` linear of a model.

    Statistics accumulate over backward passes until ``pop`` reads them (their mean over those backwards).

    Args:
        model: a model with peft LoRA adapters.
    """

    def __init__(self, model: nn.Module) -> None:
        self._sums: dict[int, torch.Tensor] = {}  # id(weight) -> summed r x r statistic
        self._counts: dict[int, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, module in model.named_modules():
            match = _LORA_LINEAR.search(name)
            if match is None or not isinstance(module, nn.Linear):
                continue
            side = "left" if match.group(1) == "A" else "right"
            self._handles.append(module.register_forward_hook(self._forward_hook(side)))

    @property
    def num_hooked(self) -> int:
        """Number of LoRA linears carrying a hook."""
        return len(self._handles)

    def pop(self, weight: torch.Tensor) -> torch.Tensor | None:
        """Return and forget the mean statistic captured for one LoRA weight.

        Args:
            weight: a ``lora_A.<adapter>.weight`` or ``lora_B.<adapter>.weight`` parameter.

        Returns:
            The fp32 r x r statistic, or None if no backward has reached that weight since the last pop.
        """
        total = self._sums.pop(id(weight), None)
        count = self._counts.pop(id(weight), 0)
        return None if total is None else total / count

    def clear(self) -> None:
        """Forget all captured statistics (e.g. after a skipped optimizer step)."""
        self._sums.clear()
        self._counts.clear()

    def remove(self) -> None:
        """Remove all hooks and captured statistics."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def _forward_hook(self, side: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        """Build the forward hook of one LoRA linear."""

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            inputs = args[0].detach()
            key = id(module.weight)
            # The closure pins this forward's input, so a second forward before backward cannot overwrite it.
            output.register_hook(lambda grad: self._accumulate(key, side, inputs, grad))

        return hook

    def _accumulate(self, key: int, side: str, inputs: torch.Tensor, grad: torch.Tensor) -> None:
        """Add b·Σ_i of the per-sample r x r products for one backward through one linear."""
        batch = inputs.shape[0]
        x = inputs.reshape(batch, -1, inputs.shape[-1]).float()  # (b, T, in_features)
        dy = grad.reshape(batch, -1, grad.shape[-1]).float()  # (b, T, out_features)
        per_sample = torch.einsum("bto,bti->boi", dy, x)  # (b, out_features, in_features)
        if side == "left":
            stat = per_sample @ per_sample.mT  # (b, r, r) for lora_A: out_features = r
        else:
            stat = per_sample.mT @ per_sample  # (b, r, r) for lora_B: in_features = r
        stat = stat.sum(dim=0) * batch
        if key in self._sums:
            self._sums[key] += stat
            self._counts[key] += 1
        else:
            self._sums[key] = stat
            self._counts[key] = 1
