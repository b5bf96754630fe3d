"""AdaFish's true Fisher (adafish_true_fisher.py): the labels come from the model's softmax, the statistic equals
the hand computation at the drawn labels and, in expectation, the Fisher summed over the vocabulary, and the data
gradient that the update uses is untouched."""

import copy
import importlib

import pytest
import torch
from conftest import tiny_llama_config
from peft import LoraConfig, get_peft_model
from test_adafish import lora_llama
from transformers import LlamaForCausalLM

from edgetune.errors import EdgetuneError
from edgetune.optim import AdaFish
from edgetune.optim.adafish_true_fisher import label_generator, sample_labels
from edgetune.train.chunked_loss import causal_lm_loss, causal_lm_loss_and_sampled_grad
from edgetune.train.tokens import IGNORE_INDEX

chunked_loss = importlib.import_module("edgetune.train.chunked_loss")  # `edgetune.train` is also a function name


def lora_names(model):
    return [n for n, p in model.named_parameters() if ".lora_" in n]


def gram(g, name):
    g = g.double()
    return g @ g.T if ".lora_A." in name else g.T @ g


@pytest.fixture
def drawn(monkeypatch):
    """The labels the chunked loss draws, in order."""
    record = []

    def recording(probs, generator):
        labels = sample_labels(probs, generator)
        record.append(labels)
        return labels

    monkeypatch.setattr(chunked_loss, "sample_labels", recording)
    return record


def test_labels_are_drawn_from_the_probabilities_and_reproducible():
    """Two rows (one a point mass), 20,000 draws each, over several 64-row blocks of the cumulative sum."""
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]]) * 0.7  # need not sum to 1
    rows = probs.repeat_interleave(20_000, dim=0)
    labels = sample_labels(rows, label_generator(torch.device("cpu"), seed=3, step=1)).view(2, -1)
    freq = torch.stack([torch.bincount(row, minlength=5) for row in labels]).double() / 20_000
    # 4 standard deviations of a frequency over 20,000 draws is at most 4·√(0.25/20,000) = 0.014.
    torch.testing.assert_close(freq, probs.double() / 0.7, rtol=0, atol=0.014)
    assert torch.equal(freq[probs == 0], torch.zeros(int((probs == 0).sum()), dtype=torch.float64))
    again = sample_labels(rows, label_generator(torch.device("cpu"), seed=3, step=1)).view(2, -1)
    other_step = sample_labels(rows, label_generator(torch.device("cpu"), seed=3, step=2)).view(2, -1)
    assert torch.equal(labels, again) and not torch.equal(labels, other_step)


def batch_with_prompt(size=3, length=8, prompt=3, seed=1):
    ids = torch.randint(0, 128, (size, length), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :prompt] = IGNORE_INDEX  # every example has length − prompt labels: per-example means weigh the same
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def with_drawn_labels(batch, labels):
    relabelled = batch["labels"].clone()
    view = relabelled[:, 1:]  # label t + 1 is predicted at position t, the order the loss draws in
    view[view != IGNORE_INDEX] = torch.cat(labels)
    return {**batch, "labels": relabelled}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_statistic_equals_the_per_example_fisher_at_the_drawn_labels_and_grads_stay_the_datas(drawn, checkpointing):
    model = lora_llama()
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    twin = copy.deepcopy(model)
    batch = batch_with_prompt()
    opt = AdaFish.from_model(model, fisher="true")
    fisher = opt.sampled_fisher()
    loss, output, sampled_grad = causal_lm_loss_and_sampled_grad(model, batch, fisher.generator)
    fisher.backward(output, sampled_grad)
    assert all(p.grad is None for p in model.parameters())  # the Fisher's backward leaves .grad alone
    loss.backward()
    causal_lm_loss(twin, batch).backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)
    relabelled = with_drawn_labels(batch, drawn)
    params = dict(twin.named_parameters())
    expected = dict.fromkeys(lora_names(twin), 0)
    for i in range(3):  # brute force: one backward per example at its drawn labels
        twin.zero_grad()
        causal_lm_loss(twin, {k: v[i : i + 1] for k, v in relabelled.items()}).backward()
        for name in expected:
            expected[name] = expected[name] + gram(params[name].grad, name) / 3
    for name, p in model.named_parameters():
        if ".lora_" in name:
            scale = expected[name].abs().max().item()
            torch.testing.assert_close(opt.fisher_hooks.pop(p).double(), expected[name], rtol=1e-4, atol=1e-5 * scale)
    opt.fisher_hooks.remove()


def one_label_model(vocab):
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=vocab, hidden_size=32, intermediate_size=64, tie_word_embeddings=False)
    base = LlamaForCausalLM(config)
    with torch.no_grad():
        base.lm_head.weight.mul_(30.0)  # a peaked softmax, so sampling from it differs from sampling uniformly
    lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(base, lora).train()


def test_expected_statistic_is_the_fisher_summed_over_the_vocabulary():
    """E_ŷ[G̃ G̃ᵀ] = Σ_y p(y) G_y G_yᵀ: one labelled position, 16384 copies of the example, one draw each."""
    vocab, copies = 16, 16384
    model = one_label_model(vocab)
    ids = torch.tensor([[3, 7, 1, 12]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    params = dict(model.named_parameters())
    names = lora_names(model)
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits[0, -2].double(), dim=-1)  # position 2 predicts label 3
    exact, uniform, at_label = dict.fromkeys(names, 0), dict.fromkeys(names, 0), []
    for y in range(vocab):
        model.zero_grad()
        labels[0, 3] = y
        causal_lm_loss(model, {"input_ids": ids, "labels": labels}).backward()  # −log p(y | x)
        at_label.append({name: gram(params[name].grad, name) for name in names})
        for name in names:
            exact[name] = exact[name] + probs[y] * at_label[y][name]
            uniform[name] = uniform[name] + at_label[y][name] / vocab
    model.zero_grad()
    labels[0, 3] = 0  # the data label marks the position; the true Fisher draws its own there
    opt = AdaFish.from_model(model, fisher="true")
    fisher = opt.sampled_fisher()
    batch = {"input_ids": ids.expand(copies, -1), "labels": labels.expand(copies, -1)}
    _, output, sampled_grad = causal_lm_loss_and_sampled_grad(model, batch, fisher.generator)
    fisher.backward(output, sampled_grad)
    likeliest = at_label[int(probs.argmax())]
    for name in names:
        got = opt.fisher_hooks.pop(params[name]).double()
        size = exact[name].norm()
        # Monte-Carlo error of a mean of 16384 draws: 2-5 % here (depends on the seed); 12 % leaves room. Drawing
        # uniformly, or always the likeliest label, would miss by far more.
        assert (got - exact[name]).norm() < 0.12 * size, name
        assert (uniform[name] - exact[name]).norm() > 0.5 * size, name
        assert (likeliest[name] - exact[name]).norm() > 0.5 * size, name
    opt.fisher_hooks.remove()


def test_a_true_fisher_step_without_the_sampled_backward_raises_and_changes_nothing():
    model = lora_llama()
    opt = AdaFish.from_model(model, fisher="true")
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()  # a data backward only: the hooks do not count it
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(EdgetuneError, match=r"no true \(sampled-label\) Fisher was captured"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    opt.fisher_hooks.remove()


def test_sampled_fisher_is_requested_only_on_fisher_steps_of_the_true_mode():
    model = lora_llama()
    assert AdaFish.from_model(model, fisher="batch").sampled_fisher() is None
    per_sample = AdaFish.from_model(model, fisher="per_sample")
    assert per_sample.sampled_fisher() is None
    per_sample.fisher_hooks.remove()
    opt = AdaFish.from_model(model, fisher="true", fisher_every=3)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    requested = []
    for _ in range(4):
        fisher = opt.sampled_fisher()
        requested.append(fisher is not None)
        assert opt.fisher_hooks.armed == (fisher is not None) and not opt.fisher_hooks.collecting
        batch = {"input_ids": ids, "labels": ids}
        if fisher is None:
            causal_lm_loss(model, batch).backward()
        else:
            loss, output, sampled_grad = causal_lm_loss_and_sampled_grad(model, batch, fisher.generator)
            fisher.backward(output, sampled_grad)
            loss.backward()
        opt.step()
        opt.zero_grad()
    assert requested == [True, False, False, True]
    opt.fisher_hooks.remove()
