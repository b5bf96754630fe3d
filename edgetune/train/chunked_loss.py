"""Next-token cross-entropy without a [tokens, vocabulary] logits tensor.

A causal LM's logits are tokens x vocabulary: for SmolLM2 at 4 x 256 tokens 0.2 GB in fp32, and transformers'
loss holds bf16 logits, an fp32 copy, fp32 log-probabilities and their gradient at once (12.3 bytes per token per
vocabulary entry, ``edgetune.plan.calibration``), more than the rest of a QLoRA step. Here the decoder runs once,
then only the positions that have a label go through the output head and the loss, ``chunk`` positions at a
time, and each chunk's gradient is computed right away, in the forward pass (the approach of Liger Kernel's fused
linear cross-entropy, written with torch operations): backward then only scales the stored gradients, so no
chunk's logits are computed twice and the step does the same matmuls as the unchunked loss. The peak of the loss
is one chunk's logits, probabilities and their 16-bit copy, plus the gradient of the selected hidden states and,
when the head is trained (full fine-tuning with a tied embedding), an fp32 gradient of the head.

The result equals transformers' ``ForCausalLMLoss`` (logits upcast to fp32, mean over labelled positions): the
gradients match the unchunked loss within 1e-5 relative in fp32 (``tests/train/test_chunked_loss.py``).

Models whose head is not a plain bias-free linear, or which scale or soft-cap their logits (Gemma 2/3, Cohere,
Granite), use the model's own loss instead; ``supports_chunked_loss`` says which.

``causal_lm_loss_and_sampled_grad`` also serves AdaFish's true Fisher (``edgetune.optim.adafish_true_fisher``) from
the same forward: each chunk draws one label per position from the softmax it has just computed, and the gradient of
the mean loss at those labels needs no second matmul, since (softmax − e_ŷ)·W/n = (softmax − e_y)·W/n + (W_y − W_ŷ)/n
is the data gradient already formed plus two gathered rows of the head.
"""

from typing import Any

import torch

from edgetune.optim.adafish_true_fisher import sample_labels, sampled_logits_grad
from edgetune.plan.components import loss_chunk_positions
from edgetune.train.tokens import IGNORE_INDEX

# Config fields that change logits after the head; a model with any of them set keeps its own loss.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions of a batch, as ``model(**batch).loss`` gives it.

    Args:
        model: a causal LM, possibly wrapped by peft.
        batch: ``input_ids`` and ``labels``, with ``attention_mask`` (padded) or ``position_ids`` (packed).

    Returns:
        The scalar loss (fp32); differentiable when grad is enabled.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if not supports_chunked_loss(base):
        return model(**batch).loss
    hidden = _final_hidden(base, batch)
    selected, targets = _labelled(hidden, batch["labels"])
    chunk = loss_chunk_positions(head.weight.shape[0])
    if not torch.is_grad_enabled() or not (selected.requires_grad or head.weight.requires_grad):
        total, count = loss_sum(selected, head.weight, targets, chunk)
        return total / max(count, 1)
    return _ChunkedCrossEntropy.apply(selected, head.weight, targets, chunk, None)[0]


def causal_lm_loss_and_sampled_grad(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``causal_lm_loss``, plus the gradient of the loss at labels drawn from the model, from one forward.

    Args:
        model: a causal LM, possibly wrapped by peft; grad must be enabled.
        batch: as for ``causal_lm_loss``.
        generator: draws one label ŷ per labelled position from the model's softmax there.

    Returns:
        ``(loss, output, sampled_grad)``: the differentiable mean loss at the batch's labels; a tensor of its graph
        (the selected hidden states, or the logits of a model without the chunked loss); and the gradient with respect
        to ``output`` of the mean loss at the drawn labels, (1/n) Σ_t −log p(ŷ_t), n the labelled positions.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not supports_chunked_loss(base):
        outputs = model(**batch)
        # Logit t predicts label t + 1, as transformers' loss shifts them.
        selected = outputs.logits[:, :-1][batch["labels"][:, 1:] != IGNORE_INDEX]
        return outputs.loss, selected, sampled_logits_grad(selected, generator)
    head = base.get_output_embeddings()
    hidden = _final_hidden(base, batch)
    selected, targets = _labelled(hidden, batch["labels"])
    loss, sampled_grad = _ChunkedCrossEntropy.apply(
        selected, head.weight, targets, loss_chunk_positions(head.weight.shape[0]), generator
    )
    return loss, selected, sampled_grad


def supports_chunked_loss(base: torch.nn.Module) -> bool:
    """Whether the model's logits are exactly ``hidden @ head.weight.T``, so the chunked loss equals its own."""
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None or not hasattr(base, "get_decoder"):
        return False
    config = getattr(base, "config", None)
    return not any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)


@torch.no_grad()
def loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` (all labelled), ``chunk`` rows at a time.

    Returns:
        The fp32 sum as a 0-d tensor, and the number of rows.
    """
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        # Only the two row vectors are kept: holding the chunk's buffer too would keep it alive into the next chunk.
        lse, picked = _chunk_logsumexp(hidden[start : start + chunk], weight, targets[start : start + chunk])[:2]
        total += (lse - picked).sum()
    return total, hidden.shape[0]


def _chunk_logsumexp(
    part: torch.Tensor, weight: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-sum-exp and target logit of one chunk's fp32 logits, plus exp(logits - row max) in the same buffer.

    Written out (max, subtract, exp in place) so that the gradient is then formed in that buffer as well: the chunk
    peaks at its fp32 logits plus the 16-bit matmul output they came from (``calibration.CHUNK_LOGIT_BYTES``).
    """
    logits = (part @ weight.T).float()
    picked = logits.gather(1, target.unsqueeze(1)).squeeze(1)
    row_max = logits.amax(dim=1, keepdim=True)
    exp = logits.sub_(row_max).exp_()
    lse = row_max.squeeze(1) + exp.sum(dim=1).log()
    return lse, picked, exp


def streamed_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Sum of next-token cross-entropy over the labelled positions of one batch (no grad), and their count."""
    with torch.no_grad():
        loss = causal_lm_loss(model, batch)
    count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return float(loss) * count, count


def _final_hidden(base: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # Packed rows carry position_ids and no mask; the decoder builds their block-diagonal mask from them, and only
    # without a KV cache.
    return base.get_decoder()(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    )[0]


def _labelled(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states that predict a label (position t predicts label t + 1) and those labels.

    Selecting them first skips the head for prompt, padding and packing-boundary positions altogether.
    """
    # Shifting the labels left by one lines label t + 1 up with position t, so the hidden states stay a view.
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    flat = shifted.reshape(-1)
    keep = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep), flat.index_select(0, keep)


def _head_dtype_copy(probs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``probs`` in the head's dtype; on CPU laid out column-major, which is the same bytes in another order.

    torch's CPU matmul has no fast kernel for a row-major 16-bit [chunk, vocabulary] matrix times the head: on a CPU
    without native bf16 it ran at 0.11 GFLOP/s, 28x slower than the same product with the left matrix column-major
    (7.2 s against 0.26 s for 85 x 49,152 times 49,152 x 576). CUDA's kernels take either layout.
    """
    if weight.device.type != "cpu" or probs.dtype == weight.dtype:
        return probs.to(weight.dtype)
    rows, columns = probs.shape
    return torch.empty_strided((rows, columns), (1, rows), dtype=weight.dtype, device=probs.device).copy_(probs)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T``; gradients computed chunk by chunk during the forward pass.

    Outputs the loss and, given a generator, the gradient with respect to ``hidden`` of the mean loss at labels drawn
    from each position's softmax (an empty tensor without one; not differentiable either way).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        generator: torch.Generator | None,
    ):
        n = max(hidden.shape[0], 1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # The sampled-label gradient is the data one plus a correction, so it needs the data one even when unused.
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] or generator is not None else None
        sampled_grad = torch.empty_like(hidden) if generator is not None else hidden.new_empty(0)
        # The head's gradient sums over every chunk, so it is kept in fp32 until backward.
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], chunk):
            part, target = hidden[start : start + chunk], targets[start : start + chunk]
            lse, picked, exp = _chunk_logsumexp(part, weight, target)
            total += (lse - picked).sum()
            # d(mean loss)/d(logits) = (softmax - one_hot) / n, computed in place over the chunk's fp32 buffer.
            probs = exp.div_(exp.sum(dim=1, keepdim=True))
            drawn = sample_labels(probs, generator) if generator is not None else None
            probs[torch.arange(probs.shape[0], device=probs.device), target] -= 1.0
            grad_logits = _head_dtype_copy(probs.div_(n), weight)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = grad_logits @ weight
            if drawn is not None:
                # (softmax − e_ŷ)·W/n = (softmax − e_y)·W/n + (W_y − W_ŷ)/n: two gathered rows, no matmul.
                rows = (weight.index_select(0, target).float() - weight.index_select(0, drawn).float()) / n
                sampled_grad[start : start + chunk] = grad_hidden[start : start + chunk].float() + rows
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T.float(), part.float())
            del exp, probs, grad_logits
        ctx.save_for_backward(grad_hidden if ctx.needs_input_grad[0] else None, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(sampled_grad)
        return total / n, sampled_grad

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, _grad_sampled: torch.Tensor | None):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None
