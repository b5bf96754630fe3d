"""edgetune: fine-tune language models inside the memory of one consumer GPU, edge board or CPU.

Importing edgetune loads nothing heavy and touches no GPU; the API functions import what they need.
"""

__version__ = "0.1.0"

_API = (
    "device_profile",
    "device_profiles",
    "devices",
    "export",
    "model_source",
    "plan",
    "probe",
    "train",
    "train_config",
)
_TRAINER = ("CancelToken", "StepInfo", "TrainResult")
__all__ = ["EdgetuneError", "__version__", *_API, *_TRAINER]

from edgetune.errors import EdgetuneError  # noqa: E402


def __getattr__(name: str):
    # Lazy so that `import edgetune` stays cheap: the API pulls in torch and transformers.
    if name in _API:
        from edgetune import api

        return getattr(api, name)
    if name in _TRAINER:
        from edgetune import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'edgetune' has no attribute {name!r}")
