"""What differs between fine-tuning tools when they run the same model: the planner's stack presets (pure data).

The same run (model, method, precision, optimizer, batch x sequence) needs different memory in different tools,
because each makes a few storage and kernel choices differently: the adapters' dtype and whether their input is
copied, the fp32 upcast of ``prepare_model_for_kbit_training``, how the loss meets the vocabulary, where
checkpoints live, and fused kernels. ``edgetune plan --stack NAME`` prices a run with that tool's choices, read
from its public code (the source is named beside each preset). The facts are exact where they follow from code
(dtypes, what is stored); the two numbers that are not, ``activation_scale`` and the loss bytes of ``full``, are
marked calibrated and are re-measured by ``python bench/planner_accuracy.py``.
"""

from dataclasses import dataclass, replace
from typing import Literal

from edgetune.errors import EdgetuneError
from edgetune.plan import calibration

LossKind = Literal["full", "chunked", "fused"]
LOSS_KINDS: tuple[LossKind, ...] = ("full", "chunked", "fused")
Checkpointing = Literal["on", "off", "offload"]
CHECKPOINTING: tuple[Checkpointing, ...] = ("on", "off", "offload")


@dataclass(frozen=True)
class Stack:
    """How a software stack stores and computes a fine-tuning step.

    Attributes:
        name: the preset's name (``edgetune``, ``hf``, ...).
        device: "cuda" or "cpu" (torch's AdamW temporaries differ: foreach on CUDA, per tensor on CPU).
        adapter_bytes: bytes per LoRA weight (peft keeps adapters in fp32 next to a 16-bit base).
        adapter_input_copy: each adapter keeps a copy of its input in the adapter dtype for its weight gradient
            (peft's fp32 adapters do; fused LoRA kernels and 16-bit adapters read the base layer's own input).
        unquantized_bytes: bytes per embedding, head and norm weight next to an NF4 base.
        double_quant: NF4 with double quantization of the block scales.
        loss: "full" holds every logit (``logits_bytes_*`` per logit); "chunked" splits positions into chunks
            (``loss_chunks`` equal chunks, or ``loss_chunk_positions`` positions each, or edgetune's own chunk
            size when both are 0) and keeps ``loss_kept_bytes`` per logit of all positions; "fused" never
            materialises logits (fused linear cross-entropy: Liger, Apple's Cut Cross-Entropy).
        logits_bytes_backprop: with loss "full", bytes per token per vocabulary entry at the loss, with backprop.
        logits_bytes_forward: the same for a no-grad forward.
        loss_kept_bytes: with loss "chunked", bytes per logit kept for every position (16-bit logit chunks that
            all stay alive until backward) on top of one chunk's working set.
        loss_chunks: with loss "chunked", the number of equal chunks (torchtune: 8).
        loss_chunk_positions: with loss "chunked", positions per chunk (litgpt: 128).
        default_checkpointing: what the tool's default recipe does when the run does not say.
        kbit_checkpointing: the same for a 4-bit base, where the tool's recipe differs (None: as above).
        activation_scale: saved activations relative to edgetune's measured Llama block (fused kernels < 1,
            implementations that keep more tensors > 1); calibrated against the tool's published peaks.
        quantized_matmul_saves_input: bitsandbytes before bitsandbytes #1270 (mid 2024) kept the 16-bit input of
            every 4-bit matmul for backward, even with the base frozen.
        optimizer_in_backward: full-parameter steps apply the optimizer inside backward, so only one parameter's
            gradient exists at a time (torchtune's ``optimizer_in_bwd``).
        offload_checkpoints: checkpoints live in host memory (``--checkpointing offload``; Unsloth's default).
    """

    name: str = "edgetune"
    device: str = "cuda"
    adapter_bytes: int = 4
    adapter_input_copy: bool = True
    unquantized_bytes: int = 2
    double_quant: bool = True
    loss: LossKind = "chunked"
    logits_bytes_backprop: float = calibration.LOGITS_BYTES_BACKPROP
    logits_bytes_forward: float = calibration.LOGITS_BYTES_FORWARD
    loss_kept_bytes: float = 0.0
    loss_chunks: int = 0
    loss_chunk_positions: int = 0
    default_checkpointing: Checkpointing = "on"
    kbit_checkpointing: Checkpointing | None = None
    activation_scale: float = 1.0
    quantized_matmul_saves_input: bool = False
    optimizer_in_backward: bool = False
    offload_checkpoints: bool = False

    def __post_init__(self) -> None:
        if self.loss not in LOSS_KINDS:
            raise EdgetuneError(f"unknown loss {self.loss!r}", f"use one of {', '.join(LOSS_KINDS)}")
        if self.default_checkpointing not in CHECKPOINTING:
            raise EdgetuneError(
                f"unknown checkpointing {self.default_checkpointing!r}", f"use one of {', '.join(CHECKPOINTING)}"
            )

    @property
    def chunked_loss(self) -> bool:
        """edgetune's own chunked loss (a "chunked" loss with no chunk count or size of its own)."""
        return self.loss == "chunked" and not self.loss_chunks and not self.loss_chunk_positions


# edgetune's own loading path: peft fp32 adapters (train/loading.attach_lora), bf16 embeddings and norms next to
# NF4 with double quantization, the chunked loss of train/chunked_loss.py, checkpointing on the ladder's -gc rungs.
EDGETUNE = Stack()

STACKS: dict[str, Stack] = {
    "edgetune": EDGETUNE,
    # Hugging Face Trainer + peft (TRL's SFTTrainer is the same stack). peft creates adapters in fp32
    # (LoraLayer.update_layer with autocast_adapter_dtype=True) and casts their input to it (lora.Linear.forward:
    # x = self._cast_input_dtype(x, lora_A.weight.dtype)); prepare_model_for_kbit_training casts every non-4-bit
    # float parameter to fp32 (peft/utils/other.py) and turns checkpointing on; TrainingArguments leaves
    # gradient_checkpointing off. The loss holds every logit in fp32 (calibration.HF_LOGITS_BYTES_BACKPROP).
    "hf": Stack(
        name="hf",
        unquantized_bytes=4,
        loss="full",
        logits_bytes_backprop=calibration.HF_LOGITS_BYTES_BACKPROP,
        default_checkpointing="off",
        kbit_checkpointing="on",
    ),
    # torchtune: adapters in the model's bf16 (modules/peft/lora.py), NF4 from torchao with its scales quantized
    # to int8 (as double quant), CEWithChunkedOutputLoss over 8 chunks whose bf16 logits all stay alive and are
    # upcast one chunk at a time (modules/loss/ce_chunked_output_loss.py), enable_activation_checkpointing true in
    # the recipes' configs; full single-device configs step the optimizer in backward (optimizer_in_bwd: True).
    "torchtune": Stack(
        name="torchtune",
        adapter_bytes=2,
        adapter_input_copy=False,
        loss="chunked",
        loss_kept_bytes=2.0,
        loss_chunks=8,
        optimizer_in_backward=True,
    ),
    # Unsloth: peft's fp32 adapters, but its fused LoRA kernels (kernels/fast_lora.py) keep the 16-bit input,
    # not an fp32 copy; no fp32 upcast of embeddings or norms; Apple's Cut Cross-Entropy (never the logits);
    # use_gradient_checkpointing="unsloth" offloads each layer's checkpoint to host memory. activation_scale is
    # calibrated against the Unsloth README's and Llama 3.3 blog's longest-context tables.
    "unsloth": Stack(
        name="unsloth",
        adapter_input_copy=False,
        loss="fused",
        default_checkpointing="offload",
        offload_checkpoints=True,
        activation_scale=calibration.ACTIVATION_SCALE["unsloth"],
    ),
    # axolotl: HF Trainer + peft underneath (same adapters, same loss unless a Liger or Cut Cross-Entropy plugin
    # is enabled: pass --loss fused then), prepare_model_for_kbit_training for QLoRA (fp32 embeddings and
    # norms), gradient_checkpointing: true in its example configs.
    "axolotl": Stack(
        name="axolotl", unquantized_bytes=4, loss="full", logits_bytes_backprop=calibration.HF_LOGITS_BYTES_BACKPROP
    ),
    # litgpt: precision "bf16-true" puts adapters in bf16 too (lora.py), the head runs in chunks of 128 positions
    # whose bf16 logits all stay alive and chunked_cross_entropy upcasts one chunk at a time (finetune/lora.py:
    # lm_head_chunk_size=128), no activation checkpointing in finetune/lora.py. Its resource tables
    # (tutorials/resource-tables.md) were measured with a bitsandbytes that kept 4-bit matmul inputs (2023).
    "litgpt": Stack(
        name="litgpt",
        adapter_bytes=2,
        adapter_input_copy=False,
        loss="chunked",
        loss_kept_bytes=2.0,
        loss_chunk_positions=128,
        default_checkpointing="off",
        activation_scale=calibration.ACTIVATION_SCALE["litgpt"],
        quantized_matmul_saves_input=True,
    ),
}


def get_stack(name: str, device: str = "cuda") -> Stack:
    """The preset ``name`` for a device ("cuda" or "cpu").

    Raises:
        EdgetuneError: unknown name (the message lists the presets).
    """
    if name not in STACKS:
        raise EdgetuneError(f"unknown stack {name!r}", f"use one of {', '.join(STACKS)}")
    return replace(STACKS[name], device=device)


EDGETUNE_CUDA = get_stack("edgetune", "cuda")
EDGETUNE_CPU = get_stack("edgetune", "cpu")
