"""The Python API desktop apps and scripts embed: it never prints, never exits, and reports through callbacks.

Every function here joins the pure parts of edgetune with the impure edges (hardware reads, model loading),
so an application has one import to learn.
"""

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

from edgetune.errors import EdgetuneError
from edgetune.plan.budget import BudgetKind, budget_of_device, budget_of_profile, budget_of_size, parse_bytes
from edgetune.plan.decide import plan_run
from edgetune.plan.device import DeviceInfo, read_devices
from edgetune.plan.inventory import inspect_model
from edgetune.plan.profiles import DeviceProfile, list_profiles, load_profile
from edgetune.plan.report import PlanResult
from edgetune.plan.run_options import RunOptions
from edgetune.plan.sources import ModelSource, resolve_model
from edgetune.train.probe import ProbeConfig, ProbeResult, run_probe


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


def model_source(
    name: str, on_event: Callable[[str], None] | None = None, *, revision: str | None = None
) -> ModelSource:
    """Resolve a model name, path, .gguf file or hub id; converts a GGUF or downloads a hub model on first use.

    Raises:
        EdgetuneError: the model cannot be found, fetched or used.
    """
    return resolve_model(name, revision=revision, on_event=on_event)


def probe(config: ProbeConfig | None = None, on_event: Callable[[str], None] | None = None) -> ProbeResult:
    """Measure real training steps (loss, time, peak memory); see ``edgetune.train.probe.ProbeConfig``.

    Raises:
        EdgetuneError: the model, data or device cannot be used.
    """
    with _no_library_progress_bars():
        return run_probe(config or ProbeConfig(), on_event=on_event)


def plan(
    model: str | None = None,
    *,
    revision: str | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    lora_rank: int | None = None,
    lora_targets: tuple[str, ...] | None = None,
    profile: str | None = None,
    budget: str | int | None = None,
    budget_device: BudgetKind = "cuda",
    strategies: tuple[str, ...] | None = None,
    method: str | None = None,
    precision: str | None = None,
    optimizer: str | None = None,
    checkpointing: str | None = None,
    stack: str = "edgetune",
    loss: str | None = None,
    report: str = "device",
    double_quant: bool | None = None,
    config=None,
    on_event: Callable[[str], None] | None = None,
) -> PlanResult:
    """Size every strategy for a model and run shape against a memory budget, and pick one.

    The model and run shape come from the arguments, else from ``config`` (a ``TrainConfig``, as ``edgetune train``
    reads it), else from the defaults ``edgetune train`` runs with (the embedded model, batch 4 x 128 tokens, LoRA
    rank 16 on every linear of a block). The budget is, in order of precedence: ``budget`` (bytes or a size such as
    "6GiB", for ``budget_device``), a device ``profile`` (e.g. "rtx-4060-8gb"), the config's ``train.budget``, or the
    free memory of this machine's first visible device. A hub model is planned from its ``config.json`` alone,
    the only file fetched; ``revision`` pins its branch, tag or commit (default: the config's ``model.revision``
    when the model comes from the config).

    ``method``, ``precision``, ``optimizer``, ``checkpointing`` describe a run of your own (see
    ``edgetune.plan.run_options.RunOptions``): it is sized instead of edgetune's strategies, with the storage
    choices of ``stack`` (edgetune, hf, torchtune, unsloth, axolotl or litgpt; ``loss`` and ``double_quant``
    override the preset). ``report`` says which total the table shows: allocated, reserved or device. With
    ``method="inference"``, ``seq_len`` is the context length and ``batch_size`` the sequences generated at once.

    Raises:
        EdgetuneError: the model cannot be inspected, a value is out of range, the profile is unknown or the
            budget does not parse.
    """
    from edgetune.train.config import TrainConfig

    config = config or TrainConfig()
    if model is None and revision is None:
        revision = config.model.revision
    source = resolve_model(model or config.model.name, revision=revision, on_event=on_event, config_only=True)
    targets = None if lora_targets is None else tuple(lora_targets)
    asked = {"batch_size": batch_size, "seq_len": seq_len, "lora_rank": lora_rank, "lora_targets": targets}
    run = dataclasses.replace(config.run_shape(), **{key: value for key, value in asked.items() if value is not None})
    if budget is not None:
        size_bytes = budget if isinstance(budget, int) else parse_bytes(budget)
        memory = budget_of_size(size_bytes, budget_device, f"--budget {budget}")
    elif profile is not None:
        memory = budget_of_profile(load_profile(profile))
    elif config.train.budget_bytes is not None:
        memory = budget_of_size(config.train.budget_bytes, budget_device, f"train.budget={config.train.budget}")
    else:
        memory = budget_of_device(read_devices()[0])
    options = RunOptions(
        method=method,  # type: ignore[arg-type]  (RunOptions validates every value)
        precision=precision,  # type: ignore[arg-type]
        optimizer=optimizer,
        checkpointing=checkpointing,  # type: ignore[arg-type]
        stack=stack,
        loss=loss,  # type: ignore[arg-type]
        report=report,  # type: ignore[arg-type]
        double_quant=double_quant,
    )
    return plan_run(source.name, inspect_model(source), run, memory, strategies, options)


def train_config(
    path: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    resume: str | None = None,
    on_event: Callable[[str], None] | None = None,
):
    """The config a run uses: a YAML file (or, with ``resume``, the run folder's saved config) plus overrides.

    With ``resume``, a file and overrides may change only what does not change the run (its length, how often it
    evaluates and saves); each change is reported to ``on_event``.

    Raises:
        EdgetuneError: the file does not parse, a key is unknown, a value has the wrong type or is out of range, or
            a resume would change what the run trains (the message names the keys).
    """
    from edgetune.train.config_file import load_config, resume_config

    if resume is None:
        return load_config(path, list(overrides))
    config, changes = resume_config(resume, path, list(overrides))
    for change in changes:
        (on_event or (lambda _: None))(f"resume changes {change}")
    return config


def train(config=None, *, resume: bool = False, on_step=None, on_event=None, cancel=None):
    """Fine-tune as the config says; see ``edgetune.train.loop.train``. Safe to call from a worker thread.

    Args:
        config: a ``TrainConfig`` (None: the defaults, the main job on the embedded model).
        resume: continue from the newest complete checkpoint in ``config.output.dir``.
        on_step: called with a ``StepInfo`` after every step.
        on_event: called with one-line messages (model conversion, strategy choice, evaluation).
        cancel: a ``CancelToken``; when cancelled, the run checkpoints at the next step boundary and returns.

    Raises:
        EdgetuneError: the model, data, output folder, strategy or checkpoint cannot be used.
    """
    from edgetune.train.config import TrainConfig
    from edgetune.train.loop import train as run_training

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
    gguf_path: str | Path | None = None,
    gguf_type: str = "q8_0",
    dtype: str = "bf16",
    overwrite: bool = False,
    external_data: bool | None = None,
    onnx_int8: bool = False,
    on_event: Callable[[str], None] | None = None,
    base: str | None = None,
):
    """Export a finished run as a merged Hugging Face folder, a verified ONNX file and/or a verified GGUF.

    ``run_dir`` may also be one of its ``checkpoints/step-N`` folders, or a peft adapter folder trained elsewhere
    with ``base`` naming its base model. See ``edgetune.export.exporter.export`` for the arguments; returns an
    ``ExportResult`` with every check's figures.

    Raises:
        EdgetuneError: a bad run folder or output path, an unsupported model type, or a failed numeric check.
    """
    from edgetune.export.exporter import export as run_export
    from edgetune.train.notices import forward_warnings

    with _no_library_progress_bars(), forward_warnings(on_event):
        return run_export(
            run_dir,
            merged_dir=merged_dir,
            onnx_path=onnx_path,
            gguf_path=gguf_path,
            gguf_type=gguf_type,
            dtype=dtype,
            overwrite=overwrite,
            external_data=external_data,
            onnx_int8=onnx_int8,
            on_event=on_event,
            base=base,
        )


def open_chat(
    target: str | None = None,
    *,
    model: str | None = None,
    base: str | None = None,
    device: str | None = None,
    on_event: Callable[[str], None] | None = None,
):
    """Load something to talk to: a finished run (base + adapters, no merge), a merged export, or ``model`` bare.

    ``target`` may also be a run's ``checkpoints/step-N`` folder, or a peft adapter folder with ``base`` its base.

    Returns an ``edgetune.chat.models.ChatModel``; pass it to ``generate`` as often as you like.

    Raises:
        EdgetuneError: neither or both of ``target`` and ``model``, or a folder that is neither a run nor a model.
    """
    from edgetune.chat.models import open_chat_model

    with _no_library_progress_bars():
        return open_chat_model(target, model=model, base=base, device=device, on_event=on_event)


def generate(
    chat,
    prompt: str | list[dict[str, str]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int | None = None,
    system: str | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Iterator[str]:
    """Answer ``prompt`` (a string, or a conversation as role/content messages), yielding text as it is generated.

    ``chat`` is what ``open_chat`` returned, or a run folder / model folder (loaded for this one answer). Iterate
    to stream; ``"".join(...)`` for the whole answer. ``cancel`` is polled between tokens; when it returns True
    the answer ends there. ``temperature=0`` answers greedily; ``seed`` makes sampled answers repeatable.

    Raises:
        EdgetuneError: a bad setting or an empty prompt.
    """
    from edgetune.chat.generation import GenerationSettings, stream_reply

    settings = GenerationSettings(max_new_tokens, temperature, top_p, seed, system)
    if isinstance(chat, str | Path):
        chat = open_chat(str(chat))
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not messages or not str(messages[-1].get("content", "")).strip():
        raise EdgetuneError("the prompt is empty", "pass some text to answer")
    return stream_reply(chat, messages, settings, cancel)
