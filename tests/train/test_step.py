import copy
import math
import statistics
import time

import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from edgetune.plan.strategies import STRATEGIES
from edgetune.train.loading import LoraSettings, attach_lora
from edgetune.train.step import OptimizerSettings, make_optimizer, run_step


def lora_model(dropout: float, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = attach_lora(LlamaForCausalLM(tiny_llama_config()), LoraSettings(rank=4, dropout=dropout))
    with torch.no_grad():  # non-zero B factors, so the adapters (and their dropout) change the loss
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return model.train()


def batch(seed: int = 1, size: int = 4) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (size, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["hizoo-qlora", "mezo-qlora"])
def test_forward_only_steps_see_no_dropout(name):
    """The perturbed losses of one step must come from one network: with dropout in train mode they did not."""
    strategy = STRATEGIES[name]
    settings = OptimizerSettings(lr=1e-2, zo_eps=1e-3, seed=3)
    with_dropout, without = lora_model(0.1), lora_model(0.0)
    outcomes = []
    for model in (with_dropout, without):
        optimizer = make_optimizer(strategy, model, settings)
        outcomes.append(run_step(strategy, model, optimizer, [batch()]))
        assert model.training  # the step restores the mode it found
    assert outcomes[0].loss == outcomes[1].loss
    after_with, after_without = trainable(with_dropout), trainable(without)
    assert all(torch.equal(after_with[n], after_without[n]) for n in after_without)


def test_accumulated_micro_batches_step_like_one_batch():
    strategy = STRATEGIES["adamw-lora-gc"]
    whole, split = lora_model(0.0), lora_model(0.0)
    full = batch(size=4)
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    one = run_step(strategy, whole, make_optimizer(strategy, whole), [full])
    two = run_step(strategy, split, make_optimizer(strategy, split), halves)
    assert two.loss == pytest.approx(one.loss, rel=1e-6)
    assert two.grad_norm == pytest.approx(one.grad_norm, rel=1e-5)
    assert two.tokens == one.tokens == 64
    a, b = trainable(whole), trainable(split)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_clipping_scales_the_update_to_the_norm_limit_and_logs_the_norm_before_it():
    strategy = STRATEGIES["adamw-lora-gc"]
    model = lora_model(0.0)
    reference = copy.deepcopy(model)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    before = trainable(model)
    outcome = run_step(strategy, model, sgd, [batch()], max_grad_norm=1e-3)
    loss = reference(**batch()).loss
    loss.backward()
    grads = [p.grad for p in reference.parameters() if p.requires_grad]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert outcome.grad_norm == pytest.approx(float(norm), rel=1e-5) and outcome.grad_norm > 1e-3
    moved = torch.linalg.vector_norm(torch.cat([(before[n] - p).flatten() for n, p in trainable(model).items()]))
    assert float(moved) == pytest.approx(1e-3, rel=1e-4)  # SGD at lr 1 moves by exactly the clipped gradient


def test_no_update_leaves_the_weights_and_releases_the_gradients():
    strategy = STRATEGIES["adafish-lora"]
    model = lora_model(0.0)
    before = trainable(model)
    outcome = run_step(strategy, model, make_optimizer(strategy, model), [batch()], update=False)
    assert outcome.grad_norm > 0 and not outcome.skipped
    assert all(torch.equal(before[n], p) for n, p in trainable(model).items())
    assert all(p.grad is None for p in model.parameters())


def test_optimizer_settings_reach_every_optimizer():
    settings = OptimizerSettings(lr=0.5, weight_decay=0.25, zo_eps=2e-3, seed=7)
    for name in ("adafish-lora", "scaled-adamw-qlora-gc", "adamw-lora-gc", "hizoo-qlora"):
        optimizer = make_optimizer(STRATEGIES[name], lora_model(0.0), settings)
        group = optimizer.param_groups[0]
        assert (group["lr"], group["weight_decay"]) == (0.5, 0.25), name
    zeroth = make_optimizer(STRATEGIES["mezo-qlora"], lora_model(0.0), settings)
    assert zeroth.eps == 2e-3 and not zeroth.hessian and zeroth.state["base_seed"] == 7
    fzoo = make_optimizer(STRATEGIES["fzoo-qlora"], lora_model(0.0), settings)
    assert type(fzoo).__name__ == "FZOO" and fzoo.eps == 2e-3 and fzoo.state["base_seed"] == 7
    assert fzoo.directions + 1 == STRATEGIES["fzoo-qlora"].forwards_per_step


def test_an_fzoo_step_runs_its_forwards_in_eval_mode_and_moves_the_adapters():
    strategy, model = STRATEGIES["fzoo-qlora"], lora_model(0.0)
    before, calls = trainable(model), []
    model.get_input_embeddings().register_forward_pre_hook(lambda module, args: calls.append(module.training))
    outcome = run_step(strategy, model, make_optimizer(strategy, model, OptimizerSettings(lr=1e-3)), [batch()])
    assert calls == [False] * strategy.forwards_per_step and model.training
    assert not outcome.skipped and outcome.grad_norm is None and math.isfinite(outcome.loss)
    assert any(not torch.equal(before[n], p) for n, p in trainable(model).items())


def test_run_step_feeds_adafish_true_fisher_on_fisher_steps_and_updates_with_the_data_gradient(monkeypatch):
    import importlib

    from edgetune.optim import AdaFish

    step_module = importlib.import_module("edgetune.train.step")

    calls = []
    real = step_module.causal_lm_loss_and_sampled_grad
    monkeypatch.setattr(step_module, "causal_lm_loss_and_sampled_grad", lambda *args: calls.append(1) or real(*args))
    strategy = STRATEGIES["adafish-lora"]
    sampled, plain = lora_model(0.0), lora_model(0.0)
    true_fisher = AdaFish.from_model(sampled, lr=1e-2, fisher="true", fisher_every=2)
    batch_fisher = AdaFish.from_model(plain, lr=1e-2)
    full = batch(size=4)
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    outcome = run_step(strategy, sampled, true_fisher, halves)
    reference = run_step(strategy, plain, batch_fisher, halves)
    assert outcome.loss == pytest.approx(reference.loss, rel=1e-6) and len(calls) == 2  # one per micro-batch
    lora = [p for n, p in sampled.named_parameters() if ".lora_" in n]
    for p, q in zip(lora, (p for n, p in plain.named_parameters() if ".lora_" in n), strict=True):
        # Same first moment: the update saw the data gradient, not the sampled-label one.
        torch.testing.assert_close(true_fisher.state[p]["exp_avg"], batch_fisher.state[q]["exp_avg"])
    losses = [outcome.loss] + [run_step(strategy, sampled, true_fisher, halves).loss for _ in range(2)]
    assert len(calls) == 4  # steps 1 and 3 take the Fisher, step 2 does not
    assert all(true_fisher.state[p]["fisher_updates"] == 2 for p in lora)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    true_fisher.fisher_hooks.remove()


def test_true_fisher_extra_cost_per_step_is_logged(capsys):
    """Not a timed assertion: prints median step times of the batch, per-sample (hooks) and true (hooks and the
    sampled-label backward) Fisher, and the true Fisher's amortised time at fisher_every=4."""
    from edgetune.optim import AdaFish

    strategy = STRATEGIES["adafish-lora"]
    data = [batch(size=4)]
    modes = {"batch": {}, "per_sample": {"fisher": "per_sample"}, "true": {"fisher": "true"}}
    modes["true/4"] = {"fisher": "true", "fisher_every": 4}
    setups = {}
    for name, options in modes.items():
        model = lora_model(0.0)
        setups[name] = (model, AdaFish.from_model(model, lr=1e-3, **options))
    times = {name: [] for name in setups}
    for _ in range(10):  # interleaved, so every mode sees the same machine load
        for name, (model, optimizer) in setups.items():
            start = time.perf_counter()
            run_step(strategy, model, optimizer, data)
            times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(t[2:]) for name, t in times.items()}
    ms["true/4"] = 1e3 * statistics.mean(times["true/4"][2:10])  # two full periods of 4: the amortised cost
    with capsys.disabled():
        print(
            "\nAdaFish step on the tiny model, ms (x batch Fisher): "
            + ", ".join(f"{name} {value:.1f} ({value / ms['batch']:.2f}x)" for name, value in ms.items())
        )
    for _, optimizer in setups.values():
        if optimizer.fisher_hooks is not None:
            optimizer.fisher_hooks.remove()
