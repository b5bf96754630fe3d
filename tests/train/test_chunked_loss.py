import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from edgetune.optim.adafish_true_fisher import sample_labels
from edgetune.train.batching import collate, collate_packed, pack
from edgetune.train.chunked_loss import (
    causal_lm_loss,
    causal_lm_loss_and_sampled_grad,
    loss_sum,
    streamed_loss_sum,
    supports_chunked_loss,
)
from edgetune.train.loading import LoraSettings, attach_lora
from edgetune.train.tokens import IGNORE_INDEX

VOCAB = 1000  # loss_chunk_positions gives 4194 positions; the tests pass small chunks through monkeypatching


def _model(tied=True, seed=0):
    torch.manual_seed(seed)
    config = tiny_llama_config(vocab_size=VOCAB, tie_word_embeddings=tied, use_cache=False)
    return LlamaForCausalLM(config).train()


def _batch(seed=0, prompt=3):
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for n in (9, 14, 5, 12):
        ids = torch.randint(0, VOCAB, (n,), generator=generator)
        labels = ids.clone()
        labels[:prompt] = IGNORE_INDEX
        examples.append({"input_ids": ids, "labels": labels, "length": n})
    return examples


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def small_chunks(monkeypatch):
    import importlib

    # `edgetune.train` is the train() function; the module is reached through importlib.
    chunked = importlib.import_module("edgetune.train.chunked_loss")
    monkeypatch.setattr(chunked, "loss_chunk_positions", lambda vocab: 7)  # several chunks, a ragged last one


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("lora", [False, True])
def test_chunked_loss_and_gradients_equal_the_models_own(small_chunks, tied, lora):
    batch = collate(_batch(), pad_id=0)
    reference, chunked = _model(tied), _model(tied)
    if lora:
        settings = LoraSettings(rank=4, alpha=8.0)
        torch.manual_seed(1)
        reference = attach_lora(reference, settings)
        torch.manual_seed(1)
        chunked = attach_lora(chunked, settings)
        for model in (reference, chunked):  # B starts at zero; make the adapters matter
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    expected = reference(**batch).loss
    expected.backward()
    got = causal_lm_loss(chunked, batch)
    got.backward()
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    want, have = _grads(reference), _grads(chunked)
    assert want.keys() == have.keys() and want
    for name in want:
        scale = want[name].abs().max().clamp_min(1e-12)
        assert (have[name] - want[name]).abs().max() / scale < 1e-5, name


def test_packed_batches_and_scaled_losses_work_through_the_chunked_loss(small_chunks):
    examples = _batch()
    model = _model()
    packed = collate_packed(pack(examples, 32), pad_id=0)
    padded = collate(examples, pad_id=0)
    (causal_lm_loss(model, packed) / 2).backward()
    packed_grads = _grads(model)
    model.zero_grad()
    (model(**padded).loss / 2).backward()
    for name, grad in _grads(model).items():
        assert torch.allclose(packed_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_without_grad_the_loss_is_streamed_and_equal(small_chunks):
    model = _model()
    batch = collate(_batch(), pad_id=0)
    with torch.no_grad():
        expected = float(model(**batch).loss)
        got = float(causal_lm_loss(model, batch))
    assert got == pytest.approx(expected, rel=1e-6)
    total, count = streamed_loss_sum(model, batch)
    assert total / count == pytest.approx(expected, rel=1e-6) and count == sum(n - 3 for n in (9, 14, 5, 12))


def test_loss_sum_matches_cross_entropy():
    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 8), torch.randn(50, 8)
    targets = torch.randint(0, 50, (10,))
    total, count = loss_sum(hidden, weight, targets, chunk=3)
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    assert count == 10 and float(total) == pytest.approx(float(expected), rel=1e-6)


def test_models_that_transform_their_logits_keep_their_own_loss():
    model = _model()
    assert supports_chunked_loss(model)
    model.config.final_logit_softcapping = 30.0
    assert not supports_chunked_loss(model)
    model.config.final_logit_softcapping = None
    model.lm_head = torch.nn.Linear(64, VOCAB, bias=True)
    assert not supports_chunked_loss(model)


@pytest.mark.parametrize("chunked", [True, False])
def test_sampled_grad_is_the_gradient_of_the_loss_at_the_drawn_labels(small_chunks, monkeypatch, chunked):
    """d/d(output) of mean −log p(ŷ) equals the returned gradient; the loss is causal_lm_loss's (several chunks, and
    the logits path of models that keep their own loss)."""
    import importlib

    module = importlib.import_module("edgetune.train.chunked_loss")
    drawn = []
    for drawing in (module, importlib.import_module("edgetune.optim.adafish_true_fisher")):  # chunks; logits path
        monkeypatch.setattr(
            drawing, "sample_labels", lambda probs, gen: drawn.append(sample_labels(probs, gen)) or drawn[-1]
        )
    if not chunked:
        monkeypatch.setattr(module, "supports_chunked_loss", lambda base: False)
    model = _model()
    batch = collate(_batch(), pad_id=0)
    loss, output, sampled_grad = causal_lm_loss_and_sampled_grad(model, batch, torch.Generator().manual_seed(0))
    assert float(loss) == pytest.approx(float(causal_lm_loss(model, batch)), rel=1e-6)
    labels = torch.cat(drawn)
    count = sum(n - 3 for n in (9, 14, 5, 12))
    assert labels.shape == (count,) and len(drawn) == (4 if chunked else 1)  # 28 positions, 7 a chunk
    logits = output @ model.lm_head.weight.T if chunked else output
    expected = torch.autograd.grad(torch.nn.functional.cross_entropy(logits.float(), labels), output)[0]
    torch.testing.assert_close(sampled_grad, expected, rtol=1e-4, atol=1e-7)
    assert not torch.equal(labels, batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE_INDEX])
