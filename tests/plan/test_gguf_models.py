"""A .gguf file as model.name: converted once with transformers' GGUF loader, like the embedded default."""

import json

import numpy as np
import pytest
from conftest import make_tokenizer

from edgetune.errors import EdgetuneError
from edgetune.plan.sources import resolve_model

HIDDEN, FFN, HEADS, KV_HEADS = 64, 128, 4, 2


def write_gguf(path, arch: str = "llama") -> dict[str, np.ndarray]:
    """A one-block float32 GGUF with the tiny byte-level BPE tokenizer; returns its tensors."""
    import gguf

    tokenizer = make_tokenizer()
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(1)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    writer.add_token_types([1] * len(tokens))
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    kv = KV_HEADS * HIDDEN // HEADS
    shapes = {"token_embd": (len(tokens), HIDDEN), "output_norm": (HIDDEN,), "output": (len(tokens), HIDDEN)}
    shapes |= {f"blk.0.{name}": (HIDDEN,) for name in ("attn_norm", "ffn_norm")}
    shapes |= {"blk.0.attn_q": (HIDDEN, HIDDEN), "blk.0.attn_k": (kv, HIDDEN), "blk.0.attn_v": (kv, HIDDEN)}
    shapes |= {"blk.0.attn_output": (HIDDEN, HIDDEN), "blk.0.ffn_gate": (FFN, HIDDEN), "blk.0.ffn_up": (FFN, HIDDEN)}
    shapes |= {"blk.0.ffn_down": (HIDDEN, FFN)}
    rng = np.random.default_rng(0)
    tensors = {
        f"{name}.weight": (rng.standard_normal(shape) * 0.02).astype(np.float32) for name, shape in shapes.items()
    }
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_gguf_file_converts_once_and_trains_like_a_folder(empty_cache, tmp_path, one_thread):
    from edgetune.train.loading import load_base, load_tokenizer

    tensors = write_gguf(tmp_path / "tiny.gguf")
    events = []
    source = resolve_model(str(tmp_path / "tiny.gguf"), on_event=events.append)
    assert (source.kind, source.has_weights) == ("gguf", True)
    assert source.path.parent == empty_cache / "models" and source.path.name.startswith("gguf-")
    provenance = json.loads((source.path / "edgetune-source.json").read_text())
    assert (
        provenance["gguf"] == str((tmp_path / "tiny.gguf").resolve())
        and source.path.name[5:] in provenance["gguf_sha256"]
    )
    model, tokenizer = load_base(source, "fp32"), load_tokenizer(source)
    assert model.config.vocab_size == len(tokenizer) == tensors["token_embd.weight"].shape[0]
    assert np.array_equal(model.model.embed_tokens.weight.detach().numpy(), tensors["token_embd.weight"])
    assert len(events) == 2 and events[0].startswith("converting tiny.gguf")
    events.clear()
    assert resolve_model(str(tmp_path / "tiny.gguf"), on_event=events.append).path == source.path
    assert events == []  # converted once


def test_a_gguf_of_an_architecture_transformers_cannot_read_is_one_line(empty_cache, tmp_path):
    write_gguf(tmp_path / "odd.gguf", arch="nosucharch")
    with pytest.raises(
        EdgetuneError, match=r"cannot load .*odd.gguf as a model \(GGUF model with architecture"
    ) as caught:
        resolve_model(str(tmp_path / "odd.gguf"))
    assert "\n" not in str(caught.value) and "GGUF loader supports" in str(caught.value)
    assert list((empty_cache / "models").iterdir()) == []


def test_planning_a_gguf_reads_its_architecture_without_converting(empty_cache, tmp_path):
    from edgetune import api

    write_gguf(tmp_path / "tiny.gguf")
    source = resolve_model(str(tmp_path / "tiny.gguf"), config_only=True)
    assert (source.kind, source.has_weights, source.config_file) == ("gguf", False, source.path)
    assert json.loads(source.path.read_text())["hidden_size"] == HIDDEN
    assert api.plan(str(tmp_path / "tiny.gguf"), budget="8GiB").to_dict()["model"] == str(tmp_path / "tiny.gguf")
    assert [path.name for path in (empty_cache / "models").iterdir()] == [source.path.name]  # no converted folder
