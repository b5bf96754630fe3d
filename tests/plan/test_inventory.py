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


def _family_configs():
    """Small configs of families whose linears are not named like Llama's, built the way their hub configs are."""
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)
    grouped_query = dict(small, num_key_value_heads=2)
    return {
        "gpt_bigcode": dict(model_type="gpt_bigcode", n_embd=64, n_inner=256, n_layer=2, n_head=4, vocab_size=300),
        "gpt_neox": dict(small, model_type="gpt_neox", intermediate_size=256),
        "phi": dict(small, model_type="phi", intermediate_size=256),
        "qwen2": dict(grouped_query, model_type="qwen2"),
        "gemma": dict(grouped_query, model_type="gemma", head_dim=16),
        "mistral": dict(grouped_query, model_type="mistral"),
    }


def test_same_named_linears_of_different_shapes_keep_their_own_shapes():
    from transformers import AutoConfig, AutoModelForCausalLM

    data = _family_configs()["gpt_bigcode"]
    spec = inspect_config(data)
    c_proj = sorted((g.in_features, g.out_features, g.count) for g in spec.linear_groups("c_proj"))
    assert c_proj == [(64, 64, 2), (256, 64, 2)]  # attn.c_proj and mlp.c_proj
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**data))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    assert spec.linear_params == sum(m.weight.numel() for m in linears)
    assert nf4_bytes(spec) == sum(nf4_tensor_bytes(m.weight.numel()) for m in linears)
    rank = 8
    assert lora_params(lora_shapes(spec, rank, ("c_proj",))) == 2 * rank * ((64 + 64) + (256 + 64))


@pytest.mark.parametrize("family", sorted(_family_configs()))
def test_every_family_plans_with_its_own_module_names(family):
    from edgetune.plan.components import EDGETUNE_CPU, RunShape, estimate
    from edgetune.plan.strategies import DEFAULT_LORA_TARGETS, STRATEGIES

    spec = inspect_config(_family_configs()[family])
    # The default targets mean every attention and MLP linear, whatever the family calls them.
    shapes = lora_shapes(spec, 8, DEFAULT_LORA_TARGETS)
    assert len(shapes) == sum(g.count for g in spec.linears)
    for name in STRATEGIES:
        assert estimate(spec, STRATEGIES[name], RunShape(2, 32, 8), EDGETUNE_CPU).peak_bytes > 0


def test_a_config_that_needs_remote_code_is_one_line(tmp_path):
    from edgetune.plan.sources import resolve_model

    path = tmp_path / "config.json"
    path.write_text('{"model_type": "mysterynet", "auto_map": {"AutoModelForCausalLM": "modeling.MysteryNet"}}')
    with pytest.raises(EdgetuneError, match="never runs code from a model folder") as caught:
        resolve_model(str(path))
    assert "\n" not in str(caught.value)
