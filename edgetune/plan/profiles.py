"""Static facts about consumer and edge devices, so a plan can target hardware you don't own.

One YAML file per device lives in the top-level `profiles/` folder, which the wheel ships as
`edgetune/profiles`. The file name (without `.yaml`) is the profile's key, e.g. `rtx-4090-24gb`. The figures
come from planner-model.md section 5.
"""

import dataclasses
import difflib
import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgetune.errors import EdgetuneError
from edgetune.plan.tables import render_table

_GIB = 1024**3
_KEY_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]*")
_CC_PATTERN = re.compile(r"(\d+)\.(\d+)")
_LIST_HINT = "list the profiles with `edgetune devices --profiles`"


@dataclass(frozen=True)
class DeviceProfile:
    """Static facts about one device model.

    Attributes:
        key: the profile's file name without `.yaml`, e.g. "rtx-4090-24gb".
        name: marketing name.
        compute_capability: CUDA compute capability as "major.minor", e.g. "8.9".
        memory_bytes: device memory (host RAM on unified boards); "24 GB" cards have 24 GiB.
        memory_type: e.g. "GDDR6X" or "LPDDR5".
        unified: True when the GPU shares RAM with the CPU and OS (Jetson).
        bandwidth_gb_s: memory bandwidth in GB/s (10**9 bytes per second).
        fp32_tflops: non-tensor FP32 peak.
        fp16_tensor_tflops: dense FP16 tensor peak with FP16 accumulate.
        bf16_tensor_tflops: dense bf16 tensor peak (FP32 accumulate), what bf16 training gets.
        sm_count: streaming multiprocessors.
        boost_clock_ghz: GPU boost clock.
        ctx_overhead_bytes: measured CUDA context and library overhead, None until measured.
        notes: caveats and sources.
    """

    key: str
    name: str
    compute_capability: str
    memory_bytes: int
    memory_type: str
    unified: bool
    bandwidth_gb_s: float
    fp32_tflops: float
    fp16_tensor_tflops: float
    bf16_tensor_tflops: float
    sm_count: int
    boost_clock_ghz: float
    ctx_overhead_bytes: int | None
    notes: str

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not _has_type(value, field.type):
                self._reject(field.name, value, f"of type {_type_name(field.type)}")
            if field.type is float:
                object.__setattr__(self, field.name, float(value))  # YAML reads "1008" as an int
            if field.type in (int, float, int | None) and value is not None and value <= 0:
                self._reject(field.name, value, "positive")
        if not _KEY_PATTERN.fullmatch(self.key):
            self._reject("key", self.key, "lower-case letters, digits and dashes (it is the file name)")
        if not _CC_PATTERN.fullmatch(self.compute_capability):
            self._reject("compute_capability", self.compute_capability, 'a quoted "major.minor" string like "8.6"')
        for field in ("name", "memory_type"):
            if not getattr(self, field).strip():
                self._reject(field, getattr(self, field), "a non-empty string")

    def _reject(self, field: str, value: object, wanted: str) -> None:
        raise EdgetuneError(
            f"device profile {self.key!r}: field {field!r} must be {wanted}, got {value!r}",
            f"fix {field!r} in the profile's YAML file",
        )

    @property
    def compute_capability_tuple(self) -> tuple[int, int]:
        """The compute capability as (major, minor), comparable with DeviceInfo.compute_capability."""
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as JSON-ready values.

        Returns:
            A dict of every field, key included.
        """
        return dataclasses.asdict(self)


def _has_type(value: object, annotation: object) -> bool:
    if annotation == int | None:
        return value is None or _has_type(value, int)
    if annotation is bool:
        return isinstance(value, bool)
    # bool is a subclass of int, and a `true` where a number belongs is a typo, not a 1.
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


def _type_name(annotation: object) -> str:
    return {int: "int", float: "number", bool: "bool (true/false)", str: "string"}.get(annotation, "int or null")


def profiles_dir() -> Path:
    """Find the folder holding the profile YAML files.

    Returns:
        `edgetune/profiles` inside an installed wheel, else the repository's top-level `profiles/`.

    Raises:
        EdgetuneError: neither folder exists.
    """
    package = importlib.resources.files("edgetune")
    # A namespace or zipped package gives a non-Path Traversable; only a real folder can be globbed.
    if isinstance(package, Path) and (package / "profiles").is_dir():
        return package / "profiles"
    source = Path(__file__).resolve().parents[2] / "profiles"
    if source.is_dir():
        return source
    raise EdgetuneError(
        f"no device profile folder found (looked in {package} and {source})",
        "reinstall edgetune; its wheel ships the profiles in edgetune/profiles",
    )


def load_profile_file(path: Path) -> DeviceProfile:
    """Load and validate one profile YAML file; its key is the file name without `.yaml`.

    Args:
        path: the YAML file.

    Returns:
        The validated profile.

    Raises:
        EdgetuneError: the file cannot be read or parsed, or a field is missing, unknown or invalid.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise EdgetuneError(f"cannot read device profile {path}: {error}", "fix or remove the file") from error
    if not isinstance(data, dict):
        raise EdgetuneError(f"device profile {path} is not a mapping of fields", "write one `field: value` per line")
    expected = [field.name for field in dataclasses.fields(DeviceProfile) if field.name != "key"]
    missing = [name for name in expected if name not in data]
    if missing:
        raise EdgetuneError(
            f"device profile {path} lacks field(s) {', '.join(missing)}",
            f"add them; every profile has {', '.join(expected)}",
        )
    unknown = [str(name) for name in data if name not in expected]
    if unknown:
        raise EdgetuneError(
            f"device profile {path} has unknown field(s) {', '.join(unknown)}",
            f"remove them or fix the spelling; every profile has {', '.join(expected)}",
        )
    try:
        return DeviceProfile(key=path.stem, **data)
    except EdgetuneError as error:
        raise EdgetuneError(f"{path}: {error.problem}", error.fix) from None


def list_profiles() -> list[DeviceProfile]:
    """Load every shipped profile.

    Returns:
        The profiles sorted by key.

    Raises:
        EdgetuneError: the folder is missing or a file is invalid.
    """
    return [load_profile_file(path) for path in sorted(profiles_dir().glob("*.yaml"))]


def load_profile(key: str) -> DeviceProfile:
    """Load one shipped profile by key.

    Args:
        key: the profile key, e.g. "rtx-4090-24gb" (case-insensitive).

    Returns:
        The validated profile.

    Raises:
        EdgetuneError: no profile has this key (the message suggests close keys), or its file is invalid.
    """
    directory = profiles_dir()
    keys = sorted(path.stem for path in directory.glob("*.yaml"))
    wanted = key.strip().lower()
    if wanted not in keys:
        close = difflib.get_close_matches(wanted, keys, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(k) for k in close)}? " if close else ""
        raise EdgetuneError(f"unknown device profile {key!r}", hint + _LIST_HINT)
    return load_profile_file(directory / f"{wanted}.yaml")


def format_profiles_table(profiles: list[DeviceProfile]) -> str:
    """Render profiles as a fixed-width text table for the CLI.

    Args:
        profiles: the profiles to show, e.g. from list_profiles().

    Returns:
        The table, one line per profile under a header line.
    """
    header = ("key", "name", "memory GiB", "unified", "bandwidth GB/s", "bf16 TFLOPS", "CC", "SMs")
    rows = [
        (
            profile.key,
            profile.name,
            f"{profile.memory_bytes / _GIB:g}",
            "yes" if profile.unified else "no",
            f"{profile.bandwidth_gb_s:g}",
            f"{profile.bf16_tensor_tflops:g}",
            profile.compute_capability,
            str(profile.sm_count),
        )
        for profile in profiles
    ]
    return render_table(header, rows, numeric={2, 4, 5, 7})
