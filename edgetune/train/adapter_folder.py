"""Reading a peft LoRA adapter folder, from edgetune or any other tool: its shape, its weights, and whether it fits.

A folder is ``adapter_config.json`` plus ``adapter_model.safetensors``, as ``PeftModel.save_pretrained`` writes it:
a finished run's ``adapter/``, a checkpoint's ``adapter/``, or an adapter trained elsewhere. Only JSON and
safetensors are read, so nothing in the folder can run code. The adapted modules come from the weight names
(``base_model.model.<module>.lora_A.weight``), not from ``target_modules``, which peft writes as short names, full
paths or a regular expression depending on how the adapter was made.

``train.init_adapter`` starts a run from such a folder. The config stays the one description of the run (the saved
``config.yaml``, the plan and the resume identity all read it), so the adapter's rank, alpha and adapted modules
must equal ``lora.rank``, ``lora.alpha`` and the modules ``lora.targets`` adapts in the model; a difference is a
one-line error that names both and the overrides to set, never a silent change of the config.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from edgetune.errors import EdgetuneError

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(rf"{re.escape(_PREFIX)}(.+)\.lora_([AB])\.weight")
# Settings that change what the weights mean or add weights of other kinds; attach_lora makes none of them.
_VARIANTS = ("use_dora", "use_rslora", "modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern")


@dataclass(frozen=True)
class AdapterFolder:
    """A peft LoRA adapter folder whose config and weight names checked out.

    Attributes:
        path: the folder.
        rank: ``r`` of its config.
        alpha: ``lora_alpha`` of its config.
        base: the ``base_model_name_or_path`` it names (None when it names none).
        shapes: for every adapted module path (e.g. ``model.layers.0.self_attn.q_proj``), its (in, out) features.
    """

    path: Path
    rank: int
    alpha: float
    base: str | None
    shapes: dict[str, tuple[int, int]]

    @property
    def module_names(self) -> list[str]:
        """The short names of the adapted modules (``q_proj``, ...), sorted: what ``lora.targets`` lists."""
        return sorted({module.rsplit(".", 1)[-1] for module in self.shapes})


def is_adapter_folder(path: Path) -> bool:
    """Whether ``path`` holds an ``adapter_config.json`` (not yet checked)."""
    return (path / CONFIG_FILE).is_file()


def read_adapter_folder(path: str | Path, fix: str) -> AdapterFolder:
    """Check a peft LoRA adapter folder and read its shape; every tensor is read once, only its shape is kept.

    Args:
        path: the folder.
        fix: the fix the error names (what the caller was given the folder for).

    Raises:
        EdgetuneError: not a folder, a missing or unreadable file, not LoRA, or LoRA variants edgetune cannot load.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise EdgetuneError(f"{folder} is not a peft adapter folder (no {', '.join(missing)})", fix)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgetuneError(f"{folder / CONFIG_FILE} is unreadable ({type(exc).__name__})", fix) from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise EdgetuneError(f"{folder / CONFIG_FILE} is not a LoRA adapter config", fix)
    variants = [key for key in _VARIANTS if config.get(key)]
    if variants or config.get("bias", "none") != "none":
        raise EdgetuneError(f"{folder} is a LoRA variant edgetune does not load ({variants or ['bias']})", fix)
    try:
        with safe_open(folder / WEIGHTS_FILE, framework="pt") as handle:
            # Reading every tensor makes a truncated file fail here, not halfway through loading a model.
            shapes = {name: tuple(handle.get_tensor(name).shape) for name in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EdgetuneError(f"the adapter file {folder / WEIGHTS_FILE} is damaged ({detail})", fix) from exc
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if type(rank) is not int or not isinstance(alpha, int | float):
        raise EdgetuneError(f"{folder / CONFIG_FILE} has no valid r and lora_alpha", fix)
    base = config.get("base_model_name_or_path")
    modules = _modules(folder, shapes, rank, fix)
    return AdapterFolder(folder, rank, float(alpha), base if isinstance(base, str) else None, modules)


def _modules(folder: Path, shapes: dict[str, tuple], rank: int, fix: str) -> dict[str, tuple[int, int]]:
    """(in, out) per adapted module, from lora_A (rank x in) and lora_B (out x rank) of each."""
    pairs: dict[str, dict[str, tuple]] = {}
    for name, shape in shapes.items():
        match = _KEY.fullmatch(name)
        if match is None or len(shape) != 2:
            raise EdgetuneError(f"the adapter file {folder / WEIGHTS_FILE} holds {name}, not a LoRA A/B weight", fix)
        pairs.setdefault(match.group(1), {})[match.group(2)] = shape
    complete = all(set(pair) == {"A", "B"} for pair in pairs.values())
    if not pairs or not complete or any(p["A"][0] != rank or p["B"][1] != rank for p in pairs.values()):
        raise EdgetuneError(
            f"the adapter file {folder / WEIGHTS_FILE} does not hold LoRA A/B pairs of rank {rank}, as its config says",
            fix,
        )
    return {module: (pair["A"][1], pair["B"][0]) for module, pair in pairs.items()}


def check_fits(adapter: AdapterFolder, model: torch.nn.Module, base_name: str, fix: str) -> None:
    """Refuse an adapter whose modules the base lacks or has in other shapes.

    Args:
        adapter: the folder.
        model: the base (real weights or on the meta device), without adapters.
        base_name: how the user named the base, for the message.
        fix: the fix the error names.

    Raises:
        EdgetuneError: a module is missing or its features differ; the message names the first such module.
    """
    for module_name, (in_features, out_features) in sorted(adapter.shapes.items()):
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        found = _features(module)
        if found != (in_features, out_features):
            shown = "has no such module" if found is None else f"has it {found[0]} -> {found[1]}"
            raise EdgetuneError(
                f"the adapter {adapter.path} does not fit the base {base_name}: it adapts {module_name} as "
                f"{in_features} -> {out_features} features, the base {shown} (the adapter names "
                f"{adapter.base or 'no base'})",
                fix,
            )


def _features(module: torch.nn.Module | None) -> tuple[int, int] | None:
    if module is None or not hasattr(module, "in_features") or not hasattr(module, "out_features"):
        return None
    return int(module.in_features), int(module.out_features)


def check_init_adapter(adapter: AdapterFolder, rank: int, alpha: float) -> None:
    """Refuse ``train.init_adapter`` when its rank or alpha differ from the config's (see the module docstring).

    Raises:
        EdgetuneError: names both values and the overrides that match the adapter.
    """
    if (adapter.rank, adapter.alpha) != (rank, alpha):
        raise EdgetuneError(
            f"train.init_adapter {adapter.path} has rank {adapter.rank} and alpha {adapter.alpha:g}, but the config "
            f"has lora.rank={rank} and lora.alpha={alpha:g}",
            f"set lora.rank={adapter.rank} lora.alpha={adapter.alpha:g}, the adapter's",
        )


def load_into(model: torch.nn.Module, adapter: AdapterFolder) -> None:
    """Copy the adapter's weights into a peft model whose adapters ``attach_lora`` made from the same shape.

    Raises:
        EdgetuneError: the model adapts other modules than the adapter (``lora.targets`` differs), or the base
            does not fit the adapter.
    """
    from safetensors.torch import load_file

    fix = f"train.init_adapter needs the base it was trained on; set model.name to it (it names {adapter.base})"
    adapted = {name.removeprefix(_PREFIX) for name, module in model.named_modules() if hasattr(module, "lora_A")}
    if adapted != set(adapter.shapes):
        here = sorted({name.rsplit(".", 1)[-1] for name in adapted})
        raise EdgetuneError(
            f"train.init_adapter {adapter.path} adapts {len(adapter.shapes)} modules ({', '.join(adapter.module_names)}"
            f"), but lora.targets adapts {len(adapted)} in this model ({', '.join(here)})",
            f"set lora.targets=[{','.join(adapter.module_names)}], the adapter's, with the base it was trained on",
        )
    check_fits(adapter, model.get_base_model(), "of this run", fix)
    weights = load_file(str(adapter.path / WEIGHTS_FILE), device="cpu")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            module, kind = _KEY.fullmatch(name).group(1, 2)
            target = parameters[f"{_PREFIX}{module}.lora_{kind}.default.weight"]
            target.copy_(tensor.to(target.device, target.dtype))


def open_init_adapter(path: str, strategy, rank: int, alpha: float) -> AdapterFolder:
    """The folder of ``train.init_adapter``, checked against the run's strategy and LoRA shape.

    Raises:
        EdgetuneError: a full-parameter strategy, a folder that is not a LoRA adapter, or another rank or alpha.
    """
    if not strategy.lora:
        raise EdgetuneError(
            f"train.init_adapter starts from LoRA adapters, but the strategy {strategy.name} trains every parameter",
            "set train.strategy to a LoRA strategy (e.g. adafish-lora or scaled-adamw-qlora-gc), or "
            "train.init_adapter=null",
        )
    adapter = read_adapter_folder(
        path, "set train.init_adapter to a peft adapter folder (a run's or checkpoint's adapter/)"
    )
    check_init_adapter(adapter, rank, alpha)
    return adapter
