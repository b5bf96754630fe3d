"""The memory planner's pure core: bytes per component for a model, a run shape and a strategy.

No I/O and no hardware here: ``api.plan`` joins this with the device reading and the model inventory. Every
component says whether it is exact (follows from parameter counts and dtypes) or calibrated (a measured
constant from ``edgetune.plan.calibration``). The peak is the resident memory plus the largest of three phases of a
step, because they do not overlap in time:

    resident  = weights + adapters + optimizer state (+ zeroth-order work buffer)
    loss      = activations kept for backward + logits and cross-entropy
    backward  = gradients + one recomputed layer (checkpointing) + checkpoints
    optimizer = gradients + optimizer-step temporaries
"""

from dataclasses import dataclass, field

from edgetune.errors import EdgetuneError
from edgetune.plan import calibration
from edgetune.plan.inventory import ModelSpec, lora_params, lora_shapes, nf4_bytes
from edgetune.plan.strategies import DEFAULT_LORA_TARGETS, Backprop, Strategy, ZerothOrder, resolve_targets

DTYPE_BYTES = {"fp32": 4, "bf16": 2}


def loss_chunk_positions(vocab_size: int) -> int:
    """Positions whose logits edgetune's chunked loss computes at once (``edgetune.train.chunked_loss``).

    About ``calibration.LOSS_CHUNK_LOGITS`` logits per chunk, at least 16 positions: 85 for SmolLM2's 49,152
    entries, 32 for Llama 3's 128,256.
    """
    return max(16, calibration.LOSS_CHUNK_LOGITS // max(vocab_size, 1))


@dataclass(frozen=True)
class Stack:
    """How the software stack stores and computes things; the defaults are edgetune's own loading path.

    Other tools differ (bf16 adapters, fp32 embeddings after ``prepare_model_for_kbit_training``, chunked
    cross-entropy, offloaded checkpoints), which is how ``bench/planner_accuracy.py`` replays their published
    measurements.

    Attributes:
        device: "cuda" or "cpu" (optimizer-step temporaries differ).
        adapter_bytes: bytes per LoRA weight; peft keeps adapters in fp32 (see ``loading.attach_lora``).
        unquantized_bytes: bytes per embedding, head and norm weight next to an NF4 base.
        double_quant: NF4 with double quantization of the block scales.
        logits_bytes_backprop: bytes per token per vocabulary entry at the loss, with backprop.
        logits_bytes_forward: the same for a no-grad forward.
        offload_checkpoints: checkpoints live in host memory (Unsloth's "unsloth" checkpointing).
        quantized_matmul_saves_input: bitsandbytes before the fix of bitsandbytes #1270 (mid 2024) kept the
            16-bit input of every 4-bit matmul for backward, even with the base frozen.
        chunked_loss: the output head and cross-entropy run over chunks of positions and never hold all logits
            (edgetune's ``train.chunked_loss``); False prices the full logits with ``logits_bytes_*``.
    """

    device: str = "cuda"
    adapter_bytes: int = 4
    unquantized_bytes: int = 2
    double_quant: bool = True
    logits_bytes_backprop: float = calibration.LOGITS_BYTES_BACKPROP
    logits_bytes_forward: float = calibration.LOGITS_BYTES_FORWARD
    offload_checkpoints: bool = False
    quantized_matmul_saves_input: bool = False
    chunked_loss: bool = False


EDGETUNE_CUDA = Stack(device="cuda", chunked_loss=True)
EDGETUNE_CPU = Stack(device="cpu", chunked_loss=True)


@dataclass(frozen=True)
class RunShape:
    """The shape of a training run that memory depends on."""

    batch_size: int = 4
    seq_len: int = 256
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = field(default=DEFAULT_LORA_TARGETS)

    def __post_init__(self) -> None:
        for name, most in (("batch_size", 2**20), ("seq_len", 2**24), ("lora_rank", 2**16)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise EdgetuneError(f"{name} must be a positive integer, got {value!r}", f"pass a {name} >= 1")
            if value > most:
                raise EdgetuneError(f"{name}={value:,} is beyond any run edgetune plans", f"pass a {name} <= {most:,}")

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


@dataclass(frozen=True)
class Component:
    """One row of a plan: bytes, whether the figure is exact, and what it counts."""

    name: str
    bytes: int
    exact: bool
    note: str


@dataclass(frozen=True)
class Estimate:
    """A strategy's planned memory: resident components, the peaking phase, and the total."""

    strategy: str
    components: tuple[Component, ...]
    peak_phase: str
    peak_bytes: int

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)


def estimate(spec: ModelSpec, strategy: Strategy, run: RunShape, stack: Stack = EDGETUNE_CUDA) -> Estimate:
    """Bytes the strategy needs at its peak with ``stack``, without context, slack or margin.

    Raises:
        EdgetuneError: no LoRA target exists in the model.
    """
    shapes = lora_shapes(spec, run.lora_rank, run.lora_targets) if strategy.lora else []
    trainable = lora_params(shapes) if strategy.lora else spec.total_params
    trainable_bytes = stack.adapter_bytes if strategy.lora else DTYPE_BYTES.get(strategy.base, 2)
    state = optimizer_state_bytes(spec, strategy, shapes, trainable, stack)
    resident = [
        Component("weights", weights_bytes(spec, strategy.base, stack), True, _weights_note(strategy.base)),
        Component("adapters", trainable * trainable_bytes if strategy.lora else 0, True, "LoRA A and B"),
        Component("optimizer state", state, True, _state_note(strategy)),
    ]
    if isinstance(strategy, ZerothOrder):
        phases = _zeroth_order_phases(spec, strategy, run, shapes, stack)
    else:
        phases = _backprop_phases(spec, strategy, run, shapes, trainable * trainable_bytes, stack)
    peak_phase = max(phases, key=lambda name: sum(c.bytes for c in phases[name]))
    components = tuple(resident) + _phase_rows(phases, peak_phase)
    return Estimate(strategy.name, components, peak_phase, sum(c.bytes for c in resident + list(phases[peak_phase])))


def weights_bytes(spec: ModelSpec, base: str, stack: Stack = EDGETUNE_CUDA) -> int:
    """Exact bytes of the base weights as loaded (NF4: linears 4-bit, the rest 16-bit by default), with buffers."""
    if base == "nf4":
        rest = spec.embedding_params + spec.head_params + spec.other_params
        return nf4_bytes(spec, stack.double_quant) + stack.unquantized_bytes * rest + spec.buffer_bytes
    return DTYPE_BYTES[base] * spec.total_params + spec.buffer_bytes


def optimizer_state_bytes(
    spec: ModelSpec,
    strategy: Strategy,
    shapes: list[tuple[int, int, int]],
    trainable: int,
    stack: Stack = EDGETUNE_CUDA,
) -> int:
    """Exact persistent optimizer state, from the optimizer module that defines it."""
    # Each optimizer module states its own state's size; they import torch, so plan modules import them late.
    from edgetune.optim import adafish, hizoo, scaled_adamw

    if isinstance(strategy, ZerothOrder):
        return hizoo.state_bytes(trainable, strategy.hessian)
    param_bytes = stack.adapter_bytes if strategy.lora else DTYPE_BYTES[strategy.base]
    if strategy.optimizer == "adafish":
        return adafish.state_bytes(shapes, 0, param_bytes=param_bytes)
    if strategy.optimizer == "scaled_adamw":
        return scaled_adamw.state_bytes(shapes, 0 if strategy.lora else trainable, param_bytes=param_bytes)
    # torch AdamW: exp_avg and exp_avg_sq in the parameter dtype plus a 4-byte step tensor per parameter tensor.
    tensors = 2 * len(shapes) if strategy.lora else spec.parameter_tensors
    return 2 * param_bytes * trainable + 4 * tensors


def activation_bytes_per_token(
    spec: ModelSpec, strategy: Strategy, run: RunShape, stack: Stack = EDGETUNE_CUDA
) -> float:
    """Calibrated bytes one decoder layer keeps for backward per token, without checkpointing."""
    coefficients = dict(calibration.ACTIVATION_COEFFICIENTS["lora" if strategy.lora else "full"])
    if stack.adapter_bytes == 2:
        # 16-bit adapters read the base layer's own input, so no fp32 copy of it is kept.
        coefficients["adapted_inputs"] = 0.0
    targets = resolve_targets(run.lora_targets, spec.linear_names) if strategy.lora else ()
    adapted = [group for target in targets for group in spec.linear_groups(target)]
    layers = max(spec.num_layers, 1)
    widths = {
        "hidden": spec.hidden_size,
        "kv_dim": spec.num_kv_heads * spec.head_dim,
        "intermediate": spec.intermediate_size,
        "heads": spec.num_heads,
        # Per layer: a group holds one linear per block (count == layers) or, for shared names, several.
        "adapted_inputs": sum(g.in_features * g.count for g in adapted) / layers,
        "adapted_rank": run.lora_rank * sum(g.count for g in adapted) / layers,
    }
    per_token = sum(coefficients[name] * widths[name] for name in widths)
    if stack.quantized_matmul_saves_input and strategy.base == "nf4":
        # The distinct inputs of a block's linears: attention input, o_proj, MLP input (h each) and down_proj (i).
        per_token += 2 * (3 * spec.hidden_size + spec.intermediate_size)
    return per_token


def _backprop_phases(spec, strategy: Backprop, run, shapes, gradient_bytes: int, stack: Stack):
    layer = round(activation_bytes_per_token(spec, strategy, run, stack) * run.tokens)
    checkpoints = calibration.CHECKPOINT_BYTES_PER_HIDDEN * spec.hidden_size * run.tokens * spec.num_layers
    checkpoints *= 0 if stack.offload_checkpoints else 1
    kept = checkpoints if strategy.checkpointing else layer * spec.num_layers
    gradients = Component("gradients", gradient_bytes, True, "one per trainable parameter")
    activations = Component("activations", kept, False, _activation_note(strategy, spec))
    return {
        "loss": (activations, _loss_component(spec, strategy, run, stack, backprop=True)),
        "backward": (
            gradients,
            activations
            if not strategy.checkpointing
            else Component("activations", checkpoints + layer, False, "checkpoints plus one recomputed layer"),
        ),
        "optimizer step": (
            gradients,
            Component(
                "step temporaries", step_temporary_bytes(spec, strategy, shapes, stack), False, "during opt.step()"
            ),
        ),
    }


def _zeroth_order_phases(spec, strategy: ZerothOrder, run, shapes, stack: Stack):
    from edgetune.optim import hizoo

    largest = max((r * max(i, o) for r, i, o in shapes), default=0) if strategy.lora else spec.largest_tensor_params
    buffer = hizoo.buffer_bytes(largest, strategy.hessian, hizoo.CPU_CHUNK_NUMEL)
    return {
        "forward": (
            _loss_component(spec, strategy, run, stack, backprop=False),
            Component("zeroth-order buffer", buffer, True, "reusable perturbation buffer"),
        )
    }


def _loss_component(spec: ModelSpec, strategy: Strategy, run: RunShape, stack: Stack, *, backprop: bool) -> Component:
    """The loss row: every logit at once, or with the chunked loss one chunk of them plus its gradient buffers."""
    if not stack.chunked_loss:
        per_logit = stack.logits_bytes_backprop if backprop else stack.logits_bytes_forward
        note = "logits, fp32 loss and its gradient" if backprop else "no-grad forward: logits and fp32 loss"
        return Component("logits", round(per_logit * run.tokens * spec.vocab_size), False, note)
    head_bytes = DTYPE_BYTES.get(strategy.base, 2)  # an NF4 base keeps its head in bf16
    chunk = min(loss_chunk_positions(spec.vocab_size), run.tokens)
    mode = "forward" if not backprop else "frozen head" if strategy.lora else "trained head"
    per_logit = calibration.CHUNK_LOGIT_BYTES[(head_bytes, mode)]
    # The labelled positions' hidden states are copied out (every position, at most); backprop adds their gradient.
    hidden = (2 if backprop else 1) * run.tokens * spec.hidden_size * head_bytes
    head_gradient = 4 * spec.vocab_size * spec.hidden_size if backprop and not strategy.lora else 0
    total = round(per_logit * chunk * spec.vocab_size) + hidden + head_gradient
    return Component("logits", total, False, f"chunked loss: {chunk} positions of logits at a time")


def step_temporary_bytes(spec: ModelSpec, strategy: Backprop, shapes, stack: Stack = EDGETUNE_CUDA) -> int:
    """Bytes the optimizer step allocates and frees (calibrated for torch AdamW, bounds for ours)."""
    from edgetune.optim import scaled_adamw

    param_bytes = stack.adapter_bytes if strategy.lora else DTYPE_BYTES[strategy.base]
    other = 0 if strategy.lora else spec.total_params
    if strategy.optimizer == "scaled_adamw":
        return scaled_adamw.step_temporary_bytes(shapes, other, param_bytes=param_bytes)
    largest = max((r * max(i, o) for r, i, o in shapes), default=0) if strategy.lora else spec.largest_tensor_params
    if strategy.optimizer == "adamw":
        # torch AdamW computes in the parameter dtype: foreach (CUDA) over everything, per tensor on CPU.
        if stack.device == "cuda":
            return param_bytes * (lora_params(shapes) if strategy.lora else spec.total_params)
        return calibration.ADAMW_CPU_TEMPORARY_COPIES * param_bytes * largest
    return calibration.ADAMW_CPU_TEMPORARY_COPIES * max(4, param_bytes) * largest


def _phase_rows(phases, peak_phase: str) -> tuple[Component, ...]:
    rows = {c.name: c for c in phases[peak_phase]}
    for name, members in phases.items():
        for component in members:
            rows.setdefault(
                component.name,
                Component(component.name, 0, component.exact, f"{component.note} (peaks in {name}, not at the peak)"),
            )
    return tuple(rows.values())


def _weights_note(base: str) -> str:
    if base == "nf4":
        return "decoder linears NF4 + double quant; embeddings, head, norms bf16"
    return f"all parameters in {base}"


def _state_note(strategy: Strategy) -> str:
    if isinstance(strategy, ZerothOrder):
        return "fp32 diagonal Hessian" if strategy.hessian else "none (MeZO)"
    return {
        "adafish": "momentum + r x r Fisher per factor",
        "scaled_adamw": "Adam moments in fp32",
        "adamw": "Adam moments",
    }[strategy.optimizer]


def _activation_note(strategy: Backprop, spec: ModelSpec) -> str:
    if strategy.checkpointing:
        return f"one bf16 checkpoint per layer x {spec.num_layers} layers"
    return f"saved for backward x {spec.num_layers} layers"
