"""Writing an export so that a failure leaves nothing half-written and nothing the user had is lost.

An export is written into a hidden staging path next to its destination, checked there, and only then renamed
into place. An existing destination is refused unless the caller asked to overwrite it and it is an earlier
export (a folder holding edgetune's export record, or the file named), and even then it is only removed after the
new export passed its checks.
"""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgetune.errors import EdgetuneError


def check_destination(
    path: Path, *, overwrite: bool, protected: dict[str, Path], record: str | None, flag: str = "--overwrite"
) -> None:
    """Refuse a destination that exists (without ``overwrite``), that is not an earlier export, or that would
    replace a protected folder (the run, the model cache, the base model); check that it can be written.

    Args:
        path: the export's final path.
        overwrite: the user asked to replace an existing export.
        protected: folders the export must neither be inside of nor contain, by what they are ("the run folder").
        record: for a folder export, the file every export folder holds; an existing folder without it is someone
            else's data and is never replaced. None for a file export.
        flag: the option that asks for overwriting, for the message.

    Raises:
        EdgetuneError: any of the above, or the parent folder cannot be created or written to.
    """
    target = path.resolve()
    for label, folder in protected.items():
        keep = folder.resolve()
        if target == keep or keep.is_relative_to(target) or target.is_relative_to(keep):
            raise EdgetuneError(
                f"{path} is inside or contains {label} {folder}, which the export must not touch",
                "write the export to a folder of its own, outside the run and the model cache",
            )
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise EdgetuneError(f"{path} already exists", f"choose a new path, or pass {flag} to replace it")
        _check_replaceable(path, record)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Checked now, before a merge that takes minutes: a folder where nothing can be written fails at once.
        os.rmdir(tempfile.mkdtemp(prefix=".edgetune-write-test-", dir=path.parent))
    except OSError as exc:
        raise EdgetuneError(f"cannot write to {path.parent} ({exc.strerror})", "choose a writable path") from exc


def _check_replaceable(path: Path, record: str | None) -> None:
    if record is None:
        if path.is_dir():
            raise EdgetuneError(f"{path} is a folder, not a file edgetune exported", "choose a file path")
        return
    if not path.is_dir() or path.is_symlink() or not (path / record).is_file():
        raise EdgetuneError(
            f"{path} exists and is not an edgetune export (it has no {record})",
            "choose a new path; --overwrite replaces only a folder an earlier `edgetune export` wrote",
        )


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
