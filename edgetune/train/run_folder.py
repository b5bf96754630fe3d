"""The run folder: who owns it, what the run produced, and the summary a person reads afterwards.

A run folder holds ``run.json`` (the identity of the run: model, strategy, adapter shape), ``steps.jsonl``,
``checkpoints/``, the result (``adapter/`` in peft format, or ``model/`` for full-parameter runs), ``summary.json``
and ``memory.png``. edgetune never writes into a folder that holds something else, and removes only the entries
it writes, below a valid marker of its own, so nothing of anyone else's is overwritten.
"""

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import torch

from edgetune.errors import EdgetuneError

RUN_FILE = "run.json"
SOURCE_FILE = "edgetune-source.json"
# A marker must name these to be one edgetune wrote; only then may edgetune remove what it lists in OWNED.
MARKER_KEYS = frozenset({"model", "architecture", "strategy"})
OWNED = ("checkpoints", "steps.jsonl", "events.jsonl", "adapter", "model", "summary.json", "memory.png", RUN_FILE)


def run_identity(config, source, strategy) -> dict[str, str]:
    """What a checkpoint must match to be resumed: model, its architecture, strategy and adapter shape."""
    identity = {
        "model": config.model.name,
        "architecture": architecture_hash(source),
        "strategy": strategy.name,
        "seq_len": str(config.data.seq_len),
    }
    if strategy.lora:
        identity["lora"] = f"r={config.lora.rank} alpha={config.lora.alpha} targets={','.join(config.lora.targets)}"
    # Only a pinned revision: an unpinned hub model stays resumable after its main branch moves.
    if config.model.revision is not None:
        identity["revision"] = config.model.revision
    return identity


def architecture_hash(source) -> str:
    """A short hash of the base's config.json: what a run, its checkpoints and its exports must agree on."""
    return hashlib.sha256(source.config_file.read_bytes()).hexdigest()[:16]


def read_marker(path: Path) -> dict | None:
    """The run marker ``run.json`` of a folder: None when there is none.

    Raises:
        EdgetuneError: the file exists but is not an edgetune run marker (damaged, empty, or another tool's).
    """
    marker = path / RUN_FILE
    if not marker.exists():
        return None
    try:
        value = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problem = f"unreadable ({type(exc).__name__})"
    else:
        if is_run_identity(value.get("identity") if isinstance(value, dict) else None):
            return value
        problem = "not an edgetune run marker"
    raise EdgetuneError(
        f"{marker} is {problem}, so edgetune does not know what in {path} it wrote",
        "set output.dir to a new folder; edgetune replaces only folders whose run.json it wrote",
    )


def is_run_identity(identity: object) -> bool:
    """Whether a run.json's ``identity`` is one edgetune wrote: the marker every reader of a run folder trusts."""
    return (
        isinstance(identity, dict)
        and MARKER_KEYS <= set(identity)
        and all(isinstance(value, str) for value in identity.values())
    )


def plan_run_dir(path: Path, identity: dict[str, str], *, resume: bool, overwrite: bool) -> str:
    """What to do with the output folder, decided before anything is loaded or written.

    Returns:
        ``"resume"``, ``"new"`` (absent or empty), ``"restart"`` (an edgetune run that stopped before its first
        checkpoint and saved nothing: it starts over in place) or ``"replace"`` (``overwrite`` of an edgetune run).

    Raises:
        EdgetuneError: the path is a file, holds another tool's data, holds a run without ``resume`` or
            ``overwrite``, or (with ``resume``) holds no run or another run.
    """
    if path.exists() and not path.is_dir():
        raise EdgetuneError(f"output folder {path} is a file", "set output.dir to a folder path")
    existing = read_marker(path) if path.is_dir() else None
    if resume:
        if existing is None:
            raise EdgetuneError(
                f"{path} is not an edgetune run folder (no {RUN_FILE})",
                "pass the output folder of an earlier `edgetune train`, or drop --resume",
            )
        _require_same(path, existing["identity"], identity)
        return "resume"
    if existing is None:
        if path.exists() and any(path.iterdir()):
            raise EdgetuneError(f"{path} is not empty and is not an edgetune run", "set output.dir to a new folder")
        return "new"
    if not _has_progress(path):
        return "restart"
    if not overwrite:
        same = existing["identity"] == identity
        raise EdgetuneError(
            f"{path} already holds {'this' if same else 'a different'} run ({existing['identity']['strategy']} on "
            f"{existing['identity']['model']})",
            "resume it with --resume, set output.dir to a new folder, or set output.overwrite=true to replace it"
            if same
            else "set output.dir to a new folder, or output.overwrite=true to replace it",
        )
    return "replace"


def prepare_run_dir(path: Path, identity: dict[str, str], action: str) -> Path:
    """Carry out ``plan_run_dir``'s decision: clear what an earlier edgetune run wrote and mark the folder as this run.

    Only the entries edgetune writes (``OWNED``) are removed, and only below a valid run marker; anything else in
    the folder stays.

    Raises:
        EdgetuneError: the folder is not writable.
    """
    if action == "resume":
        return path
    if action in ("replace", "restart"):
        for name in OWNED:
            target = path / name
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink(missing_ok=True)
    _ensure_writable(path)
    marker = {"identity": identity, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (path / RUN_FILE).write_text(json.dumps(marker, indent=2))
    return path


def _has_progress(path: Path) -> bool:
    """Whether a run folder holds anything a rerun would lose: a checkpoint or a saved result."""
    checkpoints = path / "checkpoints"
    saved = checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir())
    return saved or any((path / name).exists() for name in ("adapter", "model", "summary.json"))


def _require_same(path: Path, found: dict[str, str], identity: dict[str, str]) -> None:
    # The strategy and the model are what people change by mistake; name them first.
    order = ["strategy", "model", *sorted(set(found) | set(identity))]
    different = [key for key in dict.fromkeys(order) if found.get(key) != identity.get(key)]
    if different:
        key = different[0]
        raise EdgetuneError(
            f"{path} holds a run with {key}={found.get(key)!r}, not {identity.get(key)!r}",
            "resume with the same config, or start a new run in another output.dir",
        )


def _ensure_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".edgetune-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise EdgetuneError(f"cannot write to {path} ({exc.strerror})", "set output.dir to a writable folder") from exc


def save_result_weights(run_dir: Path, model: torch.nn.Module, strategy, tokenizer, source) -> Path:
    """Adapters in peft format (``PeftModel.from_pretrained`` loads them), or the whole changed model.

    Both name the base they came from (``record_base``) and hold ``edgetune-source.json``, which says where it came
    from: the hub id and commit, the local folder, or the GGUF a converted base was made of.
    """
    target = run_dir / ("adapter" if strategy.lora else "model")
    staging = run_dir / f".{target.name}-partial"
    shutil.rmtree(staging, ignore_errors=True)
    write_weights(staging, model, tokenizer, source, strategy)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def write_weights(folder: Path, model: torch.nn.Module, tokenizer, source, strategy) -> None:
    """Save ``model`` (a peft model: its adapters only) and the tokenizer into ``folder``, naming base and strategy.

    The run's result and every checkpoint of a LoRA run (its ``adapter/``) are written this way, so either folder
    loads with ``PeftModel.from_pretrained`` and renders prompts with the run's chat template.
    """
    model.save_pretrained(folder)
    record_base(folder, source, strategy.name)
    tokenizer.save_pretrained(folder)


def record_base(folder: Path, source, strategy: str | None = None) -> None:
    """Make saved weights name their base as something ``from_pretrained`` loads to exactly the trained-on weights.

    peft records the in-memory base's ``name_or_path``, which for edgetune is always a local folder (a hub model
    loads from its cache snapshot), so a saved adapter would name a cache path. Instead ``adapter_config.json``'s
    ``base_model_name_or_path`` (and the model card's ``base_model``) becomes: for a hub model, its id, with peft's
    ``revision`` set to the commit the run trained on (a pinned branch or tag can move; the commit cannot); for a
    local folder, its absolute path; for a base edgetune converted from a GGUF (the embedded default, or a .gguf
    file), the absolute path of the converted folder. No hub id is honest there: SmolLM2-135M-Instruct on the hub
    is not the dequantized Q4_1 GGUF trained on. ``edgetune-source.json`` beside the weights says all of this, and
    for a converted base names the GGUF (package, file, sha256) it came from. The rewrite happens after peft's save:
    given a hub id, peft's save would look the id up on the hub.
    """
    if source.kind == "hub":
        base, revision = source.name, source.revision
    else:
        base, revision = str(source.path.resolve()), None
    provenance = {"model": source.name, "kind": source.kind, "base_model_name_or_path": base, "revision": revision}
    if strategy is not None:
        provenance["strategy"] = strategy  # the strategy that trained these weights, after any out-of-memory move
    converted = source.path / SOURCE_FILE
    if source.kind in ("default", "gguf") and converted.is_file():
        provenance["converted_from"] = json.loads(converted.read_text())
    (folder / SOURCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    adapter_config = folder / "adapter_config.json"
    if not adapter_config.is_file():
        return
    recorded = json.loads(adapter_config.read_text())
    card = folder / "README.md"
    if card.is_file() and recorded.get("base_model_name_or_path"):
        text = card.read_text(encoding="utf-8")
        card.write_text(text.replace(f"base_model: {recorded['base_model_name_or_path']}\n", f"base_model: {base}\n"))
    recorded |= {"base_model_name_or_path": base, "revision": revision}
    adapter_config.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")


# What each ``measured_total_figure`` is, in the words of the CLI line and the picture's legend.
TOTAL_FIGURES = {"peak_rss_bytes": "peak RSS", "nvml_used_bytes": "NVML used", "reserved_bytes": "CUDA reserved"}


def total_figure(device_type: str, budget_kind: str, memory: dict[str, int]) -> str:
    """The step-log figure (a key of a step's ``memory``) that sees the memory the plan's total was sized against.

    On the CPU and on unified boards the plan budgets host RAM, which the process's peak RSS occupies; on a discrete
    GPU it budgets device memory, which NVML's used figure (context included) shows, else the allocator's reserve.
    """
    if device_type == "cpu" or budget_kind == "unified":
        return "peak_rss_bytes"
    return "nvml_used_bytes" if "nvml_used_bytes" in memory else "reserved_bytes"


def write_summary(run_dir: Path, result) -> None:
    """``summary.json`` (plan versus measured, losses, status) and the memory timeline ``memory.png``.

    Memory comes twice: tensors (``planned_peak_bytes``, the plan's estimate, against ``measured_peak_bytes``, the
    tracked tensors) and the total the operating system or device sees (``planned_total_bytes`` against
    ``measured_total_bytes``, the ``measured_total_figure`` of steps.jsonl), each with its ratio.
    """
    summary = {
        "strategy": result.strategy,
        "why": result.strategy_reason,
        "status": result.status,
        "steps_done": result.steps_done,
        "skipped_steps": result.skipped_steps,
        "val_loss_before": result.val_loss_before,
        "val_loss_after": result.val_loss_after,
        "output_dir": str(result.output_dir),
        "planned_peak_bytes": result.planned_peak_bytes,
        "measured_peak_bytes": result.measured_peak_bytes,
        "planned_total_bytes": result.planned_total_bytes,
        "measured_total_bytes": result.measured_total_bytes,
        "measured_total_figure": result.measured_total_figure,
        **result.memory_ratios(),
        "planned_components": result.planned_components,
        "adaptations": result.adaptations,
        "samples_before": result.samples_before,
        "samples_after": result.samples_after,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_memory_timeline(
        run_dir / "steps.jsonl",
        run_dir / "memory.png",
        result.planned_peak_bytes,
        result.planned_total_bytes,
        result.measured_total_figure,
    )


def plot_memory_timeline(
    log_path: Path, image_path: Path, planned_peak_bytes: int, planned_total_bytes: int, total_figure: str
) -> None:
    """Two panels per step: tracked tensors against the planned tensors, and ``total_figure`` (peak RSS, NVML used
    or CUDA reserved) against the planned total.

    Drawn on a ``matplotlib.figure.Figure`` of its own and saved through the Agg canvas, never through pyplot: an
    application that embeds edgetune keeps its plotting backend and its open figures.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_step_log(log_path)
    if not rows:
        return
    steps = [row["step"] for row in rows]
    tracked = [row["memory"]["resident_bytes"] + row["memory"]["step_peak_bytes"] for row in rows]
    # A row logged by an older edgetune may lack the figure; it leaves a gap rather than a false zero.
    total = [row["memory"].get(total_figure, float("nan")) for row in rows]
    figure = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(figure)
    tensors_axes, total_axes = figure.subplots(2, 1, sharex=True)
    name = TOTAL_FIGURES.get(total_figure, total_figure)
    _plot_against_plan(
        tensors_axes, steps, tracked, "tracked tensors (resident + step peak)", planned_peak_bytes, "planned tensors"
    )
    total_label = "planned total (tensors + runtime or CUDA context + slack)"
    _plot_against_plan(total_axes, steps, total, name, planned_total_bytes, total_label)
    tensors_axes.set_title("tensors: tracked against the plan's estimate")
    total_axes.set_title(f"what the OS or device sees: {name} against the plan's total")
    total_axes.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(image_path)


def _plot_against_plan(axes, steps, measured_bytes: list, label: str, planned_bytes: int, planned_label: str) -> None:
    """One panel: a measured figure per step, labelled with its peak over the plan, and the planned figure's line."""
    mib = 2**20
    peak = max((value for value in measured_bytes if not math.isnan(value)), default=0)
    ratio = f", peak {peak / planned_bytes:.2f}x planned" if planned_bytes else ""
    axes.plot(steps, [value / mib for value in measured_bytes], marker=".", label=f"{label}{ratio}")
    axes.axhline(
        planned_bytes / mib, linestyle="--", color="grey", label=f"{planned_label}: {planned_bytes / mib:,.0f} MiB"
    )
    # From 0, so the gap between the lines reads as a share of the whole, and the legend's corner stays clear.
    axes.set_ylim(0, 1.1 * max(peak, planned_bytes, 1) / mib)
    axes.set_ylabel("MiB")
    axes.xaxis.get_major_locator().set_params(integer=True)  # steps are whole
    axes.legend(loc="lower right")


def read_step_log(path: Path) -> list[dict]:
    """The rows of ``steps.jsonl``; a torn line (a kill or a full disk while appending) is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def truncate_step_log(path: Path, step: int) -> None:
    """Keep the log rows of steps up to the checkpoint a run resumes from (they ran); the rest will run again."""
    if path.is_file():
        kept = [row for row in read_step_log(path) if row["step"] <= step]
        path.write_text("".join(json.dumps(row) + "\n" for row in kept))
