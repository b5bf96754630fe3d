"""Reading an exported GGUF back with transformers' GGUF loader and checking it against the merged model.

transformers reads the file with its own code (the ``gguf`` package's reader and dequantizers, its own tensor-name
map and its inverse of llama.cpp's Q/K reordering), so a wrong name, layout or reordering shows up here. The
model is built from the merged model's config rather than the one transformers derives from the GGUF keys,
because its GGUF config map lacks some keys llama.cpp reads (``attention.key_length`` for Qwen3); the weights all
come from the file. A Mistral file is read as the Llama it is to llama.cpp (transformers has no Mistral GGUF map).
Checks, on the sample prompts of ``edgetune.export.logit_checks``:

- ``f16``/``bf16``: every tensor read back must equal the merged weight rounded to the stored type (norms and
  biases are F32), so the file holds exactly the 16-bit merge and runs to its logits; and the logits against the
  float32 adapters must stay within the merged folder's bound for that dtype (``merge.saved_tolerance``).
- quantized types: the logits against the float32 adapters, bounded by the share of positions whose top-1 token
  agrees and by the mean |logit difference| as a share of the largest reference logit (``QUANTIZED_BOUNDS``).
  The largest differences of 4-bit weights are rare outliers, so the maximum is reported, not bounded.
- the tokenizer transformers builds from the GGUF must encode the sample prompts to the run tokenizer's ids
  (reported, not enforced: transformers' GGUF tokenizer is not llama.cpp's, and it drops some pre-tokenizers).

Reference: transformers ``modeling_gguf_pytorch_utils.load_gguf_checkpoint`` and ``integrations/ggml.py``.
"""

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from edgetune.errors import EdgetuneError
from edgetune.export.logit_checks import SAMPLE_TEXTS, LogitCheck, compare_logits, largest_kept_logit, torch_logits
from edgetune.export.merge import MergedRun, saved_tolerance

# (least top-1 agreement, largest mean |logit diff| as a share of the largest reference logit) per type. Measured
# (README, "Deploy") on a 4-step SmolLM2-135M run: q8_0 98% / 0.3%, q5_1 73% / 3.6%, q5_0 81% / 2.3%,
# q4_1 87% / 2.4%, q4_0 54% / 4.8% (a 135M model loses much at 4 bits); the tiny test runs stay above 95% / 1%.
# The 4- and 5-bit bounds catch a broken file (wrong layout: logits as far apart as they are large), not a
# quality bar.
QUANTIZED_BOUNDS: dict[str, tuple[float, float]] = {
    "q8_0": (0.90, 0.01),
    "q5_1": (0.50, 0.06),
    "q5_0": (0.50, 0.06),
    "q4_1": (0.40, 0.08),
    "q4_0": (0.40, 0.08),
}
_DTYPES = {"f16": ("fp16", torch.float16), "bf16": ("bf16", torch.bfloat16)}


def verify_gguf(merged: MergedRun, plan, path: Path, notify: Callable[[str], None]) -> tuple[list[LogitCheck], bool]:
    """Check the GGUF at ``path`` (``plan`` is the ``gguf_export.GgufPlan``); returns the checks and whether the
    tokenizer read back encodes like the run's.

    Raises:
        EdgetuneError: transformers cannot read the file back, or a check fails.
    """
    readback = _read_back(merged, path)
    mask = merged.batch["attention_mask"]
    logits = torch_logits(readback, merged.batch)
    name = f"gguf {plan.gguf_type} read back vs float32 {'adapters' if merged.run.is_lora else 'trained model'}"
    if plan.gguf_type in _DTYPES:
        dtype, torch_dtype = _DTYPES[plan.gguf_type]
        exact = _weights_check(merged.model, readback, torch_dtype, plan.gguf_type)
        check = compare_logits(
            name, merged.reference_logits, logits, mask, saved_tolerance(dtype, merged.reference_logits, mask)
        )
        checks = [*merged.checks, exact, check]
    else:
        min_top1, mean_share = QUANTIZED_BOUNDS[plan.gguf_type]
        mean_bound = mean_share * largest_kept_logit(merged.reference_logits, mask)
        check = compare_logits(
            name, merged.reference_logits, logits, mask, None, mean_tolerance=mean_bound, min_top1=min_top1
        )
        checks = [*merged.checks, check]
    for result in checks[len(merged.checks) :]:
        notify(result.describe())
    failed = [result for result in checks if not result.passed]
    if failed:
        raise EdgetuneError(
            f"the GGUF read back does not reproduce the merged model ({failed[0].describe()})",
            "try a wider type (--gguf-type q8_0 or f16); the adapters and any --merged folder are unaffected",
        )
    return checks, _same_tokenizer(plan.tokenizer, path)


def _read_back(merged: MergedRun, path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = copy.deepcopy(merged.model.config)
    if config.model_type == "mistral":
        # transformers' GGUF loader has no Mistral tensor map, and llama.cpp runs Mistral as Llama: read it as one
        # (the same weights and layers; the sliding window, if any, does not reach across the short sample prompts).
        settings = {key: value for key, value in config.to_dict().items() if key not in ("model_type", "architectures")}
        config = LlamaConfig(**settings)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=config, dtype=torch.float32
        ).eval()
    except (ValueError, KeyError, TypeError, OSError, NotImplementedError, RuntimeError) as exc:
        raise EdgetuneError(
            f"transformers cannot read the written GGUF back ({str(exc).splitlines()[0][:200]})",
            "rerun with --debug and report it; the adapters and any --merged folder are unaffected",
        ) from exc


def _weights_check(merged: torch.nn.Module, readback: torch.nn.Module, dtype: torch.dtype, label: str) -> LogitCheck:
    """Largest |difference| between each tensor read back and the merged one stored as the GGUF stores it."""
    stored = readback.state_dict()
    worst, total, count = 0.0, 0.0, 0
    for name, tensor in merged.state_dict().items():
        expected = tensor.to(dtype).float() if tensor.ndim == 2 else tensor.float()
        diff = (stored[name].float() - expected).abs()
        worst, total, count = max(worst, float(diff.max())), total + float(diff.sum()), count + diff.numel()
    # Expressed as a LogitCheck over weights so that it prints and serializes like every other check.
    return LogitCheck(f"gguf {label} tensors vs the {label} merge (weights)", worst, total / count, 1.0, 0.0)


def _same_tokenizer(tokenizer, path: Path) -> bool:
    from transformers import AutoTokenizer

    try:
        read = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception:  # noqa: BLE001 - a tokenizer transformers cannot rebuild is reported, not fatal
        return False
    texts = list(SAMPLE_TEXTS)
    return all(read(text)["input_ids"] == tokenizer(text)["input_ids"] for text in texts)
