"""ONNX export checked the way a user would run it: onnxruntime on CPU, other shapes than the traced ones,
decoding with the KV cache, the int8 file, external weights, and every decoder family the exporter claims."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import make_tokenizer, tiny_llama_config
from transformers import AutoConfig, AutoModelForCausalLM

from edgetune.errors import EdgetuneError
from edgetune.export import onnx_export
from edgetune.export.exporter import export
from edgetune.export.finished_run import FinishedRun
from edgetune.export.logit_checks import sample_batch, torch_greedy, torch_logits
from edgetune.export.merge import MergedRun
from edgetune.export.onnx_decode import cpu_session, empty_past, greedy_with_cache, prefill_logits
from edgetune.plan.strategies import get_strategy

pytestmark = pytest.mark.usefixtures("one_thread")


def run_onnx(path: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(prefill_logits(cpu_session(path, threads=1), ids.numpy(), mask.numpy()))


@pytest.fixture(scope="module")
def exported(tiny_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    result = export(
        tiny_runs["nf4"], merged_dir=out / "merged", onnx_path=out / "model.onnx", dtype="fp32", onnx_int8=True
    )
    return result, out


def test_export_passes_its_checks_and_reports_them(exported):
    result, out = exported
    onnx_result = result.onnx
    assert onnx_result.path == out / "model.onnx" and onnx_result.path.is_file()
    assert onnx_result.logits.max_abs_diff <= onnx_export.LOGIT_TOLERANCE == 1e-3
    assert onnx_result.cached_logits.max_abs_diff <= onnx_export.LOGIT_TOLERANCE
    assert onnx_result.greedy_identical and len(onnx_result.greedy_onnx) == onnx_export.GREEDY_TOKENS
    assert onnx_result.size_bytes == onnx_result.path.stat().st_size and not onnx_result.external_data
    assert onnx_result.export_seconds > 0 and onnx_result.opset >= 18
    onnx.checker.check_model(str(onnx_result.path), full_check=True)


def test_graph_runs_shapes_it_was_not_traced_with(exported):
    result, out = exported
    model = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    for batch, length in ((1, 3), (3, 40), (5, 9)):
        ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, length // 2 :] = 0  # right padding on one row
        expected = torch_logits(model, {"input_ids": ids, "attention_mask": mask})
        got = run_onnx(result.onnx.path, ids, mask)
        kept = mask.bool()
        assert (got[kept] - expected[kept]).abs().max() < 1e-3, (batch, length)


def test_external_data_keeps_weights_beside_the_graph(tiny_runs, tmp_path):
    path = tmp_path / "sub" / "model.onnx"
    result = export(tiny_runs["bf16"], onnx_path=path, external_data=True).onnx
    data = path.with_name("model.onnx.data")
    assert result.external_data and data.is_file()
    tensors = onnx.load(str(path), load_external_data=False).graph.initializer
    largest = max(tensors, key=lambda tensor: np.prod(tensor.dims))
    assert largest.data_location == onnx.TensorProto.EXTERNAL, "the weights should be in the .data file"
    assert result.size_bytes == path.stat().st_size + data.stat().st_size
    moved = tmp_path / "moved"
    moved.mkdir()
    for file in (path, data):  # the pair works wherever it is copied, as long as it stays together
        file.rename(moved / file.name)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(run_onnx(moved / "model.onnx", ids, torch.ones_like(ids))).all()


def test_overwrite_removes_a_stale_external_data_file(tiny_runs, tmp_path):
    path = tmp_path / "model.onnx"
    export(tiny_runs["bf16"], onnx_path=path, external_data=True)
    export(tiny_runs["bf16"], onnx_path=path, external_data=False, overwrite=True)
    assert path.is_file() and not path.with_name("model.onnx.data").exists()


FAMILIES = {
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
}


@pytest.mark.parametrize("model_type", ["llama", *FAMILIES])
def test_every_verified_family_exports_and_matches(model_type, tmp_path):
    assert model_type in onnx_export.VERIFIED_MODEL_TYPES
    tokenizer = make_tokenizer()
    base = tiny_llama_config(vocab_size=len(tokenizer)).to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    settings = {key: base[key] for key in keep} | {"num_key_value_heads": 2, "tie_word_embeddings": True}
    config = AutoConfig.for_model(model_type, **settings, **FAMILIES.get(model_type, {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    batch = sample_batch(tokenizer)
    run = FinishedRun(tmp_path, "tiny", get_strategy("adafish-lora"), tmp_path, "-")
    merged = MergedRun(run, model, tokenizer, [], torch_logits(model, batch), batch)
    result = onnx_export.write_onnx(merged, tmp_path / "model.onnx")
    assert result.logits.max_abs_diff <= 1e-3 and result.greedy_identical


def test_unverified_family_is_refused_with_the_alternative():
    with pytest.raises(EdgetuneError, match="not supported for model type 'gpt2'.*--merged"):
        onnx_export.check_onnx_model_type("gpt2")


def test_wrong_suffix_is_refused(tiny_runs, tmp_path):
    with pytest.raises(EdgetuneError, match="does not end in .onnx"):
        export(tiny_runs["bf16"], onnx_path=tmp_path / "model.bin")


def test_inputs_and_outputs_use_the_onnxruntime_genai_layout(exported):
    session = onnxruntime.InferenceSession(str(exported[0].onnx.path), providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs(), session.get_outputs()
    layers = [f"{i}.{kind}" for i in range(2) for kind in ("key", "value")]  # the tiny model has 2 layers
    assert [i.name for i in inputs] == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{name}" for name in layers
    ]
    assert [o.name for o in outputs] == ["logits"] + [f"present.{name}" for name in layers]
    assert [i.type for i in inputs[:3]] == ["tensor(int64)"] * 3 and inputs[3].type == "tensor(float)"
    # [batch, kv_heads, past, head_dim]: the tiny model has 2 kv heads of 16 dims
    assert inputs[3].shape == ["batch_size", 2, "past_sequence_length", 16]
    assert outputs[1].shape == ["batch_size", 2, "past_sequence_length + sequence_length", 16]
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(3)[None]}
    assert session.run(None, feed | empty_past(session, 1))[0].dtype == np.float32


def test_greedy_with_the_cache_is_torch_generate_and_the_cache_grows_one_per_step(exported):
    result, out = exported
    model = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    prompt = [7, 30, 41, 12, 99, 5]  # not the prompt the export checked
    decoded = greedy_with_cache(cpu_session(result.onnx.path, threads=1), prompt, 12)
    assert decoded.tokens == torch_greedy(model, torch.tensor([prompt]), 12)
    assert decoded.cache_lengths == list(range(len(prompt), len(prompt) + 12))


def test_a_cached_step_of_several_tokens_on_a_batch_matches_torch(exported):
    result, out = exported
    model = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    session = cpu_session(result.onnx.path, threads=1)
    names = [o.name for o in session.get_outputs()]
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2))
    first = {"input_ids": ids[:, :5].numpy(), "attention_mask": np.ones((3, 5), np.int64)}
    first["position_ids"] = np.tile(np.arange(5), (3, 1))
    prefill = dict(zip(names, session.run(None, first | empty_past(session, 3)), strict=True))
    past = {n.replace("present", "past_key_values"): v for n, v in prefill.items() if n.startswith("present")}
    step = {"input_ids": ids[:, 5:].numpy(), "attention_mask": np.ones((3, 9), np.int64)}
    step["position_ids"] = np.tile(np.arange(5, 9), (3, 1))
    logits = torch.from_numpy(session.run(["logits"], step | past)[0])
    expected = torch_logits(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[:, 5:]
    assert (logits - expected).abs().max() < 1e-3


def test_int8_file_is_written_beside_with_its_own_check(exported):
    result, out = exported
    int8 = result.onnx.int8
    assert int8.path == out / "model.int8.onnx" and int8.path.is_file() and int8.passed
    assert int8.size_bytes == int8.path.stat().st_size < result.onnx.size_bytes
    assert int8.int8_matmuls == 2 * 6 and int8.float_matmuls == 2  # q, k, v, o, gate, up int8; down kept
    assert int8.logits.top1_agreement >= int8.min_top1_agreement and int8.logits.passed
    assert 0 <= int8.greedy_matching <= len(int8.greedy_onnx) == onnx_export.GREEDY_TOKENS
    assert result.to_dict()["onnx"]["int8"]["passed"] is True
    quantized = {node.op_type for node in onnx.load(str(int8.path)).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= quantized


def test_int8_without_onnx_is_refused(tiny_runs, tmp_path):
    with pytest.raises(EdgetuneError, match="--onnx-int8 needs --onnx"):
        export(tiny_runs["bf16"], merged_dir=tmp_path / "m", onnx_int8=True)


def test_a_failed_check_writes_nothing(tiny_runs, tmp_path, monkeypatch):
    older = tmp_path / "model.onnx"
    older.write_text("an earlier export")
    monkeypatch.setattr(onnx_export, "LOGIT_TOLERANCE", 0.0)
    with pytest.raises(EdgetuneError, match="does not reproduce torch"):
        export(tiny_runs["bf16"], onnx_path=older, overwrite=True, external_data=True)
    assert older.read_text() == "an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"], "staging files were left behind"
