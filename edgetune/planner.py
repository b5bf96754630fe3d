"""The memory planner's pure core: bytes per component for a model, a run shape and a strategy.

No I/O and no hardware here: ``api.plan`` joins this with the device reading and the model inventory. Every
component says whether it is exact (follows from parameter counts and dtypes) or calibrated (a measured
constant from ``edgetune.calibration``). The peak is the resident memory plus the largest of three phases of a
step, because they do not overlap in time:

    resident  = weights + adapters + optimizer state (+ zeroth-order work buffer)
    loss      = activations kept for backward + logits and cross-entropy
    backward  = gradients + one recomputed layer (checkpointing) + checkpoints
    optimizer = gradients + optimizer-step temporaries
"""

from dataclasses import dataclass, field

from edgetune import calibration
from edgetune.errors import EdgetuneError
from edgetune.inventory import ModelSpec, lora_params, lora_shapes, nf4_bytes
from edgetune.loading import DEFAULT_LORA_TARGETS
from edgetune.optim import adafish, hizoo, scaled_adamw
from edgetune.strategies import Backprop, Strategy, ZerothOrder

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
ADAPTER_BYTES = 4  # peft keeps LoRA weights in fp32 (see edgetune.loading.attach_lora)


@dataclass(frozen=True)
class RunShape:
    """The shape of a training run that memory depends on."""

    batch_size: int = 4
    seq_len: int = 256
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = field(default=DEFAULT_LORA_TARGETS)

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise EdgetuneError(f"{name} must be a positive integer, got {value!r}", f"pass a {name} >= 1")

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


def estimate(spec: ModelSpec, strategy: Strategy, run: RunShape, *, device: str = "cuda") -> Estimate:
    """Bytes the strategy needs at its peak on ``device`` ("cuda" or "cpu"), without context, slack or margin.

    Raises:
        EdgetuneError: no LoRA target exists in the model.
    """
    shapes = lora_shapes(spec, run.lora_rank, run.lora_targets) if strategy.lora else []
    trainable = lora_params(shapes) if strategy.lora else spec.total_params
    trainable_bytes = ADAPTER_BYTES if strategy.lora else DTYPE_BYTES.get(strategy.base, 2)
    resident = [
        Component("weights", weights_bytes(spec, strategy.base), True, _weights_note(strategy.base)),
        Component("adapters", ADAPTER_BYTES * trainable if strategy.lora else 0, True, "LoRA A and B in fp32"),
        Component(
            "optimizer state", optimizer_state_bytes(spec, strategy, shapes, trainable), True, _state_note(strategy)
        ),
    ]
    if isinstance(strategy, ZerothOrder):
        phases = _zeroth_order_phases(spec, strategy, run, shapes)
    else:
        phases = _backprop_phases(spec, strategy, run, shapes, trainable * trainable_bytes, device)
    peak_phase = max(phases, key=lambda name: sum(c.bytes for c in phases[name]))
    components = tuple(resident) + _phase_rows(phases, peak_phase)
    return Estimate(strategy.name, components, peak_phase, sum(c.bytes for c in resident + list(phases[peak_phase])))


def weights_bytes(spec: ModelSpec, base: str) -> int:
    """Exact bytes of the base weights as edgetune loads them (NF4: linears 4-bit, the rest bf16), with buffers."""
    if base == "nf4":
        return nf4_bytes(spec) + 2 * (spec.embedding_params + spec.head_params + spec.other_params) + spec.buffer_bytes
    return DTYPE_BYTES[base] * spec.total_params + spec.buffer_bytes


def optimizer_state_bytes(
    spec: ModelSpec, strategy: Strategy, shapes: list[tuple[int, int, int]], trainable: int
) -> int:
    """Exact persistent optimizer state, from the optimizer module that defines it."""
    if isinstance(strategy, ZerothOrder):
        return hizoo.state_bytes(trainable, strategy.hessian)
    param_bytes = ADAPTER_BYTES if strategy.lora else DTYPE_BYTES[strategy.base]
    if strategy.optimizer == "adafish":
        return adafish.state_bytes(shapes, 0, param_bytes=param_bytes)
    if strategy.optimizer == "scaled_adamw":
        return scaled_adamw.state_bytes(shapes, 0 if strategy.lora else trainable, param_bytes=param_bytes)
    # torch AdamW: exp_avg and exp_avg_sq in the parameter dtype plus a 4-byte step tensor per parameter tensor.
    tensors = 2 * len(shapes) if strategy.lora else spec.parameter_tensors
    return 2 * param_bytes * trainable + 4 * tensors


def activation_bytes_per_token(spec: ModelSpec, strategy: Strategy, run: RunShape) -> float:
    """Calibrated bytes one decoder layer keeps for backward per token, without checkpointing."""
    coefficients = calibration.ACTIVATION_COEFFICIENTS["lora" if strategy.lora else "full"]
    adapted = [spec.linear_group(t) for t in run.lora_targets] if strategy.lora else []
    widths = {
        "hidden": spec.hidden_size,
        "kv_dim": spec.num_kv_heads * spec.head_dim,
        "intermediate": spec.intermediate_size,
        "heads": spec.num_heads,
        "adapted_inputs": sum(g.in_features for g in adapted if g is not None),
        "adapted_rank": run.lora_rank * sum(1 for g in adapted if g is not None),
    }
    return sum(coefficients[name] * widths[name] for name in widths)


def _backprop_phases(spec, strategy: Backprop, run, shapes, gradient_bytes: int, device: str):
    layer = round(activation_bytes_per_token(spec, strategy, run) * run.tokens)
    checkpoints = calibration.CHECKPOINT_BYTES_PER_HIDDEN * spec.hidden_size * run.tokens * spec.num_layers
    kept = checkpoints if strategy.checkpointing else layer * spec.num_layers
    logits = round(calibration.LOGITS_BYTES_BACKPROP * run.tokens * spec.vocab_size)
    gradients = Component("gradients", gradient_bytes, True, "one per trainable parameter")
    activations = Component("activations", kept, False, _activation_note(strategy, spec))
    return {
        "loss": (activations, Component("logits", logits, False, "logits, fp32 loss and its gradient")),
        "backward": (
            gradients,
            activations
            if not strategy.checkpointing
            else Component("activations", checkpoints + layer, False, "checkpoints plus one recomputed layer"),
        ),
        "optimizer step": (
            gradients,
            Component(
                "step temporaries", step_temporary_bytes(spec, strategy, shapes, device), False, "during opt.step()"
            ),
        ),
    }


def _zeroth_order_phases(spec, strategy: ZerothOrder, run, shapes):
    largest = max((r * max(i, o) for r, i, o in shapes), default=0) if strategy.lora else spec.largest_tensor_params
    buffer = hizoo.buffer_bytes(largest, strategy.hessian, hizoo.CPU_CHUNK_NUMEL)
    logits = round(calibration.LOGITS_BYTES_FORWARD * run.tokens * spec.vocab_size)
    return {
        "forward": (
            Component("logits", logits, False, "no-grad forward: logits and fp32 loss"),
            Component("zeroth-order buffer", buffer, True, "reusable perturbation buffer"),
        )
    }


def step_temporary_bytes(spec: ModelSpec, strategy: Backprop, shapes, device: str) -> int:
    """Bytes the optimizer step allocates and frees (calibrated for torch AdamW, bounds for ours)."""
    param_bytes = ADAPTER_BYTES if strategy.lora else DTYPE_BYTES[strategy.base]
    other = 0 if strategy.lora else spec.total_params
    if strategy.optimizer == "scaled_adamw":
        return scaled_adamw.step_temporary_bytes(shapes, other, param_bytes=param_bytes)
    largest = max((r * max(i, o) for r, i, o in shapes), default=0) if strategy.lora else spec.largest_tensor_params
    if strategy.optimizer == "adamw":
        # torch AdamW computes in the parameter dtype: foreach (CUDA) over everything, per tensor on CPU.
        if device == "cuda":
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
