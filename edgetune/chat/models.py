"""What ``edgetune chat`` and ``generate`` talk to, loaded for generation: a run, an export folder or a bare model.

A run may also be given as one of its checkpoints (``RUN/checkpoints/step-N``: the adapters of that step), and a
peft adapter trained elsewhere as its folder plus ``base`` (``edgetune.export.open_weights``).

A LoRA run is its base with the adapters attached (no merge, no export step): on a GPU the base is loaded as it
was trained; on a CPU it is loaded in float32, the 4-bit NF4 base dequantized exactly as the exporter does, since
16-bit matmuls are many times slower than float32 on CPUs without native bf16 and generation is matmul-bound.
The tokenizer is the run's own (it carries the chat template training used).
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from edgetune.errors import EdgetuneError
from edgetune.plan.sources import resolve_model
from edgetune.train.adapter_folder import is_adapter_folder
from edgetune.train.checkpoint import is_checkpoint_folder
from edgetune.train.run_folder import RUN_FILE

logger = logging.getLogger(__name__)


@dataclass
class ChatModel:
    """A model ready to generate: the module (eval mode, on its device), its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    description: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def open_chat_model(
    target: str | None,
    *,
    model: str | None = None,
    base: str | None = None,
    device: str | None = None,
    on_event: Callable[[str], None] | None = None,
) -> ChatModel:
    """Load ``target`` (a run, checkpoint, merged export or, with ``base``, peft adapter folder) or ``model`` bare.

    Raises:
        EdgetuneError: neither or both given, ``base`` without an adapter folder, or the folder is none of these.
    """
    notify = on_event or logger.info
    if (target is None) == (model is None):
        raise EdgetuneError(
            "name one thing to talk to", "pass a run folder, a merged export folder, or --model NAME (not both)"
        )
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model is not None:
        if base is not None:
            raise EdgetuneError("--base was given with --model", "pass a peft adapter folder with --base, or --model")
        return _bare_model(model, chosen, notify)
    folder = Path(target)
    if (folder / RUN_FILE).is_file() or is_checkpoint_folder(folder) or is_adapter_folder(folder):
        return _run(folder, base, chosen, notify)
    if (folder / "config.json").is_file():
        if base is not None:
            raise EdgetuneError(f"--base was given with the model folder {folder}", "drop --base, or pass an adapter")
        return _bare_model(str(folder), chosen, notify)
    raise EdgetuneError(
        f"{folder} is neither an edgetune run folder nor a model folder (nor a checkpoint or a peft adapter folder)",
        "pass the output folder of `edgetune train` or of `edgetune export --merged`, a RUN/checkpoints/step-N "
        "folder, a peft adapter folder with --base MODEL, or --model NAME",
    )


def _run(folder: Path, base: str | None, device: torch.device, notify: Callable[[str], None]) -> ChatModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgetune.export.finished_run import check_same_base, load_run_tokenizer
    from edgetune.export.merge import dequantized_float32
    from edgetune.export.open_weights import open_weights
    from edgetune.train.loading import load_base

    run = open_weights(folder, base=base)
    if not run.is_lora:
        tokenizer = AutoTokenizer.from_pretrained(run.weights_dir)
        dtype = torch.float32 if device.type == "cpu" else None
        loaded = AutoModelForCausalLM.from_pretrained(run.weights_dir, dtype=dtype)
        return ChatModel(_ready(loaded, device), tokenizer, f"{folder} (fully fine-tuned)")
    from peft import PeftModel

    source = resolve_model(run.model_name, revision=run.revision, on_event=notify)
    check_same_base(run, source, notify)
    tokenizer = load_run_tokenizer(run, source)
    on_cpu = device.type == "cpu"
    notify(f"loading {run.model_name} ({'float32' if on_cpu else run.strategy.base}) with the adapters of {folder}")
    base = load_base(source, "fp32" if on_cpu and run.strategy.base != "nf4" else run.strategy.base, device=device)
    if on_cpu and run.strategy.base == "nf4":
        base = dequantized_float32(base)
    attached = PeftModel.from_pretrained(base, run.weights_dir)
    return ChatModel(
        _ready(attached, device), tokenizer, f"{folder} ({run.strategy.name} adapters on {run.model_name})"
    )


def _bare_model(name: str, device: torch.device, notify: Callable[[str], None]) -> ChatModel:
    from edgetune.train.loading import load_base, load_tokenizer

    source = resolve_model(name, on_event=notify)
    tokenizer = load_tokenizer(source)  # refuses an architecture-only source in one line
    loaded = load_base(source, "fp32" if device.type == "cpu" else "bf16", device=device)
    return ChatModel(_ready(loaded, device), tokenizer, f"{name} (no fine-tuning)")


def _ready(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model = model.to(device).eval()
    model.config.use_cache = True  # training turns the KV cache off; generation needs it
    return model
