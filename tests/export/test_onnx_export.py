"""ONNX export checked the way a user would run it: onnxruntime on CPU, other shapes than the traced ones,
external weights, and every decoder family the exporter claims."""

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
from edgetune.export.logit_checks import sample_batch, torch_logits
from edgetune.export.merge import MergedRun
from edgetune.plan.strategies import get_strategy

pytestmark = pytest.mark.usefixtures("one_thread")


def run_onnx(path: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])


@pytest.fixture(scope="module")
def exported(tiny_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    result = export(tiny_runs["nf4"], merged_dir=out / "merged", onnx_path=out / "model.onnx", dtype="fp32")
    return result, out


def test_export_passes_its_checks_and_reports_them(exported):
    result, out = exported
    onnx_result = result.onnx
    assert onnx_result.path == out / "model.onnx" and onnx_result.path.is_file()
    assert onnx_result.logits.max_abs_diff <= onnx_export.LOGIT_TOLERANCE == 1e-3
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
    assert data.stat().st_size > path.stat().st_size, "the weights should be in the .data file"
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


def test_runtime_gets_numpy_int64_inputs(exported):
    session = onnxruntime.InferenceSession(str(exported[0].onnx.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [i.type for i in session.get_inputs()] == ["tensor(int64)", "tensor(int64)"]
    assert session.get_outputs()[0].name == "logits"
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    assert session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0].dtype == np.float32


def test_a_failed_check_writes_nothing(tiny_runs, tmp_path, monkeypatch):
    older = tmp_path / "model.onnx"
    older.write_text("an earlier export")
    monkeypatch.setattr(onnx_export, "LOGIT_TOLERANCE", 0.0)
    with pytest.raises(EdgetuneError, match="does not reproduce torch"):
        export(tiny_runs["bf16"], onnx_path=older, overwrite=True, external_data=True)
    assert older.read_text() == "an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"], "staging files were left behind"
