"""Per-sample r x r generalized Fisher for AdaFish, collected by hooks on peft's LoRA linears.

For a LoRA linear y = x Wᵀ (W is lora_A.weight, r x in, or lora_B.weight, out x r), sample i of a backward contributes
G_i = Σ_t dy_{i,t}ᵀ x_{i,t} to the gradient. The statistic is normalised per example: over the N examples of the k
backwards since the last ``pop`` (gradient accumulation; one backward without it)

    lora_A (left):  F = (1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ      (r x r)
    lora_B (right): F = (1/N) Σ_i ∇ℓ_iᵀ ∇ℓ_i      (r x r)

the mean over examples of NG+'s generalized Fisher, whatever the split into micro-batches: the estimate of a step
equals that of one batch of the same N examples, and does not change with the micro-batch x accumulation shape (on
out-of-memory the trainer halves the micro-batch and doubles the accumulation). It assumes what the trainer and HF
do: each backward starts from its micro-batch's mean loss divided by k, so a micro-batch of b examples gives
G_i = ∇ℓ_i / (k b), and the hooks recover ∇ℓ_i = k b G_i by counting the backwards and examples they saw; ℓ_i is the
example's own mean loss, exact when the examples of a micro-batch weigh the same (e.g. equal token counts).
Averaging the k backwards' statistics instead (without undoing 1/k) would make F k² too small under accumulation.

A forward hook keeps the layer input and puts a gradient hook on the output; the statistic is formed when that
gradient arrives, so each capture lives from forward to backward: O(b·T·in) floats per adapted linear.
Under non-reentrant gradient checkpointing the forward runs twice; only the first forward's output is part of the
graph that backward walks, so only its gradient hook fires and nothing is counted twice. A LoRA linear called twice
in one forward (shared weights) would count as two backwards.

Two switches let AdaFish gather statistics only when it uses them: ``armed`` (forward hooks capture inputs only while
set: AdaFish disarms them on steps whose Fisher is not refreshed, ``fisher_every`` > 1, so those steps pin nothing) and
``collecting`` (gradient hooks count only while set: the true Fisher, adafish_true_fisher.py, counts the backward of
labels sampled from the model and not the data backward that follows it through the same graph).
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

    Statistics accumulate over backward passes until ``pop`` reads them (per example, see the module docstring) or
    ``clear`` drops them; ``AdaFish.zero_grad`` clears them with the gradients they belong to.

    Args:
        model: a model with peft LoRA adapters.
    """

    def __init__(self, model: nn.Module) -> None:
        self._sums: dict[int, torch.Tensor] = {}  # id(weight) -> Σ over backwards of b² Σ_i G_i G_iᵀ (r x r)
        self._counts: dict[int, tuple[int, int]] = {}  # id(weight) -> (backwards, examples) since the last pop
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.armed = True  # forward hooks capture inputs (and so pin them until backward) only while True
        self.collecting = True  # gradient hooks add to the statistics only while True
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
        """Return and forget the per-example statistic captured for one LoRA weight.

        Args:
            weight: a ``lora_A.<adapter>.weight`` or ``lora_B.<adapter>.weight`` parameter.

        Returns:
            The fp32 r x r statistic (1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ (left) or ∇ℓ_iᵀ ∇ℓ_i (right) over the N examples of the k
            backwards since the last pop, or None if no backward has reached that weight since then.
        """
        total = self._sums.pop(id(weight), None)
        backwards, examples = self._counts.pop(id(weight), (0, 0))
        # ∇ℓ_i = k·b·G_i: k² here, b² per backward in _accumulate, and 1/N for the mean over examples.
        return None if total is None else total * (backwards**2 / examples)

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
            if not (self.armed and torch.is_grad_enabled() and output.requires_grad):
                return
            inputs = args[0].detach()
            key = id(module.weight)
            # The closure pins this forward's input, so a second forward before backward cannot overwrite it.
            output.register_hook(lambda grad: self._accumulate(key, side, inputs, grad))

        return hook

    def _accumulate(self, key: int, side: str, inputs: torch.Tensor, grad: torch.Tensor) -> None:
        """Add b²·Σ_i of the per-sample r x r products for one backward through one linear, and count it."""
        if not self.collecting:
            return
        batch = inputs.shape[0]
        x = inputs.reshape(batch, -1, inputs.shape[-1]).float()  # (b, T, in_features)
        dy = grad.reshape(batch, -1, grad.shape[-1]).float()  # (b, T, out_features)
        per_sample = torch.einsum("bto,bti->boi", dy, x)  # (b, out_features, in_features)
        if side == "left":
            stat = per_sample @ per_sample.mT  # (b, r, r) for lora_A: out_features = r
        else:
            stat = per_sample.mT @ per_sample  # (b, r, r) for lora_B: in_features = r
        # b² per backward, not one b for the whole step: micro-batches of a step may differ in size (a last, short one).
        stat = stat.sum(dim=0) * batch**2
        backwards, examples = self._counts.get(key, (0, 0))
        self._sums[key] = stat if key not in self._sums else self._sums[key] + stat
        self._counts[key] = (backwards + 1, examples + batch)
