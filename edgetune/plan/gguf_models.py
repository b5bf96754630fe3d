"""GGUF files as training bases: dequantized once with transformers' GGUF loader, cached as ordinary HF folders.

Training needs float weights a ``from_pretrained`` call reloads in a second, so a GGUF (the embedded default, or a
``.gguf`` file named as ``model.name``) is converted once into a folder under edgetune's cache, keyed by the
file's sha256, with an ``edgetune-source.json`` that says which GGUF the folder came from.
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from edgetune.errors import EdgetuneError

PROVENANCE_FILE = "edgetune-source.json"
# What transformers' GGUF reader raises for a file that is not a GGUF or holds an architecture it does not map.
UNREADABLE = (ValueError, KeyError, TypeError, OSError, NotImplementedError)


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_converted(
    gguf: Path, target: Path, provenance: dict[str, object], notify: Callable[[str], None], label: str
) -> Path:
    """The cached Hugging Face folder of a GGUF, converting it into ``target`` first if it is not there yet.

    Args:
        gguf: the GGUF file.
        target: the cache folder; it counts as converted once its provenance file exists.
        provenance: what ``edgetune-source.json`` records (package, file, sha256).
        notify: receives one-line progress messages.
        label: how messages name the model.

    Raises:
        EdgetuneError: transformers cannot read the file (not a GGUF, or an architecture its GGUF loader lacks).
    """
    if (target / PROVENANCE_FILE).is_file():
        return target
    notify(f"converting {label} to a cached Hugging Face folder (once; about a minute per 100M parameters)")
    convert_gguf(gguf, target, provenance)
    notify(f"cached {label} at {target}")
    return target


def gguf_config(gguf: Path, target: Path) -> Path:
    """Write a GGUF's architecture as ``target`` (a ``config.json``) without dequantizing any weights, for planning.

    Raises:
        EdgetuneError: transformers cannot read the file.
    """
    from transformers import AutoConfig

    if target.is_file():
        return target
    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except UNREADABLE as exc:
        raise _unreadable(gguf, exc) from exc
    config.__dict__.pop("quantization_config", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}-{os.getpid()}")
    config.to_json_file(staging)
    staging.replace(target)
    return target


def convert_gguf(gguf: Path, target: Path, provenance: dict[str, object]) -> None:
    """Dequantize a GGUF to float32 and save it, with its tokenizer and provenance, as the folder ``target``.

    Raises:
        EdgetuneError: transformers cannot read the file.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:
            # The model first: an unsupported architecture is the likely failure, and its message is the clearer.
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except UNREADABLE as exc:
            raise _unreadable(gguf, exc) from exc
        # A GGUF-loaded model refuses save_pretrained; re-wrapping the same weights in a plain model of the
        # same class makes it an ordinary checkpoint that reloads in about a second.
        config = loaded.config
        config.__dict__.pop("quantization_config", None)
        plain = type(loaded)(config)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
        # Another process may have finished first; its folder is equally valid, so keep it.
        if not target.exists():
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _unreadable(gguf: Path, exc: BaseException) -> EdgetuneError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return EdgetuneError(
        f"transformers cannot load {gguf} as a model ({reason})",
        "use a GGUF of an architecture transformers' GGUF loader supports (llama, mistral, qwen2, gemma, phi3, ...), "
        "or pass a Hugging Face folder or hub id",
    )
