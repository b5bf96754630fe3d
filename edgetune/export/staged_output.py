"""Writing an export so that a failure leaves nothing half-written and nothing the user had is lost.

An export is written into a hidden staging path next to its destination, checked there, and only then renamed
into place. An existing destination is refused unless the caller asked to overwrite it, and even then it is
only removed after the new export passed its checks.
"""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgetune.errors import EdgetuneError


def check_destination(path: Path, *, overwrite: bool, protected: Path, flag: str = "--overwrite") -> None:
    """Refuse a destination that exists (without ``overwrite``) or that would replace ``protected``.

    Raises:
        EdgetuneError: the path exists and ``overwrite`` is false, it is or contains the protected folder, or its
            parent folder cannot be created.
    """
    target, keep = path.resolve(), protected.resolve()
    if target == keep or keep.is_relative_to(target) or target.is_relative_to(keep):
        raise EdgetuneError(
            f"{path} is inside or contains the run folder {protected}, which the export must not touch",
            "write the export outside the run folder",
        )
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise EdgetuneError(f"{path} already exists", f"choose a new path, or pass {flag} to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgetuneError(f"cannot create the folder {path.parent} ({exc.strerror})", "choose another path") from exc


@contextmanager
def staged(path: Path, *, folder: bool, companions: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield where to write ``path``; on success move what was written into place.

    For a ``folder`` export the yielded path is the staging folder itself. For a file export it is the file's
    path inside a staging folder, so files that reference each other by name (an ONNX graph and its external
    ``.data`` weights, listed in ``companions`` as name suffixes) keep their final names. A companion the new
    export did not write is removed from the destination, so stale weights are never read with a new graph.
    On an exception the staging folder is removed and the destination is untouched.
    """
    staging = path.parent / f".{path.name}.partial-{os.getpid()}"
    _remove(staging)
    staging.mkdir()
    try:
        yield staging if folder else staging / path.name
    except BaseException:
        _remove(staging)
        raise
    if folder:
        _replace(staging, path)
        return
    for suffix in ("", *companions):
        ready, final = staging / (path.name + suffix), path.parent / (path.name + suffix)
        if ready.exists():
            _replace(ready, final)
        else:
            _remove(final)
    _remove(staging)


def _replace(ready: Path, final: Path) -> None:
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists() or final.is_symlink():
        final.rename(old)
    ready.rename(final)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
