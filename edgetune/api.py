"""The Python API desktop apps and scripts embed: it never prints, never exits, and reports through callbacks.

Every function here joins the pure parts of edgetune with the impure edges (hardware reads, model loading),
so an application has one import to learn.
"""

import contextlib
from collections.abc import Callable
from pathlib import Path

from edgetune.budget import Budget, BudgetKind, context_bytes_for, levers, parse_bytes, recommend, size
from edgetune.device import DeviceInfo, read_devices
from edgetune.errors import EdgetuneError
from edgetune.inventory import inspect_model
from edgetune.loading import DEFAULT_LORA_TARGETS
from edgetune.planner import RunShape
from edgetune.probing import ProbeConfig, ProbeResult, run_probe
from edgetune.profiles import DeviceProfile, list_profiles, load_profile
from edgetune.report import PlanResult, ladder_reason
from edgetune.sources import DEFAULT_MODEL_KEY, ModelSource, resolve_model
from edgetune.strategies import STRATEGIES


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
    """Measure real training steps (loss, time, peak memory); see ``edgetune.probing.ProbeConfig``.

    Raises:
        EdgetuneError: the model, data or device cannot be used.
    """
    with _no_library_progress_bars():
        return run_probe(config or ProbeConfig(), on_event=on_event)


def plan(
    model: str = DEFAULT_MODEL_KEY,
    *,
    batch_size: int = 4,
    seq_len: int = 256,
    lora_rank: int = 16,
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS,
    profile: str | None = None,
    budget: str | int | None = None,
    budget_device: BudgetKind = "cuda",
    strategies: tuple[str, ...] | None = None,
    on_event: Callable[[str], None] | None = None,
) -> PlanResult:
    """Size every strategy for a model and run shape against a memory budget, and pick one.

    The budget is, in order of precedence: ``budget`` (bytes or a size such as "6GiB", for ``budget_device``),
    a device ``profile`` (e.g. "rtx-4060-8gb"), or the free memory of this machine's first visible device.

    Raises:
        EdgetuneError: the model cannot be inspected, a value is out of range, the profile is unknown or the
            budget does not parse.
    """
    source = resolve_model(model, on_event=on_event)
    spec = inspect_model(source)
    run = RunShape(batch_size=batch_size, seq_len=seq_len, lora_rank=lora_rank, lora_targets=tuple(lora_targets))
    memory = _budget(profile, budget, budget_device)
    chosen = strategies or tuple(STRATEGIES)
    unknown = [name for name in chosen if name not in STRATEGIES]
    if unknown:
        raise EdgetuneError(f"unknown strategy {unknown[0]!r}", f"use one of {', '.join(STRATEGIES)}")
    plans = {name: size(spec, STRATEGIES[name], run, memory) for name in chosen}
    recommended = recommend(plans)
    warnings = []
    if spec.max_positions and seq_len > spec.max_positions:
        warnings.append(f"seq_len {seq_len} exceeds the model's {spec.max_positions} positions; planned anyway")
    return PlanResult(
        model=source.name,
        spec=spec,
        run=run,
        budget=memory,
        plans=plans,
        recommended=recommended,
        reason=ladder_reason(recommended, plans),
        levers=[] if recommended else levers(spec, run, memory),
        warnings=warnings,
    )


def _budget(profile: str | None, budget: str | int | None, budget_device: BudgetKind) -> Budget:
    if budget is not None:
        size_bytes = budget if isinstance(budget, int) else parse_bytes(budget)
        if size_bytes <= 0:
            raise EdgetuneError(f"budget must be positive, got {budget}", "pass a size such as 6GiB")
        return Budget(
            size_bytes, size_bytes, budget_device, f"--budget {budget}", context_bytes_for(budget_device, None)
        )
    if profile is not None:
        device = load_profile(profile)
        kind: BudgetKind = "unified" if device.unified else "cuda"
        note = "total memory; the OS shares it" if device.unified else "total memory; a desktop uses part of it"
        return Budget(
            device.memory_bytes,
            device.memory_bytes,
            kind,
            f"profile {device.key}, {note}",
            context_bytes_for(kind, device.ctx_overhead_bytes),
        )
    device = read_devices()[0]
    kind = {"nvml_v2": "cuda", "nvml_v1": "cuda", "psutil_unified": "unified"}.get(device.source, "cpu")
    return Budget(
        device.free_bytes, device.total_bytes, kind, f"{device.name} via {device.source}", context_bytes_for(kind, None)
    )


def train_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (), *, resume: str | None = None):
    """The config a run uses: a YAML file (or a run folder's saved config with ``resume``) plus overrides.

    Raises:
        EdgetuneError: the file does not parse, a key is unknown, a value has the wrong type or is out of range.
    """
    from edgetune.config import load_config

    if resume is not None:
        saved = Path(resume) / "config.yaml"
        if not saved.is_file():
            raise EdgetuneError(
                f"{resume} has no config.yaml, so it is not an edgetune run folder",
                "pass the output folder of an earlier `edgetune train`",
            )
        return load_config(saved, [*overrides, f"output.dir={resume}"])
    return load_config(path, list(overrides))


def train(config=None, *, resume: bool = False, on_step=None, on_event=None, cancel=None):
    """Fine-tune as the config says; see ``edgetune.trainer.train``. Safe to call from a worker thread.

    Args:
        config: a ``TrainConfig`` (None: the defaults, the main job on the embedded model).
        resume: continue from the newest complete checkpoint in ``config.output.dir``.
        on_step: called with a ``StepInfo`` after every step.
        on_event: called with one-line messages (model conversion, strategy choice, evaluation).
        cancel: a ``CancelToken``; when cancelled, the run checkpoints at the next step boundary and returns.

    Raises:
        EdgetuneError: the model, data, output folder, strategy or checkpoint cannot be used.
    """
    from edgetune.config import TrainConfig
    from edgetune.trainer import train as run_training

    with _no_library_progress_bars():
        return run_training(config or TrainConfig(), resume=resume, on_step=on_step, on_event=on_event, cancel=cancel)


@contextlib.contextmanager
def _no_library_progress_bars():
    """transformers draws progress bars on stderr while loading and saving; an embedding app shows its own."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def export(
    run_dir: str | Path,
    *,
    merged_dir: str | Path | None = None,
    onnx_path: str | Path | None = None,
    dtype: str = "bf16",
    overwrite: bool = False,
    external_data: bool | None = None,
    on_event: Callable[[str], None] | None = None,
):
    """Export a finished run as a merged Hugging Face folder and/or a verified ONNX file.

    See ``edgetune.exporter.export`` for the arguments; returns an ``ExportResult`` with every check's figures.

    Raises:
        EdgetuneError: a bad run folder or output path, an unsupported model type, or a failed numeric check.
    """
    from edgetune.exporter import export as run_export

    with _no_library_progress_bars():
        return run_export(
            run_dir,
            merged_dir=merged_dir,
            onnx_path=onnx_path,
            dtype=dtype,
            overwrite=overwrite,
            external_data=external_data,
            on_event=on_event,
        )
