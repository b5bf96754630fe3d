"""The Python API desktop apps and scripts embed: it never prints, never exits, and reports through callbacks.

Every function here joins the pure parts of edgetune with the impure edges (hardware reads, model loading),
so an application has one import to learn.
"""

from collections.abc import Callable

from edgetune.device import DeviceInfo, read_devices
from edgetune.probe import ProbeConfig, ProbeResult, run_probe
from edgetune.profiles import DeviceProfile, list_profiles, load_profile
from edgetune.sources import ModelSource, resolve_model


def devices() -> list[DeviceInfo]:
    """Free and total memory of every visible GPU (NVML), or of the host (psutil) when there is none.

    Never creates a CUDA context.
    """
    return read_devices()


def device_profiles() -> list[DeviceProfile]:
    """The bundled device profiles (consumer GPUs and Jetson boards), sorted by key."""
    return list_profiles()


def device_profile(key: str) -> DeviceProfile:
    """One bundled device profile, e.g. ``rtx-4060-8gb``.

    Raises:
        EdgetuneError: no profile has that key (the message suggests the closest one).
    """
    return load_profile(key)


def model_source(name: str, on_event: Callable[[str], None] | None = None) -> ModelSource:
    """Resolve a model name, path or cached hub id; converts the default model on first use.

    Raises:
        EdgetuneError: the model cannot be found or used.
    """
    return resolve_model(name, on_event=on_event)


def probe(config: ProbeConfig | None = None, on_event: Callable[[str], None] | None = None) -> ProbeResult:
    """Measure real training steps (loss, time, peak memory); see ``edgetune.probe.ProbeConfig``.

    Raises:
        EdgetuneError: the model, data or device cannot be used.
    """
    return run_probe(config or ProbeConfig(), on_event=on_event)
