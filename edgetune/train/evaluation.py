"""Held-out loss computed in chunks of positions, so full-vocabulary logits never exist at once.

A causal LM's logits are batch x sequence x vocabulary; for SmolLM2 at 4 x 256 tokens that is 200 MB in fp32,
more than the rest of an evaluation step. Running the decoder once and the output head plus cross-entropy on
128 positions at a time keeps evaluation far below the training step's peak.
"""

import torch

from edgetune.train.batching import batches

CHUNK_POSITIONS = 128


@torch.no_grad()
def streamed_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Sum of next-token cross-entropy over the labelled positions of one batch, and how many there were."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Packed rows carry position_ids and no mask; the decoder builds their block-diagonal mask from them.
    hidden = base.get_decoder()(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,  # with a cache, transformers would not read packed position ids as separate sequences
    )[0]
    head = base.get_output_embeddings()
    targets = batch["labels"][:, 1:]
    total, count = 0.0, 0
    for start in range(0, targets.shape[1], CHUNK_POSITIONS):
        chunk_targets = targets[:, start : start + CHUNK_POSITIONS]
        logits = head(hidden[:, start : start + chunk_targets.shape[1]]).float()
        total += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), chunk_targets.reshape(-1), ignore_index=-100, reduction="sum"
            )
        )
        count += int((chunk_targets != -100).sum())
    return total, count


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
