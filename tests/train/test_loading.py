import copy
import zlib

import pytest
import torch

from edgetune.errors import EdgetuneError
from edgetune.plan.sources import ModelSource
from edgetune.train.loading import LoraSettings, attach_lora, load_model, trainable_parameter_count

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def source(folder, has_weights=True):
    return ModelSource(name=str(folder), kind="folder", path=folder, has_weights=has_weights)


def batch(vocab=128, n=2, length=16):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, length), generator=generator)
    return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_full_precision_loads_every_parameter_trainable(tiny_model_dir, precision, dtype):
    model = load_model(source(tiny_model_dir), precision)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert trainable_parameter_count(model) == sum(p.numel() for p in model.parameters())
    assert model.training and model.config.use_cache is False


def test_lora_adds_exactly_rank_times_in_plus_out_per_target(tiny_model_dir):
    model = load_model(source(tiny_model_dir), "fp32", lora=LoraSettings(rank=4, alpha=8))
    hidden, inter, heads, kv_heads, layers = 64, 128, 4, 2, 2
    kv_out = hidden // heads * kv_heads
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv_out),
        "v_proj": (hidden, kv_out),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    expected = layers * sum(4 * (i + o) for i, o in shapes.values())
    assert trainable_parameter_count(model) == expected
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_nf4_quantizes_linears_and_keeps_embeddings_and_head_16_bit(tiny_model_dir):
    import bitsandbytes as bnb

    model = load_model(source(tiny_model_dir), "nf4", lora=LoraSettings(rank=4), gradient_checkpointing=True)
    base = model.get_base_model()
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert base.model.layers[0].mlp.down_proj.base_layer.weight.quant_state.quant_type == "nf4"
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert base.lm_head.weight.dtype == torch.bfloat16
    assert base.model.norm.weight.dtype == torch.bfloat16
    # Adapters stay fp32 (peft's default) so optimizer updates are not lost to bf16 rounding.
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_nf4_lora_with_checkpointing_gives_finite_loss_and_adapter_gradients(tiny_model_dir):
    model = load_model(source(tiny_model_dir), "nf4", lora=LoraSettings(rank=4), gradient_checkpointing=True)
    assert all(layer.gradient_checkpointing for layer in model.get_base_model().model.layers)
    loss = model(**batch()).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    # lora_B starts at zero, so only lora_B receives a non-zero gradient on the first step.
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_checkpointing_recomputes_without_changing_gradients(tiny_model_dir):
    def adapter_grads(checkpointing):
        torch.manual_seed(0)
        model = load_model(
            source(tiny_model_dir), "fp32", lora=LoraSettings(rank=4), gradient_checkpointing=checkpointing
        )
        for name, param in model.named_parameters():
            if "lora_B" in name:  # non-zero B so that lora_A gets gradients too
                generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                torch.nn.init.normal_(param, std=0.02, generator=generator)
        model(**batch()).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, recomputed = adapter_grads(False), adapter_grads(True)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7)
        assert plain[name].abs().sum() > 0


def test_nf4_without_lora_is_refused(tiny_model_dir):
    with pytest.raises(EdgetuneError, match="NF4 base cannot be trained without adapters"):
        load_model(source(tiny_model_dir), "nf4")


def test_architecture_only_source_is_refused(tiny_model_dir):
    with pytest.raises(EdgetuneError, match="holds no weights"):
        load_model(source(tiny_model_dir, has_weights=False), "bf16")


def test_unknown_precision_is_refused(tiny_model_dir):
    with pytest.raises(EdgetuneError, match="unknown precision 'int3'"):
        load_model(source(tiny_model_dir), "int3")


def test_lora_targets_that_do_not_exist_name_the_real_linears(tiny_model_dir):
    with pytest.raises(EdgetuneError, match="pick from its linear layers: .*q_proj"):
        load_model(source(tiny_model_dir), "fp32", lora=LoraSettings(target_modules=("c_attn",)))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rank": 0}, "rank must be positive"),
        ({"alpha": 0}, "alpha must be positive"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"target_modules": ()}, "target_modules is empty"),
    ],
)
def test_lora_settings_are_validated(kwargs, message):
    with pytest.raises(EdgetuneError, match=message):
        LoraSettings(**kwargs)


@pytest.mark.default_model
def test_the_default_model_trains_in_nf4_with_lora_and_checkpointing():
    from edgetune.plan.sources import resolve_model
    from edgetune.train.batching import batches, pad_token_id
    from edgetune.train.data import DataConfig, load_dataset
    from edgetune.train.loading import load_tokenizer

    resolved = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(resolved)
    data = load_dataset(DataConfig(seq_len=64), tokenizer)
    model = load_model(resolved, "nf4", lora=LoraSettings(rank=8), gradient_checkpointing=True)
    batch = next(batches(data.train, 2, pad_token_id(tokenizer)))
    loss = model(**batch).loss
    loss.backward()
    # Pretrained on English prose, the model predicts Austen far better than chance (ln 49152 = 10.8).
    assert torch.isfinite(loss) and loss.item() < 6.0
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(adapters) == 30 * 7 * 2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapters.values())
    assert all(p.grad.abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n)


def test_an_evaluation_does_not_change_later_4bit_gradients(tiny_model_dir):
    """bitsandbytes repacks 4-bit weights at an eval forward on AVX512-BF16 CPUs and then loses the gradient
    through them (see loading.keep_4bit_layout); training after an evaluation must get the same gradients."""

    def adapter_grads(evaluate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = load_model(source(tiny_model_dir), "nf4", lora=LoraSettings(rank=4), gradient_checkpointing=True)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # non-zero B so gradients reach lora_A and earlier layers
                torch.nn.init.normal_(parameter, std=0.1)
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        if evaluate_first:
            with torch.no_grad():
                model.eval()(input_ids=ids)
            model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, after_eval = adapter_grads(False), adapter_grads(True)
    assert plain.keys() == after_eval.keys()
    for name in plain:
        assert torch.equal(plain[name], after_eval[name]), name


def test_all_linear_adapts_every_linear_of_a_block_but_not_the_head(tiny_model):
    from edgetune.plan.strategies import DEFAULT_LORA_TARGETS
    from edgetune.train.loading import attach_lora

    def adapted(model):
        return sorted(name for name, _ in model.named_modules() if name.endswith(".lora_A"))

    every = attach_lora(copy.deepcopy(tiny_model), LoraSettings(rank=4, target_modules=("all-linear",)))
    listed = attach_lora(copy.deepcopy(tiny_model), LoraSettings(rank=4, target_modules=DEFAULT_LORA_TARGETS))
    assert adapted(every) == adapted(listed) and len(adapted(every)) == 2 * 7
    assert not any("lm_head" in name for name in adapted(every))


def test_flash_attention_only_on_cuda_in_16_bit_where_installed(monkeypatch):
    import importlib.util

    from edgetune.train.loading import attention_implementation

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert attention_implementation(cuda, "bf16") == attention_implementation(cuda, "nf4") == "flash_attention_2"
    assert attention_implementation(cuda, "fp32") is None and attention_implementation(cpu, "bf16") is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name))
    assert attention_implementation(cuda, "bf16") is None


@pytest.mark.gpu
def test_packed_rows_train_on_cuda_with_the_installed_attention(tiny_trainable_dir):
    from edgetune.train.batching import collate_packed, pack

    source = ModelSource(name="tiny", kind="folder", path=tiny_trainable_dir, has_weights=True)
    model = load_model(source, "bf16", device="cuda", lora=LoraSettings(rank=4, alpha=8.0))
    examples = [
        {"input_ids": torch.arange(1, n + 1), "labels": torch.arange(1, n + 1), "length": n} for n in (5, 9, 3, 12)
    ]
    batch = {k: v.cuda() for k, v in collate_packed(pack(examples, 16), pad_id=0).items()}
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_default_targets_adapt_every_linear_of_a_family_with_other_names():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    model = attach_lora(GPTNeoXForCausalLM(config), LoraSettings(rank=4, alpha=8.0))
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
