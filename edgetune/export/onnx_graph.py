"""Tracing a decoder into an ONNX graph with a KV cache, in the layout onnxruntime-genai and optimum read.

Inputs: ``input_ids`` and ``position_ids`` ``[batch_size, sequence_length]``, ``attention_mask``
``[batch_size, total_sequence_length]`` (past plus new tokens), and per layer ``past_key_values.{i}.key`` /
``.value`` ``[batch_size, kv_heads, past_sequence_length, head_dim]`` (int64 ids, float32 cache). Outputs:
``logits`` ``[batch_size, sequence_length, vocab]`` and ``present.{i}.key`` / ``.value``, the past with the new
tokens appended. A prefill passes a past of length 0; each later step passes one token and the last presents.
These are the names onnxruntime-genai's ``genai_config.json`` defaults to (``past_key_values.%d.key``,
``present.%d.key``) and the axes optimum's ``TextDecoderWithPositionIdsOnnxConfig`` declares.
"""

import torch
from transformers import DynamicCache

from edgetune.errors import EdgetuneError

INPUTS = ("input_ids", "attention_mask", "position_ids")
PAST = "past_key_values"
PRESENT = "present"


def cache_names(prefix: str, num_layers: int) -> list[str]:
    """``prefix.0.key, prefix.0.value, prefix.1.key, ...``: the flat order of the cache tensors."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


class _WithCache(torch.nn.Module):
    # Flat tensors in and out: the exporter cannot take a Cache object as a graph input, so the wrapper builds a
    # DynamicCache from the past tensors and hands back the tensors the forward appended to it.
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        # No config: full-length layers for every family, so a sliding-window model's cache is never truncated
        # here (the attention mask still applies the window).
        cache = DynamicCache()
        for layer, (key, value) in enumerate(past):
            cache.update(key, value, layer)
        logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        ).logits
        return logits, [(layer.keys, layer.values) for layer in cache.layers]


def cache_layout(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def trace_and_save(model: torch.nn.Module, path, external: bool) -> int:
    """Export ``model`` (float32, eval) with its KV cache to ``path``; returns the opset.

    Raises:
        EdgetuneError: the exporter failed (one line, with the fallback).
    """
    layers, kv_heads, head_dim = cache_layout(model.config)
    longest = int(getattr(model.config, "max_position_embeddings", 4096))
    batch = torch.export.Dim("batch_size", min=1, max=1024)
    new = torch.export.Dim("sequence_length", min=1, max=longest)
    # min=0: the prefill's past is empty. The mask's length is its own dimension because torch.export cannot state
    # "past + new" as a derived dimension; the graph's shapes tie them together at run time.
    past_len = torch.export.Dim("past_sequence_length", min=0, max=longest)
    total = torch.export.Dim("total_sequence_length", min=1, max=2 * longest)
    # Example sizes above 1 on every dynamic axis, so the trace does not specialise on 0 or 1.
    example_batch, example_new, example_past = 2, 3, 4
    past = [
        (
            torch.zeros(example_batch, kv_heads, example_past, head_dim),
            torch.zeros(example_batch, kv_heads, example_past, head_dim),
        )
        for _ in range(layers)
    ]
    ids = torch.ones(example_batch, example_new, dtype=torch.long)
    mask = torch.ones(example_batch, example_past + example_new, dtype=torch.long)
    positions = torch.arange(example_past, example_past + example_new).expand(example_batch, -1)
    cache_axes = {0: batch, 2: past_len}
    shapes = {
        "input_ids": {0: batch, 1: new},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: new},
        "past": [(cache_axes, cache_axes)] * layers,
    }
    try:
        program = torch.onnx.export(
            _WithCache(model).eval(),
            (ids, mask, positions, past),
            dynamo=True,
            input_names=[*INPUTS, *cache_names(PAST, layers)],
            output_names=["logits", *cache_names(PRESENT, layers)],
            dynamic_shapes=shapes,
            verbose=False,
        )
        program.save(str(path), external_data=external)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; the user needs one line
        raise EdgetuneError(
            f"torch could not export {model.config.model_type} to ONNX ({str(exc).splitlines()[0][:200]})",
            "export the merged Hugging Face folder with --merged instead, and rerun with --debug to report this",
        ) from exc
    return int(program.model_proto.opset_import[0].version)
