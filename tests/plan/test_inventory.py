import pytest
import torch
from conftest import tiny_llama_config

from edgetune.errors import EdgetuneError
from edgetune.plan.inventory import inspect_config, lora_params, lora_shapes, nf4_bytes, nf4_tensor_bytes

LLAMA_31_8B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
)


def tiny_dict(**overrides):
    return tiny_llama_config(**overrides).to_dict()


def test_tiny_llama_counts_by_hand():
    spec = inspect_config(tiny_dict())
    h, i, kv, layers, vocab = 64, 128, 32, 2, 128
    per_layer = h * h + h * kv + h * kv + h * h + h * i + h * i + i * h
    assert spec.linear_params == layers * per_layer
    assert spec.embedding_params == vocab * h
    assert spec.head_params == 0 and spec.tied_embeddings
    assert spec.other_params == layers * 2 * h + h
    assert spec.total_params == sum(
        p.numel() for p in __import__("transformers").LlamaForCausalLM(tiny_llama_config()).parameters()
    )
    assert spec.largest_tensor_params == vocab * h


def test_an_untied_head_is_counted_separately():
    spec = inspect_config(tiny_dict(tie_word_embeddings=False))
    assert spec.head_params == 128 * 64 and not spec.tied_embeddings


def test_llama_31_8b_matches_the_published_inventory():
    spec = inspect_config(LLAMA_31_8B)
    assert spec.total_params == 8_030_261_248
    assert spec.linear_params == 6_979_321_856
    assert spec.embedding_params + spec.head_params == 2 * 128256 * 4096


def test_lora_shapes_and_params_follow_r_times_in_plus_out():
    spec = inspect_config(LLAMA_31_8B)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # planner-model.md 6.3: Llama-3.1-8B all-linear r=8 has 21.0M and r=16 41.9M adapter parameters.
    assert lora_params(lora_shapes(spec, 8, targets)) == 20_971_520
    assert lora_params(lora_shapes(spec, 16, targets)) == 41_943_040
    assert lora_shapes(spec, 4, ("q_proj",)) == [(4, 4096, 4096)] * 32


def test_lora_targets_that_match_nothing_are_an_error():
    with pytest.raises(EdgetuneError, match="pick from: q_proj"):
        lora_shapes(inspect_config(tiny_dict()), 8, ("c_attn",))


@pytest.mark.parametrize("shape", [(64, 128), (576, 576), (1536, 576), (100, 64)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bytes_equal_what_bitsandbytes_stores(shape, double_quant):
    import bitsandbytes as bnb

    weight = torch.randn(shape)
    quantized = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=double_quant, quant_type="nf4"
    )._quantize("cpu")
    stored = quantized.numel() * quantized.element_size() + _quant_state_bytes(quantized.quant_state)
    assert nf4_tensor_bytes(weight.numel(), double_quant) == stored


def _quant_state_bytes(state):
    total = 0
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif hasattr(value, "absmax"):
            total += _quant_state_bytes(value)
    return total


def test_nf4_bytes_of_a_model_sum_its_linears():
    spec = inspect_config(tiny_dict())
    expected = sum(nf4_tensor_bytes(g.in_features * g.out_features) * g.count for g in spec.linears)
    assert nf4_bytes(spec) == expected
    # About 0.52 bytes per weight with double quantization, as the QLoRA paper's arithmetic says.
    big = inspect_config(LLAMA_31_8B)
    assert 0.515 < nf4_bytes(big) / big.linear_params < 0.517


def test_a_config_that_cannot_build_a_model_is_a_clear_error():
    with pytest.raises(EdgetuneError, match="does not describe a causal LM"):
        inspect_config({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 5})
