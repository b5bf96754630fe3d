"""Fit the planner's per-layer activation coefficients from what autograd really saves.

Saved-tensor hooks count the bytes of every new tensor autograd keeps for backward (parameters and storages
seen before excluded, each storage once) in a Llama model with 1 and with 2 decoder layers; the difference is
one layer. Repeated over several shapes, LoRA target sets and base precisions, the per-token bytes are fitted
exactly (they are integer combinations of the dimensions) by least squares on these features:

    hidden, kv_dim (= kv heads x head dim), intermediate, heads, sum of adapted-module input widths,
    adapted modules x rank

    .venv/bin/python bench/planner_calibrate.py        # prints the coefficients and the fit residual

The printed table is what edgetune/calibration.py holds as ACTIVATION_COEFFICIENTS.
"""

import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FEATURES = ("hidden", "kv_dim", "intermediate", "heads", "adapted_inputs", "adapted_rank")
TARGET_SETS = {
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qv": ("q_proj", "v_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
SHAPES = [  # hidden, intermediate, heads, kv heads
    (128, 256, 4, 2),
    (192, 512, 6, 3),
    (256, 640, 8, 8),
    (128, 384, 2, 1),
    (320, 832, 5, 1),
]


def saved_bytes_per_token(mode: str, shape, targets, rank: int, checkpointing: bool, tokens=(2, 32)) -> float:
    per_model = [_saved_bytes(mode, shape, targets, rank, checkpointing, layers, tokens) for layers in (1, 2)]
    return (per_model[1] - per_model[0]) / (tokens[0] * tokens[1])


def _saved_bytes(mode, shape, targets, rank, checkpointing, layers, tokens) -> int:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgetune.train.loading import enable_checkpointing, nf4_config

    hidden, intermediate, heads, kv_heads = shape
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=True,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    if mode.endswith("nf4"):
        import tempfile

        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=nf4_config(), dtype=torch.bfloat16, device_map={"": "cpu"}
            )
    if checkpointing:
        enable_checkpointing(model)
    if mode.startswith("lora"):
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets)))
    model.train()
    known = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}
    keep = []

    def pack(tensor):
        storage = tensor.untyped_storage()
        keep.append(storage)  # hold it so that ids are not reused while counting
        if storage._cdata not in known:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    ids = torch.randint(0, 128, tokens)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.model(input_ids=ids)  # the decoder stack only: embeddings and head cancel between 1 and 2 layers
    return sum(saved.values())


def features(shape, targets, rank: int) -> list[float]:
    hidden, intermediate, heads, kv_heads = shape
    kv_dim = hidden // heads * kv_heads
    widths = {
        "q_proj": hidden,
        "k_proj": hidden,
        "v_proj": hidden,
        "o_proj": hidden,
        "gate_proj": hidden,
        "up_proj": hidden,
        "down_proj": intermediate,
    }
    adapted = [widths[t] for t in targets]
    return [hidden, kv_dim, intermediate, heads, sum(adapted), len(adapted) * rank]


def fit(mode: str, checkpointing: bool) -> dict[str, float]:
    rows, values = [], []
    target_sets = TARGET_SETS.values() if mode.startswith("lora") else [()]
    for shape, targets, rank in itertools.product(SHAPES, target_sets, (4, 8)):
        rows.append(features(shape, targets, rank))
        values.append(saved_bytes_per_token(mode, shape, targets, rank, checkpointing))
    design, target = torch.tensor(rows, dtype=torch.float64), torch.tensor(values, dtype=torch.float64)
    solution = torch.linalg.lstsq(design, target.unsqueeze(1)).solution.squeeze(1)
    residual = float((design @ solution - target).abs().max())
    coefficients = {name: round(float(value), 3) for name, value in zip(FEATURES, solution, strict=True)}
    return coefficients | {"max_residual_bytes_per_token": round(residual, 3)}


def main() -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    table = {}
    for mode in ("lora-bf16", "lora-nf4", "full-bf16"):
        for checkpointing in (False, True):
            key = f"{mode}{'-gc' if checkpointing else ''}"
            table[key] = fit(mode, checkpointing)
            print(key, json.dumps(table[key]), flush=True)
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
