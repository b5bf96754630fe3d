"""Hub ids download only what training reads, resume a broken transfer, work offline from the cache, and fail in
one line; all against a fake hub on 127.0.0.1 (``fake_hub``), never the internet."""

import json

import pytest
from fake_hub import FakeHub, Repo

from edgetune.errors import EdgetuneError
from edgetune.plan.sources import resolve_model

JUNK = ("pytorch_model.bin", "model.gguf", "onnx/model.onnx", "flax_model.msgpack", "README.md")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake hub that huggingface_hub (which copies HF_* variables into constants at import) talks to instead."""
    import huggingface_hub.constants as constants

    fake = FakeHub()
    url = fake.start()
    cache = tmp_path / "hf-home"
    settings = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(cache),
        "HF_HUB_CACHE": str(cache / "hub"),
        "HF_TOKEN_PATH": str(cache / "token"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
    }
    for name, value in settings.items():
        monkeypatch.setattr(constants, name, value)
    environment = {"HF_ENDPOINT": url, "HF_HOME": str(cache), "HF_HUB_CACHE": str(cache / "hub")}
    for name, value in (environment | {"HF_TOKEN_PATH": str(cache / "token"), "HF_HUB_DISABLE_XET": "1"}).items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path / "edgetune-cache"))
    yield fake
    fake.stop()


@pytest.fixture
def tiny_repo(hub, tiny_trainable_dir) -> Repo:
    files = {path.name: path.read_bytes() for path in tiny_trainable_dir.iterdir() if path.is_file()}
    repo = Repo(files=files | {name: b"must never be fetched" for name in JUNK}, refs=("main", "v1"))
    hub.repos["org/tiny"] = repo
    return repo


def go_offline(monkeypatch) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def one_line_error(call, match: str) -> EdgetuneError:
    with pytest.raises(EdgetuneError, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)
    return caught.value


def test_a_hub_id_downloads_only_what_training_reads_and_loads(hub, tiny_repo, one_thread):
    from edgetune.train.loading import load_base, load_tokenizer

    events = []
    source = resolve_model("org/tiny", on_event=events.append)
    assert (source.kind, source.has_weights, source.revision) == ("hub", True, tiny_repo.commit)
    assert source.path.name == tiny_repo.commit and (source.path / "model.safetensors").is_file()
    assert hub.fetched() == {name for name in tiny_repo.files if name not in JUNK}
    assert events[0].startswith("downloading org/tiny (commit c0ffee")
    tokenizer = load_tokenizer(source)
    model = load_base(source, "fp32")
    assert model.config.vocab_size == len(tokenizer)
    hub.requests.clear()
    assert resolve_model("org/tiny").path == source.path
    assert [r.path for r in hub.requests] == ["/api/models/org/tiny"]  # everything cached: nothing downloads


def test_the_planner_fetches_only_config_json(hub, tiny_repo):
    from edgetune import api

    source = resolve_model("org/tiny", config_only=True)
    assert (source.kind, source.has_weights, source.path.name) == ("hub", False, "config.json")
    assert source.config_file == source.path and source.revision == tiny_repo.commit
    result = api.plan("org/tiny", budget="8GiB")
    assert result.to_dict()["model"] == "org/tiny"
    assert hub.fetched() == {"config.json"}
    assert not any(r.path.startswith("/api/") for r in hub.requests)


def test_a_revision_pin_reaches_the_urls(hub, tiny_repo):
    resolve_model("org/tiny", revision="v1", config_only=True)
    assert {r.path for r in hub.requests} == {"/org/tiny/resolve/v1/config.json"}
    hub.requests.clear()
    assert resolve_model("org/tiny", revision="v1").revision == tiny_repo.commit
    assert "/api/models/org/tiny/revision/v1" in {r.path for r in hub.requests}
    one_line_error(lambda: resolve_model("org/tiny", revision="nope"), r"has no revision 'nope'.*model.revision")


def test_a_transfer_that_breaks_off_resumes_with_a_range_request(hub, tiny_repo, monkeypatch):
    import huggingface_hub.constants as constants

    # huggingface_hub keeps what it received in whole chunks (10 MB); the tiny weights need smaller ones.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 2**16)
    hub.cuts["model.safetensors"] = 1
    source = resolve_model("org/tiny")
    weights = tiny_repo.files["model.safetensors"]
    assert (source.path / "model.safetensors").read_bytes() == weights
    ranges = [r.headers.get("range") for r in hub.requests if r.path.endswith("/model.safetensors")]
    kept = len(weights) // 2 // 2**16 * 2**16
    assert ranges[-2:] == [None, f"bytes={kept}-"] and kept > 0


def test_a_transfer_that_keeps_failing_is_one_line_and_a_rerun_finishes_it(hub, tiny_repo, monkeypatch):
    import huggingface_hub.file_download as file_download

    monkeypatch.setattr(file_download.time, "sleep", lambda seconds: None)  # its five retries wait 1 s each
    hub.cuts["model.safetensors"] = 99
    one_line_error(lambda: resolve_model("org/tiny"), r"downloading org/tiny from the Hugging Face hub failed.*again")
    hub.cuts.clear()
    hub.requests.clear()
    source = resolve_model("org/tiny")
    assert (source.path / "model.safetensors").read_bytes() == tiny_repo.files["model.safetensors"]
    assert "model.safetensors" in hub.fetched() and "config.json" not in hub.fetched()  # kept from the first try


@pytest.mark.parametrize("config_only", [False, True])
def test_offline_without_the_model_cached_names_the_download_command(hub, tiny_repo, monkeypatch, config_only):
    go_offline(monkeypatch)
    one_line_error(
        lambda: resolve_model("org/tiny", config_only=config_only),
        r"model org/tiny is not in the local Hugging Face cache and the hub cannot be reached; "
        r"run `hf download org/tiny` where the hub is reachable",
    )
    assert hub.requests == []


def test_offline_with_the_model_cached_uses_the_cache(hub, tiny_repo, monkeypatch):
    online = resolve_model("org/tiny")
    hub.requests.clear()
    go_offline(monkeypatch)
    offline = resolve_model("org/tiny")
    assert (offline.path, offline.revision, offline.has_weights) == (online.path, tiny_repo.commit, True)
    assert resolve_model("org/tiny", config_only=True).path == online.path / "config.json"
    assert hub.requests == []


def test_offline_with_only_the_planners_config_cached_says_the_cache_is_partial(hub, tiny_repo, monkeypatch):
    resolve_model("org/tiny", config_only=True)
    go_offline(monkeypatch)
    one_line_error(lambda: resolve_model("org/tiny"), r"holds only part of model org/tiny.*hf download org/tiny")


def test_an_unreachable_hub_is_treated_as_offline(hub, tiny_repo, monkeypatch):
    import huggingface_hub.constants as constants

    closed = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", closed + "/{repo_id}/resolve/{revision}/{filename}")
    one_line_error(lambda: resolve_model("org/tiny"), r"hub cannot be reached; run `hf download org/tiny`")


@pytest.mark.parametrize(
    "refuse,says",
    [
        (401, r"model org/tiny is gated.*hf auth login.*HF_TOKEN"),
        (403, r"refused access to model org/tiny \(403\); run `hf auth login` or set HF_TOKEN"),
    ],
)
def test_a_gated_or_forbidden_repo_names_the_login(hub, tiny_repo, refuse, says):
    tiny_repo.refuse = refuse
    one_line_error(lambda: resolve_model("org/tiny"), says)
    one_line_error(lambda: resolve_model("org/tiny", config_only=True), says)


@pytest.mark.parametrize("config_only", [False, True])
def test_a_missing_repo_is_one_line(hub, config_only):
    one_line_error(
        lambda: resolve_model("org/missing", config_only=config_only),
        r"model org/missing is not on the Hugging Face hub, or it is private.*hf auth login",
    )


def test_a_repo_without_safetensors_is_refused_before_any_download(hub, tiny_trainable_dir):
    files = {"config.json": (tiny_trainable_dir / "config.json").read_bytes(), "pytorch_model.bin": b"pickle"}
    hub.repos["org/old"] = Repo(files=files)
    one_line_error(lambda: resolve_model("org/old"), r"has no .safetensors weights \(only .bin files")
    assert hub.fetched() == set()


def test_the_cli_prints_a_hub_error_as_one_line(hub, capsys):
    from edgetune.cli import main

    assert main(["plan", "--model", "org/missing", "--budget", "1GiB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edgetune: error: model org/missing is not on the Hugging Face")


def test_an_adapter_trained_on_a_hub_model_names_the_repo_and_loads_from_it(hub, tiny_repo, tmp_path, one_thread):
    from conftest import tiny_train_overrides, write_tiny_text
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgetune import api

    text = write_tiny_text(tmp_path / "text.txt")
    overrides = tiny_train_overrides("org/tiny", text, tmp_path / "run", 1, "train.strategy=adafish-lora")
    api.train(api.train_config(None, overrides))
    adapter = tmp_path / "run" / "adapter"
    recorded = json.loads((adapter / "adapter_config.json").read_text())
    assert (recorded["base_model_name_or_path"], recorded["revision"]) == ("org/tiny", tiny_repo.commit)
    source = json.loads((adapter / "edgetune-source.json").read_text())
    assert (source["kind"], source["revision"]) == ("hub", tiny_repo.commit)
    base = AutoModelForCausalLM.from_pretrained(recorded["base_model_name_or_path"], revision=recorded["revision"])
    assert PeftModel.from_pretrained(base, adapter).peft_config["default"].base_model_name_or_path == "org/tiny"


def test_a_hub_run_exports_offline_against_the_commit_it_trained_on(hub, tiny_repo, tmp_path, monkeypatch, one_thread):
    from conftest import tiny_train_overrides, write_tiny_text

    from edgetune import api

    text = write_tiny_text(tmp_path / "text.txt")
    overrides = tiny_train_overrides("org/tiny", text, tmp_path / "run", 1, "train.strategy=adafish-lora")
    api.train(api.train_config(None, [*overrides, "model.revision=v1"]))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["identity"]["revision"] == "v1"
    tiny_repo.refs = ("main",)  # the tag is gone from the hub: the export needs the commit, not the tag
    go_offline(monkeypatch)
    result = api.export(tmp_path / "run", merged_dir=tmp_path / "merged", dtype="fp32")
    assert result.to_dict()["run_dir"] == str(tmp_path / "run")
    assert json.loads((tmp_path / "merged" / "edgetune_export.json").read_text())["revision"] == tiny_repo.commit


def test_the_cli_plans_a_pinned_hub_model(hub, tiny_repo, capsys):
    from edgetune.cli import main

    assert main(["plan", "--model", "org/tiny", "--revision", "v1", "--budget", "8GiB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "org/tiny"
    assert {r.path for r in hub.requests} == {"/org/tiny/resolve/v1/config.json"}
