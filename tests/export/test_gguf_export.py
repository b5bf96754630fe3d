"""GGUF export: the file transformers reads back matches the merge, every family edgetune claims round-trips, the
Modelfile speaks Ollama's template language, and a request that cannot succeed fails before the merge."""

import gguf
import pytest
import torch
from conftest import make_tokenizer, tiny_llama_config
from transformers import AutoConfig, AutoModelForCausalLM

from edgetune import cli
from edgetune.errors import EdgetuneError
from edgetune.export import exporter as export_module
from edgetune.export import gguf_check
from edgetune.export.exporter import export
from edgetune.export.finished_run import FinishedRun
from edgetune.export.gguf_export import FAMILIES, GgufPlan, write_gguf
from edgetune.export.gguf_vocab import describe_tokenizer
from edgetune.export.logit_checks import sample_batch, torch_logits
from edgetune.export.merge import MergedRun
from edgetune.plan.strategies import get_strategy

pytestmark = pytest.mark.usefixtures("one_thread")


def fields(path) -> dict:
    return {name: field.contents() for name, field in gguf.GGUFReader(str(path)).fields.items()}


def test_f16_round_trip_is_the_16_bit_merge(tiny_runs, tmp_path):
    result = export(tiny_runs["nf4"], gguf_path=tmp_path / "tiny.gguf", gguf_type="f16").gguf
    weights, logits = result.checks[-2:]
    assert weights.max_abs_diff == 0.0 and weights.passed, weights.describe()
    assert logits.passed and logits.top1_agreement == 1.0, logits.describe()
    assert result.tokenizer_identical and result.tensor_types == {"F32": 5, "F16": 15}
    meta = fields(result.path)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["llama.attention.head_count_kv"] == 2
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(result.path)).tensors}  # tied embeddings
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "tiny.gguf"]


def test_q8_0_passes_its_bounds(tiny_runs, tmp_path):
    result = export(tiny_runs["bf16"], gguf_path=tmp_path / "tiny.gguf").gguf
    check = result.checks[-1]
    assert result.gguf_type == "q8_0" and check.passed and check.min_top1 == gguf_check.QUANTIZED_BOUNDS["q8_0"][0]
    assert result.tensor_types == {"F32": 5, "Q8_0": 15} and result.size_bytes == result.path.stat().st_size


def test_modelfile_of_a_chatml_run(tiny_runs, tmp_path, capsys):
    code = cli.main(["export", str(tiny_runs["nf4"]), "--gguf", str(tmp_path / "m.gguf"), "--gguf-type", "q4_0"])
    out = capsys.readouterr().out
    assert code == 0 and "ollama create NAME -f Modelfile" in out and "llama-cli -m" in out
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith("# Written by `edgetune export`") and "FROM ./m.gguf\n" in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text


def test_overwrite_replaces_an_earlier_gguf_but_not_a_foreign_one(tiny_runs, tmp_path, capsys):
    path = tmp_path / "m.gguf"
    export(tiny_runs["bf16"], gguf_path=path, gguf_type="q8_0")
    export(tiny_runs["bf16"], gguf_path=path, gguf_type="q4_1", overwrite=True)
    assert fields(path)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_1
    foreign = tmp_path / "other" / "theirs.gguf"
    foreign.parent.mkdir()
    foreign.write_bytes(b"GGUF not ours")
    code = cli.main(["export", str(tiny_runs["bf16"]), "--gguf", str(foreign), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "is not a GGUF edgetune exported" in err and foreign.read_bytes() == b"GGUF not ours"


def test_unsupported_family_fails_before_the_merge(tiny_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_module, "read_config_dict", lambda path: {"model_type": "gpt2", "vocab_size": 9})
    monkeypatch.setattr(export_module, "merge_run", lambda *a: pytest.fail("merged before refusing"))
    code = cli.main(["export", str(tiny_runs["nf4"]), "--gguf", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not supported for model type 'gpt2'" in err and "--merged" in err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_check_writes_nothing(tiny_runs, tmp_path, monkeypatch):
    monkeypatch.setitem(gguf_check.QUANTIZED_BOUNDS, "q8_0", (1.1, 0.0))  # no model agrees on 110% of tokens
    with pytest.raises(EdgetuneError, match="does not reproduce the merged model"):
        export(tiny_runs["bf16"], gguf_path=tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == [], "staging files were left behind"


def test_a_tokenizer_gguf_cannot_describe_is_refused():
    from tokenizers import decoders, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = make_tokenizer().backend_tokenizer
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()  # SentencePiece-like
    with pytest.raises(EdgetuneError, match="cannot describe"):
        describe_tokenizer(PreTrainedTokenizerFast(tokenizer_object=backend), 512)


SHAPES = {
    "llama": {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    },
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 32},  # not hidden / heads: llama.cpp needs attention.key_length
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_round_trips(model_type, tmp_path):
    tokenizer = make_tokenizer()
    base = tiny_llama_config(vocab_size=len(tokenizer)).to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    settings = {key: base[key] for key in keep} | {"num_key_value_heads": 2, "tie_word_embeddings": False}
    config = AutoConfig.for_model(model_type, **settings, **SHAPES[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    batch = sample_batch(tokenizer)
    run = FinishedRun(tmp_path, "tiny", get_strategy("adafish-lora"), tmp_path, "-")
    merged = MergedRun(run, model, tokenizer, [], torch_logits(model, batch), batch)
    plan = GgufPlan(tmp_path / "m.gguf", "f16", tokenizer, describe_tokenizer(tokenizer, config.vocab_size), None)
    result = write_gguf(merged, plan)
    assert result.checks[-2].max_abs_diff == 0.0 and result.checks[-1].passed, result.checks[-1].describe()
    names = {t.name for t in gguf.GGUFReader(str(result.path)).tensors}
    assert "output.weight" in names and ("blk.0.attn_q.bias" in names) == (model_type == "qwen2")
    assert ("blk.0.attn_q_norm.weight" in names) == (model_type == "qwen3")
    assert ("rope_freqs.weight" in names) == (model_type == "llama")
