"""edgetune: fine-tune language models inside the memory of one consumer GPU, edge board or CPU.

Importing edgetune loads nothing heavy and touches no GPU; the API functions import what they need.
"""

import sys
import types

__version__ = "0.1.0"

_API = (
    "device_profile",
    "device_profiles",
    "devices",
    "export",
    "generate",
    "model_source",
    "open_chat",
    "plan",
    "probe",
    "train",
    "train_config",
)
_LOOP = ("CancelToken", "StepInfo", "TrainResult")
__all__ = ["EdgetuneError", "__version__", *_API, *_LOOP]

from edgetune.errors import EdgetuneError  # noqa: E402


def __getattr__(name: str):
    # Lazy so that `import edgetune` stays cheap: the API pulls in torch and transformers.
    if name in _API:
        from edgetune import api

        return getattr(api, name)
    if name in _LOOP:
        from edgetune.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'edgetune' has no attribute {name!r}")


class _Package(types.ModuleType):
    """The edgetune package, whose API names stay the API functions once a wing of the same name is imported.

    The wings ``edgetune/plan``, ``edgetune/train`` and ``edgetune/export`` share their names with the API functions
    ``edgetune.plan``, ``edgetune.train`` and ``edgetune.export``. Python's import system sets a subpackage as an
    attribute of its parent after importing it, which would turn ``edgetune.train(config)`` into a call of a module.
    Refusing that one assignment keeps the functions; the wings stay importable by their full dotted names
    (``from edgetune.train.loop import train``), which go through ``sys.modules``, not through attributes.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
