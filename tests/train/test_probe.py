import pytest
import torch

from edgetune.errors import EdgetuneError
from edgetune.plan.sources import resolve_model
from edgetune.train.loading import LoraSettings, load_model
from edgetune.train.probe import ProbeConfig, format_probe, run_probe


def tiny_config(folder, **overrides):
    settings = dict(
        model=str(folder), strategy="adamw-lora-gc", precision="fp32", lora_rank=4, batch_size=2, seq_len=32, steps=3
    )
    settings["lr"] = 1e-2
    settings.update(overrides)
    return ProbeConfig(**settings)


def test_probe_measures_real_steps_and_adamw_lowers_held_out_loss(tiny_trainable_dir):
    result = run_probe(tiny_config(tiny_trainable_dir, steps=6))
    assert [s.step for s in result.steps] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(s.loss)) and s.grad_norm > 0 for s in result.steps)
    assert all(s.tokens == 2 * 32 for s in result.steps)
    # A step allocates at least its logits (batch x seq x vocab fp32) on top of the resident weights.
    vocab = 320
    assert result.peak_step_bytes >= 2 * 32 * vocab * 4
    assert result.val_loss_after < result.val_loss_before
    assert result.trainable_params < result.total_params


def test_probe_without_optimizer_leaves_the_model_unchanged(tiny_trainable_dir):
    result = run_probe(tiny_config(tiny_trainable_dir, update=False, steps=2))
    assert result.val_loss_after == pytest.approx(result.val_loss_before, abs=1e-6)


def test_full_fine_tuning_trains_every_parameter(tiny_trainable_dir):
    result = run_probe(tiny_config(tiny_trainable_dir, strategy="adamw-full-gc", steps=1, checkpointing=False))
    assert result.trainable_params == result.total_params


def test_resident_bytes_count_weights_adapters_and_adam_state(tiny_trainable_dir):
    result = run_probe(tiny_config(tiny_trainable_dir, steps=1))
    base = result.total_params - result.trainable_params
    # fp32 base, tied head counted once; fp32 adapters with AdamW's two moments (+ step counters).
    expected = 4 * base + 4 * result.trainable_params * 3
    assert expected <= result.resident_bytes <= expected + 4096


def test_nf4_resident_bytes_include_the_quantization_scales(tiny_trainable_dir):
    nf4 = run_probe(tiny_config(tiny_trainable_dir, precision="nf4", steps=1, update=False))
    model = load_model(resolve_model(str(tiny_trainable_dir)), "nf4", lora=LoraSettings(rank=4))
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert nf4.resident_bytes > parameter_bytes


def test_format_probe_shows_each_step_and_the_loss_change(tiny_trainable_dir):
    text = format_probe(run_probe(tiny_config(tiny_trainable_dir, steps=2)))
    assert "LoRA r=4" in text and "held-out loss" in text
    assert len([line for line in text.splitlines() if line.strip().startswith(("1 ", "2 "))]) == 2


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"seq_len": -1}, "seq_len must be positive"),
        ({"steps": 0}, "steps must be positive"),
        ({"lora_rank": -2}, "lora_rank must be positive"),
        ({"precision": "nf4", "strategy": "adamw-full-gc"}, "NF4 base needs LoRA"),
        ({"precision": "fp8"}, "unknown precision"),
        ({"strategy": "sgd"}, "unknown strategy"),
        ({"strategy": "hizoo-qlora", "update": False}, "forward-only"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"device": "tpu"}, "unknown device"),
    ],
)
def test_bad_probe_settings_are_one_line_errors(tiny_trainable_dir, overrides, message):
    with pytest.raises(EdgetuneError, match=message):
        tiny_config(tiny_trainable_dir, **overrides)


def test_cuda_on_a_machine_without_it_is_refused(tiny_trainable_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EdgetuneError, match="CUDA is not available"):
        run_probe(tiny_config(tiny_trainable_dir, device="cuda"))
