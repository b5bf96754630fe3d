"""The loss row of a plan (pure): what the output head and the cross-entropy hold, for each loss implementation.

Four implementations price differently: every logit at once (transformers' own loss), the head in chunks whose
16-bit logits all stay alive (torchtune, litgpt), edgetune's chunked loss that recomputes each chunk in backward
(``train/chunked_loss.py``), and a fused linear cross-entropy that never holds logits (Liger, Cut Cross-Entropy).
"""

from edgetune.plan import calibration
from edgetune.plan.inventory import ModelSpec
from edgetune.plan.plan_types import Component, RunShape
from edgetune.plan.stacks import Stack
from edgetune.plan.strategies import DTYPE_BYTES, Strategy


def loss_chunk_positions(vocab_size: int) -> int:
    """Positions whose logits edgetune's chunked loss computes at once (``edgetune.train.chunked_loss``).

    About ``calibration.LOSS_CHUNK_LOGITS`` logits per chunk, at least 16 positions: 85 for SmolLM2's 49,152
    entries, 32 for Llama 3's 128,256.
    """
    return max(16, calibration.LOSS_CHUNK_LOGITS // max(vocab_size, 1))


def head_bytes(strategy: Strategy, stack: Stack) -> int:
    """Bytes per head weight, hence per logit the head produces: NF4 bases keep the head unquantized."""
    return stack.unquantized_bytes if strategy.base == "nf4" else DTYPE_BYTES[strategy.base]


def loss_component(spec: ModelSpec, strategy: Strategy, run: RunShape, stack: Stack, *, backprop: bool) -> Component:
    """The loss row for a training step (``backprop``) or a forward-only step."""
    vocab, tokens = spec.vocab_size, run.tokens
    if stack.loss == "full":
        per_logit = stack.logits_bytes_backprop if backprop else stack.logits_bytes_forward
        note = "logits, fp32 loss and its gradient" if backprop else "no-grad forward: logits and fp32 loss"
        return Component("logits", round(per_logit * tokens * vocab), False, note)
    width = head_bytes(strategy, stack)
    # The labelled positions' hidden states are copied out (every position, at most); backprop adds their gradient.
    hidden = (2 if backprop else 1) * tokens * spec.hidden_size * width
    if stack.loss == "fused":
        return Component("logits", hidden, False, "fused linear cross-entropy: no logits held")
    if not stack.chunked_loss:
        chunk = -(-tokens // stack.loss_chunks) if stack.loss_chunks else min(stack.loss_chunk_positions, tokens)
        kept = stack.loss_kept_bytes * tokens * vocab
        working = (8 if backprop else 4) * chunk * vocab  # one chunk's fp32 upcast and its fp32 gradient
        note = f"16-bit logits of every position, one chunk of {chunk} positions in fp32"
        return Component("logits", round(kept + working), False, note)
    chunk = min(loss_chunk_positions(vocab), tokens)
    mode = "forward" if not backprop else "frozen head" if strategy.lora else "trained head"
    per_logit = calibration.CHUNK_LOGIT_BYTES[(width, mode)]
    head_gradient = 4 * vocab * spec.hidden_size if backprop and not strategy.lora else 0
    total = round(per_logit * chunk * vocab) + hidden + head_gradient
    return Component("logits", total, False, f"chunked loss: {chunk} positions of logits at a time")
