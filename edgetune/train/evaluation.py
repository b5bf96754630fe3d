"""What an evaluation measures: the held-out loss, streamed through the chunked loss (``train.chunked_loss``) so
full-vocabulary logits never exist at once, and greedy answers to ``eval.prompts`` so a user sees what it means."""

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


def answer_prompts(
    model: torch.nn.Module, tokenizer, prompts: tuple[str, ...], max_new_tokens: int, device: torch.device | str
) -> list[dict[str, str]]:
    """Greedy answers of the model as it is now, one per prompt, with the run's chat template (KV cache on)."""
    from edgetune.train.chat_templates import generation_prompt

    was_training = model.training
    model.eval()
    answers = []
    for prompt in prompts:
        ids = torch.tensor([generation_prompt(tokenizer, [{"role": "user", "content": prompt}])], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers.append({"prompt": prompt, "answer": tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)})
    model.train(was_training)
    return answers
