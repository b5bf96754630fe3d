"""True Fisher for AdaFish: r x r statistics of the gradients of labels drawn from the model itself.

The empirical Fisher (``fisher="per_sample"``) takes each example's gradient at the data's labels. The Fisher of the
model's predictive distribution (``fisher="true"``) takes it at labels the model samples, one draw per labelled
position (K-FAC's "sampled" Fisher):

    ŷ_{i,t} ~ softmax(logits_{i,t})          (drawn under no_grad; positions without a label are skipped)
    G̃_i = ∇ (1/T_i) Σ_t −log p_θ(ŷ_{i,t} | x_{i,<t})
    F_A = (1/N) Σ_i G̃_i G̃_iᵀ ,  F_B = (1/N) Σ_i G̃_iᵀ G̃_i       (r x r, PerSampleFisher's per-example normalisation)

so E_ŷ[F_A] = (1/N) Σ_i Σ_y p(y) G_{i,y} G_{i,y}ᵀ for an example with one labelled position (the Fisher summed exactly
over the vocabulary, ``tests/optim/test_adafish_true_fisher.py``). E_ŷ[∇ −log p(ŷ)] = 0, so unlike the empirical
Fisher it holds no squared mean gradient: it is the curvature of the cross-entropy (its generalized Gauss-Newton
matrix), which is what a natural-gradient step divides by.

Reference: alecwangcq/KFAC-Pytorch (``main.py``, ``optimizers/kfac.py``): every ``TCov`` steps it draws
``torch.multinomial(softmax(outputs), 1)`` under no_grad, backpropagates that loss with ``retain_graph=True`` while
its hooks accumulate, zeroes the gradients, then backpropagates the data loss through the same graph.

Why this design (cheapest that keeps ``torch.optim.Optimizer``'s contract):
- The same forward serves both losses: the labels are drawn (by inversion, ``sample_labels``) inside the chunked
  loss's loop, from the softmax it computes anyway (``edgetune.train.chunked_loss``'s
  ``causal_lm_loss_and_sampled_grad``), so there is no second forward and no second output-head matmul. The sampled
  loss's gradient at the selected hidden states needs no matmul either: (softmax − e_ŷ)·W/n =
  (softmax − e_y)·W/n + (W_y − W_ŷ)/n, the data gradient plus two gathered rows of the head.
- The main extra cost is a backward from those hidden states to the LoRA layers, ``torch.autograd.grad`` with
  ``retain_graph=True`` (``SampledFisher.backward``). ``autograd.grad`` returns the factors' gradients instead of adding
  them to ``.grad``, so the data gradient the update uses is untouched and nothing needs zeroing (KFAC-Pytorch's
  ``zero_grad`` in between would also drop an accumulated micro-batch's gradient). retain_graph keeps the forward's
  activations for the data backward; under non-reentrant gradient checkpointing the segments are recomputed again.
- It runs only on the steps whose Fisher is refreshed (``fisher_every``), and the training step drives it
  (``edgetune.train.step.run_step`` asks ``AdaFish.sampled_fisher()``), so ``step()`` stays a plain update that needs no
  closure and no model.
"""

from dataclasses import dataclass

import torch

from edgetune.optim.adafish_hooks import PerSampleFisher

__all__ = ["SampledFisher", "label_generator", "sample_labels", "sampled_logits_grad"]

_SAMPLE_ROWS = 64  # rows per cumulative sum in sample_labels: 64 x vocabulary fp32 at most (12.6 MB at 49,152)


def label_generator(device: torch.device, seed: int, step: int) -> torch.Generator:
    """The generator that draws the labels of one optimizer step.

    Seeded from (seed, step), so a resumed run draws the labels it would have drawn: nothing to save but the step.
    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so the pair is mixed (splitmix64's
    finaliser) into 32 bits that depend on both, the same on every device.

    Args:
        device: where the probabilities live (multinomial needs a generator on the same device).
        seed: AdaFish's ``seed``, in [0, 2³¹).
        step: the optimizer step the labels are for (the next ``step()``'s count).

    Returns:
        A freshly seeded generator.
    """
    mask = 2**64 - 1
    z = ((seed << 32) + step + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return torch.Generator(device=device).manual_seed((z ^ (z >> 31)) & 0xFFFFFFFF)


def sample_labels(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per row drawn from that row's distribution, by inversion of its cumulative sum.

    ŷ = min{y : Σ_{k≤y} p_k > u·Σ_k p_k}, u ~ U[0, 1): exact, with one uniform per row. torch.multinomial draws the
    same distribution but took 135 ms on one CPU thread for 512 x 8192 probabilities, as long as the true Fisher's
    extra backward, against 6 ms here. Scaling u by the row's own sum, and keeping the threshold below it, lets no
    fp32 rounding of the cumulative sum draw past the last class or draw a class of probability 0. The sum is taken
    ``_SAMPLE_ROWS`` rows at a time, so the extra buffer is that many rows of fp32, not the chunk's.

    Args:
        probs: [rows, vocabulary] probabilities (non-negative, each row with a positive sum).
        generator: from ``label_generator``.

    Returns:
        [rows] int64 labels.
    """
    rows = probs.shape[0]
    uniform = torch.rand(rows, 1, generator=generator, device=probs.device, dtype=torch.float32)
    labels = torch.empty(rows, dtype=torch.long, device=probs.device)
    for start in range(0, rows, _SAMPLE_ROWS):
        cdf = probs[start : start + _SAMPLE_ROWS].float().cumsum(dim=1)
        total = cdf[:, -1:]
        threshold = torch.minimum(
            uniform[start : start + _SAMPLE_ROWS] * total, torch.nextafter(total, total.new_zeros(()))
        )
        labels[start : start + _SAMPLE_ROWS] = torch.searchsorted(cdf, threshold, right=True).squeeze(1)
    return labels


@torch.no_grad()
def sampled_logits_grad(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """d/d(logits) of the mean cross-entropy at labels drawn from softmax(logits): (softmax − e_ŷ) / rows.

    For a loss that is a mean cross-entropy over rows of logits the model computes in full (a classification head, a
    verbalizer's few tokens, a model without the chunked loss); pass the result to ``SampledFisher.backward`` with
    ``logits`` as the output.

    Args:
        logits: [rows, classes] logits, part of the forward's graph.
        generator: from ``SampledFisher.generator``.

    Returns:
        The gradient, in the logits' dtype and shape.
    """
    grad = torch.softmax(logits.float(), dim=-1)
    drawn = sample_labels(grad, generator)
    grad[torch.arange(grad.shape[0], device=grad.device), drawn] -= 1.0
    return grad.div_(max(grad.shape[0], 1)).to(logits.dtype)


@dataclass(frozen=True)
class SampledFisher:
    """What a training step needs to feed one step of AdaFish's true Fisher; from ``AdaFish.sampled_fisher()``.

    Attributes:
        generator: draws this step's labels (``sample_labels``).
        weights: the LoRA factors whose statistics AdaFish reads.
        hooks: the PerSampleFisher that forms the statistics during ``backward``.
    """

    generator: torch.Generator
    weights: tuple[torch.Tensor, ...]
    hooks: PerSampleFisher

    def backward(self, output: torch.Tensor, grad_output: torch.Tensor) -> None:
        """Backpropagate the sampled-label loss to the LoRA layers, counting it in the statistics only.

        Call it before the data loss's backward through the same forward: the graph is retained for it.

        Args:
            output: a tensor of the forward's graph (the selected hidden states, or the logits).
            grad_output: d(sampled loss)/d(output), already divided by the accumulation count like the data loss.
        """
        self.hooks.collecting = True
        try:
            # The returned gradients are dropped: only the hooks' per-example statistics are wanted.
            torch.autograd.grad(output, self.weights, grad_output, retain_graph=True, allow_unused=True)
        finally:
            self.hooks.collecting = False
