"""Held-out loss: token-weighted mean cross-entropy over held-out examples, streamed through the chunked loss
(``edgetune.train.chunked_loss``), so full-vocabulary logits never exist at once."""

import torch

from edgetune.train.batching import batches
from edgetune.train.chunked_loss import streamed_loss_sum


def held_out_loss(
    model: torch.nn.Module,
    examples: list,
    batch_size: int,
    pad_id: int,
    device: torch.device | str,
    max_batches: int | None = None,
) -> float:
    """Token-weighted mean cross-entropy over held-out examples (the first ``max_batches`` batches if given)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for index, batch in enumerate(batches(examples, batch_size, pad_id, shuffle=False)):
        if max_batches is not None and index >= max_batches:
            break
        batch_total, batch_count = streamed_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
        total, count = total + batch_total, count + batch_count
    model.train(was_training)
    return total / max(count, 1)
