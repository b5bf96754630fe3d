"""Load a model for training: base precision (fp32, bf16, NF4), LoRA adapters, gradient checkpointing.

The NF4 path deliberately differs from peft's ``prepare_model_for_kbit_training``: that helper casts every
non-quantized parameter (embeddings, lm_head, norms) to fp32, which doubles the embedding and head memory
(bitsandbytes #1569). edgetune keeps them in bf16, the compute dtype, and the planner sizes them that way.
"""

import logging
from dataclasses import dataclass, field

import torch

from edgetune.errors import EdgetuneError
from edgetune.plan.sources import ModelSource
from edgetune.plan.strategies import ALL_LINEAR, DEFAULT_LORA_TARGETS, PRECISIONS, Precision, resolve_targets

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape.

    Attributes:
        rank: adapter rank r (trainable parameters per linear: r * (in + out)).
        alpha: scaling numerator; the adapter output is multiplied by alpha / rank.
        dropout: dropout on the adapter input during training.
        target_modules: names of the linear modules that get adapters.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=DEFAULT_LORA_TARGETS)

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise EdgetuneError(f"LoRA rank must be positive, got {self.rank}", "use a rank such as 8, 16 or 32")
        if not 0 < self.alpha < float("inf"):  # also refuses NaN
            raise EdgetuneError(f"LoRA alpha must be positive, got {self.alpha}", "use alpha = 2 * rank")
        if not 0.0 <= self.dropout < 1.0:  # NaN fails this too
            raise EdgetuneError(f"LoRA dropout must be in [0, 1), got {self.dropout}", "use 0.0 to 0.1")
        if not self.target_modules:
            raise EdgetuneError("LoRA target_modules is empty", f"name linears such as {DEFAULT_LORA_TARGETS[:2]}")


def load_tokenizer(source: ModelSource):  # -> transformers.PreTrainedTokenizerBase
    """Load the tokenizer of a model source, with a pad token (the eos token when the model defines none).

    Raises:
        EdgetuneError: the source has no tokenizer files.
    """
    from transformers import AutoTokenizer

    if not source.has_weights:
        raise EdgetuneError(
            f"{source.path} is an architecture-only source without a tokenizer",
            "pass a model folder with tokenizer files to train; a config.json is enough only for `edgetune plan`",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises bare Exceptions for damaged files
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise EdgetuneError(
            f"cannot load a tokenizer from {source.path} ({reason})",
            "add the tokenizer files (tokenizer.json or tokenizer.model with tokenizer_config.json)",
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source: ModelSource,
    precision: Precision = "bf16",
    *,
    device: str | torch.device = "cpu",
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
) -> torch.nn.Module:
    """Load a causal LM for training.

    Args:
        source: a resolved source with weights.
        precision: ``fp32`` or ``bf16`` for the whole base; ``nf4`` quantizes the decoder linears to 4-bit NF4
            with double quantization and bf16 compute, keeping embeddings, head and norms in bf16.
        device: ``cpu`` or a CUDA device.
        lora: adapters to attach (the base is then frozen); None trains all parameters (full fine-tuning).
        gradient_checkpointing: recompute each decoder layer in backward (non-reentrant, so a frozen base
            still propagates gradients to the adapters without forcing input embeddings to require grad).

    Returns:
        The model, in train mode, with ``use_cache`` off.

    Raises:
        EdgetuneError: the source has no weights, the precision is unknown, or NF4 without LoRA was asked.
    """
    _check_request(source, precision, lora)
    model = load_base(source, precision, device=device)
    model.config.use_cache = False
    if gradient_checkpointing:
        enable_checkpointing(model)
    if lora is not None:
        model = attach_lora(model, lora)
    model.train()
    return model


def load_base(source: ModelSource, precision: Precision, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The pretrained model in ``precision`` exactly as edgetune trains over it, without adapters or checks.

    ``nf4`` is edgetune's QLoRA quantization (``nf4_config``) with the 4-bit layout kept (``keep_4bit_layout``);
    ``fp32`` and ``bf16`` cast the whole model. The exporters load a run's base through this too, so a merge sees
    the weights training saw.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    kwargs: dict[str, object] = {"dtype": torch.float32 if precision == "fp32" else torch.bfloat16}
    if precision == "nf4":
        kwargs["quantization_config"] = nf4_config()
        # bitsandbytes quantizes while loading, so the weights must land on their final device directly.
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    attention = attention_implementation(device, precision)
    if attention is not None:
        kwargs["attn_implementation"] = attention
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        # A damaged or truncated weights file surfaces as one of these, often several lines long.
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise EdgetuneError(
            f"cannot load the weights in {source.path} ({reason})",
            "check the model folder (a complete download, intact .safetensors files) or download it again",
        ) from exc
    if precision == "nf4":
        keep_4bit_layout(model)
    else:
        model.to(device)
    return model


def attention_implementation(device: torch.device, precision: Precision) -> str | None:
    """``flash_attention_2`` where the flash-attn package is installed and can run; None keeps the model's default.

    Packed batches need no change either way: transformers turns their restarting position ids into a
    block-diagonal mask for SDPA and eager attention, and into variable-length sequence offsets for flash attention,
    which then skips the masked blocks instead of computing them. Flash attention runs only on CUDA in 16-bit.
    """
    import importlib.util

    if device.type != "cuda" or precision == "fp32" or importlib.util.find_spec("flash_attn") is None:
        return None
    return "flash_attention_2"


def keep_4bit_layout(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` weight in place at its first forward in
    eval mode without grad (an evaluation), and from then on routes every forward, training included, through
    ``gemv_4bit``, which has no autograd formula: gradients stop flowing through the frozen base linears, so
    the adapters of all but the last layers get wrong gradients (measured: 40% off in layer 0 of a 2-layer model;
    ``tests/test_loading.py``). The repacking also rounds the block scales to bf16. Keeping the original layout
    costs some CPU inference speed and changes nothing on CUDA.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every decoder layer in backward, non-reentrant.

    Non-reentrant checkpointing propagates gradients to adapters inside a frozen layer even when the layer's
    input does not require grad, so the ``enable_input_require_grads`` hook reentrant checkpointing needs
    (and its extra embedding-output gradient) is not used.
    """
    kwargs = {"use_reentrant": False}
    # transformers 5.x renamed the method; the old name still works but warns.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _check_request(source: ModelSource, precision: str, lora: LoraSettings | None) -> None:
    if not source.has_weights:
        raise EdgetuneError(
            f"{source.path} holds no weights, so it cannot be trained",
            "pass a model folder with weights (or the default smollm2-135m); config.json alone is for planning",
        )
    if precision not in PRECISIONS:
        raise EdgetuneError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    if precision == "nf4" and lora is None:
        raise EdgetuneError(
            "an NF4 base cannot be trained without adapters (4-bit weights have no gradients)",
            "add LoRA settings, or load the base in bf16 or fp32 for full fine-tuning",
        )


def nf4_config():  # -> transformers.BitsAndBytesConfig
    """The QLoRA quantization edgetune uses: NF4, double quantization, bf16 compute, bf16 storage of the rest."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.uint8,
    )


def attach_lora(model: torch.nn.Module, lora: LoraSettings) -> torch.nn.Module:
    """Freeze the base and add LoRA adapters (kept in fp32, peft's default, for stable optimizer updates).

    ``target_modules=("all-linear",)`` is peft's "all-linear": every linear layer except the output head.

    Raises:
        EdgetuneError: none of the target modules exist in the model.
    """
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = ALL_LINEAR
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m) and m is not head})
    given = tuple(lora.target_modules)
    # resolve_targets turns all-linear, and the default targets in a family named otherwise, into every linear,
    # which peft's "all-linear" adapts; other targets are names to look up.
    if resolve_targets(given, linear_names) == given:
        missing = [target for target in lora.target_modules if target not in present]
        if len(missing) == len(lora.target_modules):
            raise EdgetuneError(
                f"none of the LoRA target modules {list(lora.target_modules)} exist in this model",
                f"pick from its linear layers: {', '.join(linear_names)}, or all-linear",
            )
        if missing:
            logger.warning("LoRA targets not found in this model and skipped: %s", ", ".join(missing))
        targets = [t for t in lora.target_modules if t not in missing]
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear4bit", "Linear8bitLt"}


def trainable_parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
