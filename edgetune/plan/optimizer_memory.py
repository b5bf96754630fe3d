"""Optimizer memory (pure): persistent state, step temporaries and gradients, for every optimizer the planner sizes.

edgetune's own optimizers state their sizes in their modules; torch's, bitsandbytes' and transformers' are priced
here from how their code stores state (the source is named beside each). All state figures are exact; the step
temporaries of torch's AdamW are calibrated (``calibration.ADAMW_CPU_TEMPORARY_COPIES``), the others are read
from the update's code and are bounds.
"""

from edgetune.plan import calibration
from edgetune.plan.inventory import ModelSpec, lora_params
from edgetune.plan.stacks import Stack
from edgetune.plan.strategies import DTYPE_BYTES, Backprop, Strategy, ZerothOrder

# bitsandbytes keeps tensors below min_8bit_size (4096 elements) in 32-bit state and quantizes the rest blockwise
# (256 values per fp32 absmax): bitsandbytes/optim/optimizer.py, Optimizer8bit.init_state.
BNB_MIN_8BIT_NUMEL = 4096
BNB_BLOCK = 256
PAGED = ("paged_adamw", "paged_adamw_8bit")


def param_bytes(strategy: Strategy, stack: Stack) -> int:
    """Bytes per trainable element: the stack's adapter dtype for LoRA, the base dtype for full training."""
    return stack.adapter_bytes if strategy.lora else DTYPE_BYTES[strategy.base]


def trainable_tensors(spec: ModelSpec, strategy: Strategy, shapes: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """(rows, cols) of each trainable tensor; vectors (norms, biases) as (n, 1)."""
    if strategy.lora:
        return [shape for r, i, o in shapes for shape in ((r, i), (o, r))]
    tensors = [(g.out_features, g.in_features) for g in spec.linears for _ in range(g.count)]
    tensors.append((spec.vocab_size, spec.hidden_size))
    if spec.head_params:
        tensors.append((spec.vocab_size, spec.hidden_size))
    # The inventory counts norms and biases together: spread them evenly over their tensors (in a Llama block
    # each is one hidden-wide norm, so the split is exact there).
    count = max(spec.parameter_tensors - len(tensors), 1)
    return tensors + [(spec.other_params // count, 1)] * count


def state_bytes(spec: ModelSpec, strategy: Strategy, shapes, trainable: int, stack: Stack) -> int:
    """Exact persistent optimizer state on the device (paged state lives in host-backed unified memory: 0)."""
    # Each optimizer module states its own state's size; they import torch, so plan modules import them late.
    from edgetune.optim import adafish, hizoo, scaled_adamw

    if isinstance(strategy, ZerothOrder):
        return hizoo.state_bytes(trainable, strategy.hessian)
    if not isinstance(strategy, Backprop):
        return 0
    width = param_bytes(strategy, stack)
    name = strategy.optimizer
    if name == "adafish":
        return adafish.state_bytes(shapes, 0, param_bytes=width)
    if name == "scaled_adamw":
        return scaled_adamw.state_bytes(shapes, 0 if strategy.lora else trainable, param_bytes=width)
    if name in PAGED or name == "sgd":
        # Paged state is allocated with cudaMallocManaged and moved to host memory under pressure (bitsandbytes
        # GlobalPageManager), so it never stops a run from fitting; SGD without momentum keeps nothing.
        return 0
    if name in ("adamw_8bit", "adafactor"):
        return sum(tensor_state_bytes(name, rows, cols) for rows, cols in trainable_tensors(spec, strategy, shapes))
    # torch AdamW: exp_avg and exp_avg_sq in the parameter dtype plus a 4-byte step tensor per parameter tensor.
    count = 2 * len(shapes) if strategy.lora else spec.parameter_tensors
    return 2 * width * trainable + 4 * count


def tensor_state_bytes(optimizer: str, rows: int, cols: int) -> int:
    """State of one (rows, cols) tensor (cols == 1: a vector) under bitsandbytes' AdamW8bit or transformers'
    Adafactor, as their step creates it (tests/plan/test_optimizer_memory.py compares with both libraries)."""
    numel = rows * cols
    if optimizer == "adafactor":
        # fp32 row and column second moments for a matrix, a full one for a vector, an fp32 RMS; no momentum.
        return 4 * (rows + cols if cols > 1 else rows) + 4
    if numel < BNB_MIN_8BIT_NUMEL:
        return 8 * numel  # two fp32 moments
    # Two uint8 moments, an fp32 absmax per block of each, and each moment's 256-entry fp32 quantization map.
    return 2 * numel + 2 * 4 * -(-numel // BNB_BLOCK) + 2 * 4 * 256


def gradient_bytes(spec: ModelSpec, strategy: Strategy, trainable: int, stack: Stack) -> int:
    """Gradients alive at once: all of them, or one tensor's when the optimizer steps inside backward."""
    if not strategy.needs_backward:
        return 0
    if stack.optimizer_in_backward and not strategy.lora:
        return param_bytes(strategy, stack) * spec.largest_tensor_params
    return param_bytes(strategy, stack) * trainable


def step_temporary_bytes(spec: ModelSpec, strategy: Backprop, shapes, stack: Stack) -> int:
    """Bytes the optimizer step allocates and frees (calibrated for torch AdamW, bounds for the others)."""
    from edgetune.optim import scaled_adamw

    width = param_bytes(strategy, stack)
    other = 0 if strategy.lora else spec.total_params
    if strategy.optimizer == "scaled_adamw":
        return scaled_adamw.step_temporary_bytes(shapes, other, param_bytes=width)
    largest = max((r * max(i, o) for r, i, o in shapes), default=0) if strategy.lora else spec.largest_tensor_params
    if strategy.optimizer in ("adamw_8bit", "sgd") or strategy.optimizer in PAGED:
        return 0  # bitsandbytes' kernels and torch's SGD update in place
    if strategy.optimizer == "adafactor":
        # transformers' Adafactor.step per tensor: an fp32 gradient, its square and the factored update, plus an
        # fp32 copy of a 16-bit parameter.
        return largest * (12 + (4 if width < 4 else 0))
    if strategy.optimizer == "adamw" and not (stack.optimizer_in_backward and not strategy.lora):
        # torch AdamW computes in the parameter dtype: foreach (CUDA) over everything, per tensor on CPU.
        if stack.device == "cuda":
            return width * (lora_params(shapes) if strategy.lora else spec.total_params)
        return calibration.ADAMW_CPU_TEMPORARY_COPIES * width * largest
    return calibration.ADAMW_CPU_TEMPORARY_COPIES * max(4, width) * largest
