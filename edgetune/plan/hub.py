"""Models from the Hugging Face hub: only the files training reads, into the ordinary Hugging Face cache.

A hub id is fetched with ``huggingface_hub`` itself, so its cache (``HF_HUB_CACHE``), token (``HF_TOKEN`` or
``hf auth login``), endpoint (``HF_ENDPOINT``) and offline switch (``HF_HUB_OFFLINE``) all behave as in every other
Hugging Face tool, and ``hf download`` fills the same cache. Training reads the config, the tokenizer and the
safetensors weights; pickled ``.bin``/``.pth`` weights (which can run code when loaded), GGUF, ONNX and other
frameworks' copies are never fetched. The planner needs only ``config.json``, which it fetches alone.
"""

import contextlib
import fnmatch
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edgetune.errors import EdgetuneError

SUPPORT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
)
WEIGHTS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class HubFiles:
    """What a fetch left in the local Hugging Face cache.

    Attributes:
        path: the snapshot folder, or for a config-only fetch the snapshot's ``config.json``.
        commit: the commit hash the revision resolved to.
    """

    path: Path
    commit: str


def fetch_config(repo_id: str, revision: str | None) -> HubFiles:
    """Fetch only a hub model's ``config.json`` (or take it from the cache when the hub cannot be reached).

    Raises:
        EdgetuneError: the repo, revision or file does not exist, access is refused, or the hub cannot be reached
            and the file is not cached.
    """
    from huggingface_hub import hf_hub_download

    with _hub_errors(repo_id, revision):
        path = Path(hf_hub_download(repo_id, "config.json", revision=revision))
    return HubFiles(path, path.parent.name)


def fetch_model(repo_id: str, revision: str | None, notify: Callable[[str], None]) -> HubFiles:
    """Fetch a hub model's config, tokenizer and safetensors weights; what is cached already is not fetched again.

    huggingface_hub resumes a transfer that breaks off (it asks for the rest with a Range request, five times);
    a download that still fails keeps every file that finished, so running the command again fetches the rest.

    Raises:
        EdgetuneError: the repo or revision does not exist, access is refused, the repo has no safetensors weights,
            the transfer fails, or the hub cannot be reached and the model is not fully cached.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    with _hub_errors(repo_id, revision):
        try:
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        except (OfflineModeIsEnabled, *_connection_errors()):
            return _cached_model(repo_id, revision)
        sizes = {sibling.rfilename: sibling.size or 0 for sibling in info.siblings or []}
        wanted = _wanted_files(repo_id, str(info.sha), list(sizes))
        missing = [name for name in wanted if not _is_cached(repo_id, name, str(info.sha))]
        if not missing:
            return HubFiles(_snapshot_folder(repo_id, str(info.sha), wanted[0]), str(info.sha))
        total = sum(sizes[name] for name in missing)
        notify(
            f"downloading {_label(repo_id, revision)} (commit {str(info.sha)[:12]}) from the Hugging Face hub: "
            f"{len(missing)} files, {total / 2**20:.1f} MiB"
        )
        started = time.perf_counter()
        with _hub_progress_bars():
            folder = Path(_snapshot_download(repo_id, revision, wanted))
    notify(f"downloaded {repo_id} in {time.perf_counter() - started:.0f} s to {folder}")
    return HubFiles(folder, folder.name)


def _wanted_files(repo_id: str, commit: str, names: list[str]) -> list[str]:
    """The repo's files training reads: support files and the safetensors weights a loader would open.

    With a shard index, exactly the shards it names: some repos also publish a single consolidated copy of the same
    weights, which would double the download.
    """
    if "config.json" not in names:
        raise EdgetuneError(
            f"the hub repo {repo_id} has no config.json, so it is not a transformers model",
            "pass the id of a transformers causal LM, or a local folder",
        )
    support = [name for name in SUPPORT_FILES if name in names]
    if WEIGHTS_INDEX in names:
        from huggingface_hub import hf_hub_download

        index = json.loads(Path(hf_hub_download(repo_id, WEIGHTS_INDEX, revision=commit)).read_text())
        return [*support, WEIGHTS_INDEX, *sorted(set(index.get("weight_map", {}).values()))]
    weights = [name for name in names if "/" not in name and fnmatch.fnmatch(name, "*.safetensors")]
    if not weights:
        others = sorted({Path(name).suffix for name in names if Path(name).suffix in (".bin", ".pth", ".gguf")})
        raise EdgetuneError(
            f"the hub repo {repo_id} has no .safetensors weights"
            + (f" (only {', '.join(others)} files, which edgetune does not load from the hub)" if others else ""),
            "pick a repo that publishes safetensors, or convert the weights locally and pass the folder",
        )
    return [*support, *weights]


def _cached_model(repo_id: str, revision: str | None) -> HubFiles:
    """The hub cannot be reached: the cached snapshot, if it holds everything training reads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=[]))
    except LocalEntryNotFoundError as exc:
        raise _unreachable(repo_id, revision) from exc
    names = [path.name for path in folder.iterdir()] if folder.is_dir() else []
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        complete = "config.json" in names and shards <= set(names)
    else:
        complete = "config.json" in names and any(name.endswith(".safetensors") for name in names)
    if not complete:
        raise EdgetuneError(
            f"the local Hugging Face cache holds only part of model {_label(repo_id, revision)} (no weights) and the "
            "hub cannot be reached",
            f"run `{_download_command(repo_id, revision)}` where the hub is reachable, or pass a local folder",
        )
    return HubFiles(folder, folder.name)


def _snapshot_download(repo_id: str, revision: str | None, wanted: list[str]) -> str:
    from huggingface_hub import snapshot_download

    # The user's revision, not the commit: only then does huggingface_hub record refs/<branch> for offline reuse.
    return snapshot_download(repo_id, revision=revision, allow_patterns=wanted)


def _is_cached(repo_id: str, filename: str, commit: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename, revision=commit), str)


def _snapshot_folder(repo_id: str, commit: str, cached_file: str) -> Path:
    from huggingface_hub import try_to_load_from_cache

    return Path(str(try_to_load_from_cache(repo_id, cached_file, revision=commit))).parent


@contextlib.contextmanager
def _hub_progress_bars() -> Iterator[None]:
    """huggingface_hub's byte bars while downloading, on a terminal only: an embedding app gets on_event lines."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if sys.stderr.isatty():
        enable_progress_bars()
    try:
        yield
    finally:
        if was_disabled:
            disable_progress_bars()


def _connection_errors() -> tuple[type[Exception], ...]:
    import httpx2

    return (httpx2.ConnectError, httpx2.TimeoutException)


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line errors that say what to do."""
    import httpx2
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    label, login = _label(repo_id, revision), "run `hf auth login` or set HF_TOKEN"
    try:
        yield
    except GatedRepoError as exc:
        raise EdgetuneError(
            f"model {label} is gated and this machine's Hugging Face token may not read it",
            f"accept its terms on its hub page, then {login} with that account's token",
        ) from exc
    except RepositoryNotFoundError as exc:
        raise EdgetuneError(
            f"model {repo_id} is not on the Hugging Face hub, or it is private and this machine is not logged in",
            f"check the id; for a private model {login}",
        ) from exc
    except RevisionNotFoundError as exc:
        raise EdgetuneError(
            f"model {repo_id} has no revision {revision!r} on the Hugging Face hub",
            "set model.revision to a branch, tag or commit hash of the repo, or null for main",
        ) from exc
    except LocalEntryNotFoundError as exc:
        # huggingface_hub reports a refused file request as "not cached", with the HTTP error as its cause.
        refused = _refused_status(exc, HfHubHTTPError)
        if refused is not None:
            raise EdgetuneError(f"the Hugging Face hub refused access to model {label} ({refused})", login) from exc
        raise _unreachable(repo_id, revision) from exc
    except EntryNotFoundError as exc:
        raise EdgetuneError(
            f"the hub repo {label} has no config.json, so it is not a transformers model",
            "pass the id of a transformers causal LM, or a local folder",
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "an error"
        if status in (401, 403):
            raise EdgetuneError(f"the Hugging Face hub refused access to model {label} ({status})", login) from exc
        raise EdgetuneError(
            f"the Hugging Face hub answered {status} for model {label}", "try again later, or pass a local folder"
        ) from exc
    except (OSError, httpx2.HTTPError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EdgetuneError(
            f"downloading {label} from the Hugging Face hub failed ({reason})",
            "run the command again: files that finished are kept, and only the rest is fetched",
        ) from exc


def _refused_status(exc: BaseException, http_error: type[Exception]) -> int | None:
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if isinstance(cause, http_error) and status in (401, 403):
            return status
        cause = cause.__cause__ or cause.__context__
    return None


def _unreachable(repo_id: str, revision: str | None) -> EdgetuneError:
    return EdgetuneError(
        f"model {_label(repo_id, revision)} is not in the local Hugging Face cache and the hub cannot be reached",
        f"run `{_download_command(repo_id, revision)}` where the hub is reachable, or pass a local folder",
    )


def _download_command(repo_id: str, revision: str | None) -> str:
    return f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")


def _label(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision}" if revision else repo_id
