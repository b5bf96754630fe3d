"""Comparing two models' logits on the same prompts: the numeric checks behind every export.

Only positions the attention mask keeps are compared: a padded query row has nothing to attend to, so its
output is arbitrary in every runtime and says nothing about the model.
"""

from dataclasses import asdict, dataclass

import torch

# Prompts of different lengths (so a batch has padding) in the registers a fine-tune usually sees.
SAMPLE_TEXTS: tuple[str, ...] = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of "
    "a wife.",
    "The capital of France is",
    "Question: What is 12 times 7?\nAnswer:",
    "def fibonacci(n):\n    ",
)
GREEDY_PROMPT = "Mr. Bennet was so odd a mixture of quick parts, sarcastic humour,"


@dataclass(frozen=True)
class LogitCheck:
    """How far a candidate's logits are from a reference's, and whether that is within the stated tolerance.

    Attributes:
        name: what is compared with what.
        max_abs_diff: largest absolute logit difference over the kept positions.
        mean_abs_diff: mean absolute difference over the kept positions and the vocabulary.
        top1_agreement: share of kept positions where both pick the same next token.
        tolerance: the bound on ``max_abs_diff`` the check asserts (None: not bounded).
        mean_tolerance: the bound on ``mean_abs_diff`` (None: not bounded); for quantized weights, whose
            largest differences are rare outliers.
        min_top1: the least ``top1_agreement`` the check asserts (None: not bounded).
    """

    name: str
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    tolerance: float | None
    mean_tolerance: float | None = None
    min_top1: float | None = None

    @property
    def passed(self) -> bool:
        return (
            (self.tolerance is None or self.max_abs_diff <= self.tolerance)
            and (self.mean_tolerance is None or self.mean_abs_diff <= self.mean_tolerance)
            and (self.min_top1 is None or self.top1_agreement >= self.min_top1)
        )

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"passed": self.passed}

    def describe(self) -> str:
        verdict = " ok" if self.passed else " FAILED"
        bound = "reported only" if self.tolerance is None else f"tolerance {self.tolerance:.3g}"
        mean = "" if self.mean_tolerance is None else f" (bound {self.mean_tolerance:.3g})"
        top1 = "" if self.min_top1 is None else f" (at least {self.min_top1:.0%})"
        # A max-bounded check says its verdict next to that bound; mean- and top-1-bounded ones at the end.
        early = verdict if self.tolerance is not None else ""
        late = verdict if self.tolerance is None and (mean or top1) else ""
        return (
            f"{self.name}: max |diff| {self.max_abs_diff:.3g} ({bound}){early}, mean {self.mean_abs_diff:.3g}{mean}, "
            f"same top-1 token at {self.top1_agreement:.1%} of positions{top1}{late}"
        )


def sample_batch(tokenizer, texts: tuple[str, ...] = SAMPLE_TEXTS) -> dict[str, torch.Tensor]:
    """The sample prompts as one right-padded batch (input_ids and attention_mask, int64)."""
    encoded = tokenizer(list(texts), return_tensors="pt", padding=True)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def compare_logits(
    name: str,
    reference: torch.Tensor,
    candidate: torch.Tensor,
    mask: torch.Tensor,
    tolerance: float | None,
    *,
    mean_tolerance: float | None = None,
    min_top1: float | None = None,
) -> LogitCheck:
    """Compare ``[batch, seq, vocab]`` logits at the positions where ``mask`` is 1."""
    kept = mask.bool()
    ref, cand = reference.float()[kept], candidate.float()[kept]
    diff = (ref - cand).abs()
    agree = (ref.argmax(-1) == cand.argmax(-1)).float().mean()
    return LogitCheck(name, float(diff.max()), float(diff.mean()), float(agree), tolerance, mean_tolerance, min_top1)


def largest_kept_logit(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """The largest |logit| at kept positions: the scale that relative tolerances are taken against."""
    return float(logits[mask.bool()].abs().max())


@torch.no_grad()
def torch_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a causal LM without a KV cache, as a CPU float32 tensor."""
    model.eval()
    device = next(model.parameters()).device
    inputs = {key: value.to(device) for key, value in batch.items()}
    return model(**inputs, use_cache=False).logits.float().cpu()


@torch.no_grad()
def torch_greedy(model: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> list[int]:
    """``tokens`` greedy tokens from torch's own ``generate`` with its KV cache, never stopping early at eos."""
    from transformers import GenerationConfig

    # A fresh config: the model's own may sample or penalise repeats. An empty eos list (None would be filled in
    # from the model's generation config) keeps generate from stopping early or from banning eos via min_new_tokens.
    config = GenerationConfig(do_sample=False, max_new_tokens=tokens, eos_token_id=[], pad_token_id=0)
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    return out[0, prompt.shape[1] :].tolist()
