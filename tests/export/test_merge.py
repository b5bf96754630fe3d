"""Merging adapters into a dequantized base: the arithmetic against an independent float64 write-out, the saved
folder against plain transformers, and the checks that guard it."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from edgetune.errors import EdgetuneError
from edgetune.export import merge
from edgetune.export.exporter import export
from edgetune.export.finished_run import open_finished_run
from edgetune.train.loading import nf4_config

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER = "model.layers.1.mlp.down_proj"


def fresh_nf4(model_dir):
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, quantization_config=nf4_config(), device_map={"": "cpu"}
    )


def dequantize_directly(module) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(module.weight.data, module.weight.quant_state)


def test_dequantized_base_is_bitsandbytes_own_dequantization_upcast(tiny_trainable_dir):
    model = fresh_nf4(tiny_trainable_dir)
    expected = dequantize_directly(model.get_submodule(LAYER)).float()
    plain = merge.dequantized_float32(model)
    assert torch.equal(plain.get_submodule(LAYER).weight, expected)
    assert plain.get_submodule(LAYER).weight.dtype == torch.float32
    assert not hasattr(plain.config, "quantization_config")


def test_dequantization_reads_weights_bitsandbytes_repacked_for_its_cpu_kernel(tiny_trainable_dir):
    model = fresh_nf4(tiny_trainable_dir)
    before = dequantize_directly(model.get_submodule(LAYER)).float()
    with torch.no_grad():  # an eval forward without grad is what makes bitsandbytes repack on AVX512-BF16 CPUs
        model.eval()(torch.tensor([[1, 2, 3, 4]]))
    after = merge.dequantized_float32(model).get_submodule(LAYER).weight
    # Repacking rounds the block scales to bf16 and its inverse re-quantizes them to 8 bits, so the weights come
    # back within about 1%, not exactly; read in the wrong layout they would be unrelated values.
    assert torch.allclose(after, before, rtol=0.03, atol=0)


def test_merged_weight_is_dequantized_base_plus_scaled_adapter_product(tiny_runs, tiny_trainable_dir):
    run = open_finished_run(tiny_runs["nf4"])
    merged = merge.merge_run(run)
    config = json.loads((run.weights_dir / "adapter_config.json").read_text())
    with safe_open(run.weights_dir / "adapter_model.safetensors", framework="pt") as handle:
        prefix = f"base_model.model.{LAYER}"
        a = handle.get_tensor(f"{prefix}.lora_A.weight").double()
        b = handle.get_tensor(f"{prefix}.lora_B.weight").double()
    assert b.abs().max() > 1e-3, "the adapter barely moved; the test would not see a lost merge"
    base = dequantize_directly(fresh_nf4(tiny_trainable_dir).get_submodule(LAYER)).double()
    expected = base + config["lora_alpha"] / config["r"] * (b @ a)
    assert torch.allclose(merged.model.get_submodule(LAYER).weight.double(), expected, rtol=1e-6, atol=1e-6)


def test_parameters_without_adapters_come_from_the_trained_base(tiny_runs, tiny_trainable_dir):
    merged = merge.merge_run(open_finished_run(tiny_runs["nf4"]))
    trained_base = fresh_nf4(tiny_trainable_dir)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(merged.model.get_parameter(name), trained_base.get_parameter(name).float())


@pytest.mark.parametrize("run_key", ["nf4", "bf16"])
def test_merge_checks_pass_and_are_tight(tiny_runs, run_key):
    merged = merge.merge_run(open_finished_run(tiny_runs[run_key]))
    checks = {check.name.split(" ")[0]: check for check in merged.checks}
    assert checks["merge"].max_abs_diff < merge.MERGE_TOLERANCE
    assert checks["merge"].top1_agreement == 1.0
    assert checks["as"].passed


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_merged_folder_loads_in_plain_transformers(tiny_runs, tmp_path, dtype):
    out = tmp_path / "merged"
    result = export(tiny_runs["nf4"], merged_dir=out, dtype=dtype).merged
    assert result.out_dir == out and all(check.passed for check in result.checks)
    assert {"config.json", "model.safetensors", "tokenizer.json", merge.EXPORT_FILE} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == str(merge.DTYPES[dtype]).split(".")[1]
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        names = list(handle.keys())
        assert handle.get_tensor(f"{LAYER}.weight").dtype == merge.DTYPES[dtype]
    assert "lm_head.weight" not in names, "tied embeddings must be stored once"
    assert not any("lora" in name for name in names)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_submodule(LAYER).weight.dtype == merge.DTYPES[dtype]
    saved = next(check for check in result.checks if check.name.startswith("saved"))
    assert saved.max_abs_diff <= saved.tolerance <= (merge.MERGE_TOLERANCE if dtype == "fp32" else 3.0)


def test_full_parameter_run_exports_the_weights_it_saved(tiny_runs, tmp_path):
    run = open_finished_run(tiny_runs["full"])
    assert run.weights_dir.name == "model"
    export(run.run_dir, merged_dir=tmp_path / "merged", dtype="fp32")
    saved = AutoModelForCausalLM.from_pretrained(run.weights_dir, dtype=torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    for (name, expected), (_, got) in zip(saved.named_parameters(), exported.named_parameters(), strict=True):
        assert torch.equal(expected, got), name


def test_a_failed_check_keeps_the_existing_output(tiny_runs, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    (out / merge.EXPORT_FILE).write_text("{}")  # an earlier export, which --overwrite may replace
    monkeypatch.setitem(merge.SAVED_TOLERANCE, "bf16", 0.0)
    with pytest.raises(EdgetuneError, match="drifts too far"):
        export(tiny_runs["nf4"], merged_dir=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [merge.EXPORT_FILE, "mine.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"], "a staging folder was left behind"


def test_unknown_dtype_is_refused_before_loading(tiny_runs, tmp_path):
    with pytest.raises(EdgetuneError, match="unknown dtype 'int8'"):
        export(tiny_runs["nf4"], merged_dir=tmp_path / "m", dtype="int8")
