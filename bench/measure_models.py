"""The models bench/planner_measure.py measures: any Hugging Face config, saved with random weights.

A measured step needs a model folder, but its memory does not depend on the weights' values, so a model of any
shape is built from its config.json with random weights (optionally with fewer decoder layers, so a 1B-wide
model can be measured on a laptop with 2 of its 16 layers) and saved next to SmolLM2's tokenizer. The vocabulary
stays the config's: token ids from SmolLM2's 49,152-entry tokenizer are valid ids of any larger vocabulary.
"""

import json
from pathlib import Path

import torch

from edgetune.plan.sources import resolve_model
from edgetune.train.loading import load_tokenizer

# A 2-layer Llama with SmolLM2's vocabulary (49,152), so the loss is as large a part of the step as in real models.
TINY_CONFIG = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


def model_name(config_path: str | None, layers: int | None) -> str:
    """``tiny``, or the config file's name without ``-config``, with ``-2L`` when the layers are overridden."""
    name = "tiny" if config_path is None else Path(config_path).stem.removesuffix("-config").removesuffix("_config")
    return name if layers is None else f"{name}-{layers}L"


def read_config(config_path: str | None, layers: int | None) -> dict:
    """The config to build: the file's (or the tiny model's), with ``num_hidden_layers`` replaced by ``layers``."""
    config = dict(TINY_CONFIG) if config_path is None else json.loads(Path(config_path).read_text())
    if layers is not None:
        config["num_hidden_layers"] = layers
    return config


def save_model(config: dict, folder: Path) -> None:
    """Save a model of ``config`` with random weights (bf16) and SmolLM2's tokenizer into ``folder``.

    Its config.json is then the full config transformers wrote, which the planner inspects.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "torch_dtype", "dtype")}
    hf_config = AutoConfig.for_model(config["model_type"], **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config)
    # bf16, as published checkpoints are: every strategy loads the weights in its own precision, so the file's
    # dtype changes no tracked tensor byte, but RSS does depend on it (bf16 tensors loaded in bf16 stay views of
    # the memory-mapped file, as with a real checkpoint).
    model.to(torch.bfloat16).save_pretrained(folder)
    del model
    load_tokenizer(resolve_model("smollm2-135m")).save_pretrained(folder)
