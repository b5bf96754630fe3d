"""Parameter inventory of a causal LM from its config alone: the model is built on the meta device, no weights.

``AutoModelForCausalLM.from_config`` is used rather than ``AutoModel`` because the latter drops an untied
``lm_head``. Every parameter is classified the way the planner prices it: decoder linears (what bitsandbytes
quantizes to NF4), embeddings, the output head (0 when tied to the embeddings) and the rest (norms, biases).
"""

import logging
import math
from dataclasses import dataclass, field

from edgetune.errors import EdgetuneError
from edgetune.plan.sources import ModelSource, read_config_dict
from edgetune.plan.strategies import resolve_targets

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearGroup:
    """All decoder linears that share a name and a shape (e.g. every layer's ``q_proj``).

    Linears with the same name but different shapes (GPTBigCode's ``attn.c_proj`` and ``mlp.c_proj``) are separate
    groups with the same ``name``, as LoRA, which matches names, adapts both.
    """

    name: str
    in_features: int
    out_features: int
    count: int
    has_bias: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs to know about a model; all counts are exact.

    Attributes:
        model_type: the config's ``model_type``.
        num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim, vocab_size: shape.
        max_positions: the longest sequence the config allows.
        tied_embeddings: whether ``lm_head`` shares the embedding matrix.
        linear_params: decoder linear weights (quantized by NF4).
        embedding_params: input embedding parameters.
        head_params: ``lm_head`` parameters not shared with the embeddings (0 when tied).
        other_params: norms, biases and anything else.
        linears: the decoder linears grouped by name, for LoRA sizing.
        largest_linear_params: elements of the largest single decoder linear weight.
        largest_tensor_params: elements of the largest parameter tensor (often the embedding).
        parameter_tensors: number of distinct parameter tensors (optimizers keep per-tensor counters).
        buffer_bytes: non-parameter buffers (rotary frequencies), which stay fp32 whatever the weights' dtype.
    """

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    tied_embeddings: bool
    linear_params: int
    embedding_params: int
    head_params: int
    other_params: int
    linears: tuple[LinearGroup, ...] = field(default=())
    largest_linear_params: int = 0
    largest_tensor_params: int = 0
    buffer_bytes: int = 0
    parameter_tensors: int = 0

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embedding_params + self.head_params + self.other_params

    def linear_groups(self, name: str) -> list[LinearGroup]:
        return [group for group in self.linears if group.name == name]

    @property
    def linear_names(self) -> list[str]:
        """The decoder linears' names, each once, in model order."""
        return list(dict.fromkeys(group.name for group in self.linears))


def inspect_model(source: ModelSource) -> ModelSpec:
    """Build the model on the meta device and take its inventory.

    Raises:
        EdgetuneError: the config lacks fields the architecture needs, or transformers cannot build it.
    """
    config_path = source.config_file
    data = read_config_dict(config_path)
    return inspect_config(data, origin=str(config_path))


def inspect_config(data: dict[str, object], origin: str = "config") -> ModelSpec:
    """Take the inventory of a model described by a config dict (see ``inspect_model``).

    Raises:
        EdgetuneError: the config cannot build a causal LM.
    """
    import torch
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_sizes(data, origin)
    fields = {key: value for key, value in data.items() if key != "model_type"}
    # transformers validates configs through huggingface_hub's strict dataclasses, whose errors are not ValueErrors.
    try:
        config = AutoConfig.for_model(str(data["model_type"]), **fields)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        RuntimeError,
        ZeroDivisionError,
        StrictDataclassError,
    ) as exc:
        reason = str(exc).strip().splitlines()[-1].strip()
        raise EdgetuneError(
            f"{origin} does not describe a causal LM transformers can build ({reason})",
            "use the config.json published with the model, with its size fields (hidden_size, num_hidden_layers, ...)",
        ) from exc
    return _classify(model, config)


# Config keys that give a model its size (names differ between families); a config must state them itself, or
# transformers would plan its class defaults (a 6.7B Llama for a config holding only model_type).
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_SIZE_KEYS = (
    _WIDTH_KEYS
    + _DEPTH_KEYS
    + ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size", "head_dim", "n_head")
)


def _check_sizes(data: dict[str, object], origin: str) -> None:
    sized = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
    fix = "use the config.json published with the model, with its size fields (hidden_size, num_hidden_layers, ...)"
    for group in (_WIDTH_KEYS, _DEPTH_KEYS):
        if not any(key in sized for key in group):
            raise EdgetuneError(
                f"{origin} does not describe a causal LM transformers can build (it does not say the model's "
                f"{group[0]}, or {', '.join(group[1:])})",
                fix,
            )
    for key in _SIZE_KEYS:
        value = sized.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise EdgetuneError(
                f"{origin} does not describe a causal LM transformers can build ({key}={value!r}; sizes are "
                "positive integers)",
                fix,
            )


def _classify(model, config) -> ModelSpec:
    import torch

    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    embedding_ids = {id(p) for p in embedding.parameters()}
    head_ids = {id(p) for p in head.parameters()} - embedding_ids if head is not None else set()
    groups: dict[tuple, list[torch.nn.Linear]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            key = (name.rsplit(".", 1)[-1], module.in_features, module.out_features, module.bias is not None)
            groups.setdefault(key, []).append(module)
    linear_ids = {id(m.weight) for modules in groups.values() for m in modules}
    counts = {"linear": 0, "embedding": 0, "head": 0, "other": 0}
    for parameter in model.parameters():  # shared (tied) parameters are yielded once
        key = _kind(id(parameter), linear_ids, embedding_ids, head_ids)
        counts[key] += parameter.numel()
    linears = tuple(
        LinearGroup(name, fan_in, fan_out, len(mods), bias) for (name, fan_in, fan_out, bias), mods in groups.items()
    )
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text_config.num_attention_heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
    return ModelSpec(
        model_type=config.model_type,
        num_layers=int(text_config.num_hidden_layers),
        hidden_size=int(text_config.hidden_size),
        intermediate_size=int(getattr(text_config, "intermediate_size", 4 * text_config.hidden_size)),
        num_heads=heads,
        num_kv_heads=int(getattr(text_config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        vocab_size=int(text_config.vocab_size),
        max_positions=int(getattr(text_config, "max_position_embeddings", 0) or 0),
        tied_embeddings=not head_ids,
        linear_params=counts["linear"],
        embedding_params=counts["embedding"],
        head_params=counts["head"],
        other_params=counts["other"],
        linears=linears,
        largest_linear_params=max((g.in_features * g.out_features for g in linears), default=0),
        largest_tensor_params=max(p.numel() for p in model.parameters()),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        parameter_tensors=sum(1 for _ in model.parameters()),
    )


def _kind(parameter_id: int, linear_ids: set[int], embedding_ids: set[int], head_ids: set[int]) -> str:
    if parameter_id in linear_ids:
        return "linear"
    if parameter_id in embedding_ids:
        return "embedding"
    if parameter_id in head_ids:
        return "head"
    return "other"


def lora_shapes(spec: ModelSpec, rank: int, targets: tuple[str, ...]) -> list[tuple[int, int, int]]:
    """(rank, in, out) of every LoRA pair the targets create, one entry per adapted module.

    ``("all-linear",)`` adapts every decoder linear, as peft's ``target_modules="all-linear"`` does.

    Raises:
        EdgetuneError: no target matches a decoder linear of the model, or "all-linear" is mixed with names.
    """
    shapes = []
    for target in resolve_targets(targets, spec.linear_names):
        for group in spec.linear_groups(target):
            shapes += [(rank, group.in_features, group.out_features)] * group.count
    if not shapes:
        names = ", ".join(spec.linear_names)
        raise EdgetuneError(f"no LoRA target in {list(targets)} matches this model", f"pick from: {names}")
    return shapes


def lora_params(shapes: list[tuple[int, int, int]]) -> int:
    """Trainable LoRA parameters: r * (in + out) per adapted module."""
    return sum(rank * (fan_in + fan_out) for rank, fan_in, fan_out in shapes)


def nf4_bytes(spec: ModelSpec, double_quant: bool = True) -> int:
    """Bytes of the model's decoder linears quantized to NF4, exactly as bitsandbytes stores them."""
    return sum(nf4_tensor_bytes(g.in_features * g.out_features, double_quant) * g.count for g in spec.linears)


def nf4_tensor_bytes(numel: int, double_quant: bool = True, block: int = 64) -> int:
    """Bytes of one weight quantized to NF4 by bitsandbytes (measured layout, bitsandbytes 0.50).

    Two 4-bit codes per byte and one absmax per 64-weight block, plus the 16-entry fp32 NF4 code table. Double
    quantization stores the absmax values as 8-bit codes with an fp32 scale per 256 blocks, one fp32 offset and
    the 256-entry fp32 table of the 8-bit code.
    """
    packed = math.ceil(numel / 2)
    blocks = math.ceil(numel / block)
    nf4_code = 16 * 4
    if not double_quant:
        return packed + 4 * blocks + nf4_code
    return packed + blocks + nf4_code + 4 + 4 * math.ceil(blocks / 256) + 256 * 4
