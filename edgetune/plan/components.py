"""The memory planner's pure core: bytes per component for a model, a run shape and a strategy.

No I/O and no hardware here: ``api.plan`` joins this with the device reading and the model inventory. Every
component says whether it is exact (follows from parameter counts and dtypes) or calibrated (a measured
constant from ``edgetune.plan.calibration``). The peak is the resident memory plus the largest of three phases of a
step, because they do not overlap in time:

    resident  = weights + adapters + optimizer state (+ zeroth-order work buffer)
    loss      = activations kept for backward + logits and cross-entropy
    backward  = gradients + one recomputed layer (checkpointing) + checkpoints
    optimizer = gradients + optimizer-step temporaries

Generation (``Inference``) has one phase: the KV cache plus one forward's working set.
"""

from edgetune.plan import calibration
from edgetune.plan.inventory import ModelSpec, lora_params, lora_shapes, nf4_bytes
from edgetune.plan.loss_memory import loss_chunk_positions, loss_component
from edgetune.plan.optimizer_memory import gradient_bytes, state_bytes, step_temporary_bytes
from edgetune.plan.plan_types import Component, Estimate, RunShape
from edgetune.plan.stacks import EDGETUNE_CPU, EDGETUNE_CUDA, Stack
from edgetune.plan.strategies import DTYPE_BYTES, Backprop, Inference, Strategy, ZerothOrder, resolve_targets

__all__ = [
    "EDGETUNE_CPU",
    "EDGETUNE_CUDA",
    "Component",
    "Estimate",
    "RunShape",
    "Stack",
    "estimate",
    "loss_chunk_positions",
    "optimizer_state_bytes",
    "weights_bytes",
]


def estimate(spec: ModelSpec, strategy: Strategy, run: RunShape, stack: Stack = EDGETUNE_CUDA) -> Estimate:
    """Bytes the strategy needs at its peak with ``stack``, without context, slack or margin.

    Raises:
        EdgetuneError: no LoRA target exists in the model.
    """
    shapes = lora_shapes(spec, run.lora_rank, run.lora_targets) if strategy.lora else []
    trainable = lora_params(shapes) if strategy.lora else spec.total_params
    resident = [
        Component("weights", weights_bytes(spec, strategy.base, stack), True, _weights_note(strategy.base, stack)),
        Component("adapters", trainable * stack.adapter_bytes if strategy.lora else 0, True, "LoRA A and B"),
        Component(
            "optimizer state", state_bytes(spec, strategy, shapes, trainable, stack), True, _state_note(strategy)
        ),
    ]
    if isinstance(strategy, Inference):
        phases = _inference_phases(spec, strategy, run, stack)
    elif isinstance(strategy, ZerothOrder):
        phases = _zeroth_order_phases(spec, strategy, run, shapes, stack)
    else:
        gradients = gradient_bytes(spec, strategy, trainable, stack)
        phases = _backprop_phases(spec, strategy, run, shapes, gradients, stack)
    peak_phase = max(phases, key=lambda name: sum(c.bytes for c in phases[name]))
    components = tuple(resident) + _phase_rows(phases, peak_phase)
    return Estimate(strategy.name, components, peak_phase, sum(c.bytes for c in resident + list(phases[peak_phase])))


def weights_bytes(spec: ModelSpec, base: str, stack: Stack = EDGETUNE_CUDA) -> int:
    """Exact bytes of the base weights as loaded (NF4: linears 4-bit, the rest 16-bit by default), with buffers."""
    if base == "nf4":
        rest = spec.embedding_params + spec.head_params + spec.other_params
        return nf4_bytes(spec, stack.double_quant) + stack.unquantized_bytes * rest + spec.buffer_bytes
    return DTYPE_BYTES[base] * spec.total_params + spec.buffer_bytes


def optimizer_state_bytes(spec: ModelSpec, strategy: Strategy, shapes, trainable: int, stack=EDGETUNE_CUDA) -> int:
    """Exact persistent optimizer state (see ``optimizer_memory.state_bytes``)."""
    return state_bytes(spec, strategy, shapes, trainable, stack)


def activation_bytes_per_token(
    spec: ModelSpec, strategy: Strategy, run: RunShape, stack: Stack = EDGETUNE_CUDA
) -> float:
    """Calibrated bytes one decoder layer keeps for backward per token, without checkpointing."""
    coefficients = dict(calibration.ACTIVATION_COEFFICIENTS["lora" if strategy.lora else "full"])
    if not stack.adapter_input_copy:
        # 16-bit adapters and fused LoRA kernels read the base layer's own input, so no fp32 copy of it is kept.
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
    if strategy.base == "fp32":
        per_token *= 2  # the coefficients were measured on a 16-bit base; fp32 keeps every saved tensor in fp32
    if stack.quantized_matmul_saves_input and strategy.base == "nf4":
        # The distinct inputs of a block's linears: attention input, o_proj, MLP input (h each) and down_proj (i).
        per_token += 2 * (3 * spec.hidden_size + spec.intermediate_size)
    return per_token * stack.activation_scale


def _backprop_phases(spec, strategy: Backprop, run, shapes, gradient_total: int, stack: Stack):
    layer = round(activation_bytes_per_token(spec, strategy, run, stack) * run.tokens)
    checkpoint_bytes = 4 if strategy.base == "fp32" else calibration.CHECKPOINT_BYTES_PER_HIDDEN
    checkpoints = checkpoint_bytes * spec.hidden_size * run.tokens * spec.num_layers
    checkpoints *= 0 if stack.offload_checkpoints else 1
    kept = checkpoints if strategy.checkpointing else layer * spec.num_layers
    gradients = Component("gradients", gradient_total, True, _gradient_note(strategy, stack))
    activations = Component("activations", kept, False, _activation_note(strategy, spec, stack))
    # bitsandbytes' 4-bit backward dequantizes one weight to 16 bits for the input gradient (33.5 MiB measured for
    # an 8192 x 2048 layer on CPU, bench/results/planner_measured_chunked.json).
    dequantized = 2 * spec.largest_linear_params if strategy.base == "nf4" else 0
    return {
        "loss": (activations, loss_component(spec, strategy, run, stack, backprop=True)),
        "backward": (
            gradients,
            activations
            if not strategy.checkpointing
            else Component(
                "activations", checkpoints + layer + dequantized, False, "checkpoints plus one recomputed layer"
            ),
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
    # HiZOO keeps z / sqrt(H) and FZOO its summed update in a second fp32 slot; MeZO needs none.
    buffer = hizoo.buffer_bytes(largest, strategy.optimizer != "mezo", hizoo.CPU_CHUNK_NUMEL)
    return {
        "forward": (
            loss_component(spec, strategy, run, stack, backprop=False),
            Component("zeroth-order buffer", buffer, True, "reusable perturbation buffer"),
        )
    }


def _inference_phases(spec, strategy: Inference, run, stack: Stack):
    """Prefill of ``run.seq_len`` tokens per sequence: the KV cache and the largest transient of one forward.

    The KV cache is exact (keys and values of every layer in the compute dtype). The forward's working set peaks
    at the MLP of transformers' Llama block: the activated gate, the up projection and their product (3 x
    intermediate) next to four hidden-wide tensors (residual stream, normed input, attention output and the sum):
    calibrated, within 2% of a measured no-grad prefill in tests/plan/test_components.py. Generation computes the
    logits of the last position only, in fp32. A 4-bit base dequantizes one weight at a time to 16 bits.
    """
    compute = DTYPE_BYTES.get(strategy.base, 2)  # a 4-bit base computes in 16 bits
    kv = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * run.tokens * compute
    working = compute * run.tokens * (4 * spec.hidden_size + 3 * spec.intermediate_size)
    logits = run.batch_size * spec.vocab_size * (compute + 4)
    dequantized = 2 * spec.largest_linear_params if strategy.base == "nf4" else 0
    return {
        "forward": (
            Component("kv cache", kv, True, f"keys and values of {run.seq_len} positions x {run.batch_size}"),
            Component("activations", working + dequantized, False, "one forward's working set (MLP)"),
            Component("logits", logits, True, "last position's logits, fp32"),
        )
    }


def _phase_rows(phases, peak_phase: str) -> tuple[Component, ...]:
    rows = {c.name: c for c in phases[peak_phase]}
    for name, members in phases.items():
        for component in members:
            rows.setdefault(
                component.name,
                Component(component.name, 0, component.exact, f"{component.note} (peaks in {name}, not at the peak)"),
            )
    return tuple(rows.values())


def _weights_note(base: str, stack: Stack) -> str:
    if base == "nf4":
        quant = "NF4 + double quant" if stack.double_quant else "NF4"
        rest = "fp32" if stack.unquantized_bytes == 4 else "16-bit"
        return f"decoder linears {quant}; embeddings, head, norms {rest}"
    return f"all parameters in {base}"


def _state_note(strategy: Strategy) -> str:
    if isinstance(strategy, Inference):
        return "none (generation)"
    if isinstance(strategy, ZerothOrder):
        return {"hizoo": "fp32 diagonal Hessian", "mezo": "none (MeZO)", "fzoo": "none (FZOO)"}[strategy.optimizer]
    return {
        "adafish": "momentum + r x r Fisher per factor",
        "scaled_adamw": "Adam moments in fp32",
        "adamw": "Adam moments",
        "adamw_8bit": "Adam moments in 8 bits (bitsandbytes)",
        "paged_adamw": "paged to host memory (bitsandbytes)",
        "paged_adamw_8bit": "paged to host memory (bitsandbytes)",
        "adafactor": "factored second moments, fp32",
        "sgd": "none (no momentum)",
    }[strategy.optimizer]


def _gradient_note(strategy: Backprop, stack: Stack) -> str:
    if stack.optimizer_in_backward and not strategy.lora:
        return "one tensor at a time (optimizer steps in backward)"
    return "one per trainable parameter"


def _activation_note(strategy: Backprop, spec: ModelSpec, stack: Stack) -> str:
    if strategy.checkpointing and stack.offload_checkpoints:
        return "checkpoints offloaded to host memory"
    if strategy.checkpointing:
        return f"one 16-bit checkpoint per layer x {spec.num_layers} layers"
    return f"saved for backward x {spec.num_layers} layers"
