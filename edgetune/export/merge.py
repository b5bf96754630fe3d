"""Merging a run's LoRA adapters into a 16-bit copy of the base they were trained on, checked by its logits.

peft's ``merge_and_unload`` on a 4-bit model rounds W + BA back to NF4, which shifts outputs (peft #2321,
transformers #31293). Here every NF4 weight is dequantized exactly as the training forward saw it (bitsandbytes'
``dequantize_4bit``, to the bf16 compute dtype), upcast to float32, the adapters are added in float32, and the
result is rounded once, to the output dtype. Embeddings, norms and head are copied from the trained base too, so
the merged model is the trained model, not the original checkpoint plus adapters.

Checks, on the sample prompts of ``edgetune.export.logit_checks`` (positions the attention mask keeps):

- ``merge``: the float32 merged model against the float32 adapter model on the same dequantized base. This is
  the merge arithmetic alone; tolerance ``MERGE_TOLERANCE`` (measured: about 1e-5 on SmolLM2-135M).
- ``saved``: the written folder, reloaded in float32 (so the stored values alone are tested, not 16-bit
  arithmetic), against that float32 adapter model. A 16-bit output rounds each weight by up to half an ulp
  (2^-9 relative in bf16, 2^-12 in fp16), which moves logits far more than the merge does. The tolerance is
  ``SAVED_TOLERANCE[dtype]`` times the largest reference logit: measured on SmolLM2-135M runs, bf16 storage
  moved logits by 0.5-2.3% of the largest one and fp16 by 0.1%. (Running in bf16 moves them more: the model as
  trained is 6% away.) fp32 output is held to ``MERGE_TOLERANCE``, absolute.
- ``as trained``: the float32 adapter model against the model exactly as training ran it (NF4 or bf16 compute).
  This catches a base that was rebuilt wrongly (a dequantization bug gives logits as far apart as the logits
  are large); bf16 arithmetic alone moves them by about 6% of the largest logit on SmolLM2-135M, so the
  tolerance is ``AS_TRAINED_RELATIVE_TOLERANCE`` times the largest reference logit.
"""

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from edgetune.errors import EdgetuneError
from edgetune.export.finished_run import FinishedRun, check_same_base, load_run_tokenizer
from edgetune.export.logit_checks import LogitCheck, compare_logits, largest_kept_logit, sample_batch, torch_logits
from edgetune.export.staged_output import staged
from edgetune.plan.sources import resolve_model

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MERGE_TOLERANCE = 1e-3
AS_TRAINED_RELATIVE_TOLERANCE = 0.15
# Max |logit diff| of the 16-bit saved weights (computed in float32) against the float32 adapter model, as a share
# of the largest reference logit.
SAVED_TOLERANCE: dict[str, float] = {"bf16": 0.05, "fp16": 0.01}
EXPORT_FILE = "edgetune_export.json"


@dataclass
class MergedRun:
    """A run's model, merged in float32 and checked; what both exporters start from."""

    run: FinishedRun
    model: torch.nn.Module
    tokenizer: object
    checks: list[LogitCheck]
    reference_logits: torch.Tensor
    batch: dict[str, torch.Tensor]


@dataclass(frozen=True)
class MergedExport:
    """What ``write_merged`` wrote and how it checked out."""

    out_dir: Path
    dtype: str
    size_bytes: int
    seconds: float
    checks: list[LogitCheck]

    def to_dict(self) -> dict[str, object]:
        return {
            "out_dir": str(self.out_dir),
            "dtype": self.dtype,
            "size_bytes": self.size_bytes,
            "seconds": self.seconds,
            "checks": [check.to_dict() for check in self.checks],
        }


def merge_run(run: FinishedRun, on_event: Callable[[str], None] | None = None) -> MergedRun:
    """Load a finished run, fold its adapters into a float32 copy of its trained base, and check the merge.

    Raises:
        EdgetuneError: the base model cannot be found or changed since training, or the merge check fails.
    """
    notify = on_event or logger.info
    from edgetune.train.loading import load_base

    source = resolve_model(run.model_name, revision=run.revision, on_event=notify)
    check_same_base(run, source, notify)
    tokenizer = load_run_tokenizer(run, source)
    batch = sample_batch(tokenizer)
    notify(f"loading the {run.strategy.base} base of {run.run_dir} as it was trained")
    mask = batch["attention_mask"]
    if not run.is_lora:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(run.weights_dir).eval()
        trained_logits = torch_logits(model, batch)
        logits = torch_logits(model.float(), batch)
        checks = [_as_trained_check("as trained (saved weights in their dtype)", logits, trained_logits, mask)]
        return MergedRun(run, model, tokenizer, _passed(checks), logits, batch)
    from peft import PeftModel

    trained_base = load_base(source, run.strategy.base)
    base = dequantized_float32(trained_base)
    trained_logits = torch_logits(PeftModel.from_pretrained(trained_base, run.weights_dir), batch)
    del trained_base
    unmerged = PeftModel.from_pretrained(base, run.weights_dir)
    reference = torch_logits(unmerged, batch)
    notify("merging the adapters in float32")
    merged = unmerged.merge_and_unload()
    checks = [
        _as_trained_check(f"as trained ({run.strategy.base} base + adapters)", reference, trained_logits, mask),
        compare_logits(
            "merge (float32 merged vs float32 adapters)", reference, torch_logits(merged, batch), mask, MERGE_TOLERANCE
        ),
    ]
    return MergedRun(run, merged, tokenizer, _passed(checks), reference, batch)


def _as_trained_check(name: str, reference: torch.Tensor, trained: torch.Tensor, mask: torch.Tensor) -> LogitCheck:
    return compare_logits(
        name, reference, trained, mask, AS_TRAINED_RELATIVE_TOLERANCE * largest_kept_logit(reference, mask)
    )


def _passed(checks: list[LogitCheck]) -> list[LogitCheck]:
    for check in checks:
        if not check.passed:
            raise EdgetuneError(
                f"the merged model does not reproduce the trained one ({check.describe()})",
                "report this with the run folder; the adapters are unchanged and still usable",
            )
    return checks


def write_merged(
    merged: MergedRun, out: Path, dtype: str, on_event: Callable[[str], None] | None = None
) -> MergedExport:
    """Write the merged model to ``out`` as a standard Hugging Face folder, staged and checked before it lands.

    The caller has checked ``out`` with ``staged_output.check_destination``.

    Raises:
        EdgetuneError: unknown dtype, or the written weights fail their check (``out`` is then untouched).
    """
    check_dtype(dtype)
    began = time.perf_counter()
    with staged(out, folder=True) as staging:
        checks = save_merged(merged, staging, dtype)
    (on_event or logger.info)(f"wrote {out}")
    return MergedExport(out, dtype, _folder_bytes(out), time.perf_counter() - began, checks)


def check_dtype(dtype: str) -> None:
    """Raises EdgetuneError for a dtype the merged folder cannot be written in."""
    if dtype not in DTYPES:
        raise EdgetuneError(f"unknown dtype {dtype!r} for the merged model", f"use one of {', '.join(DTYPES)}")


def save_merged(merged: MergedRun, folder: Path, dtype: str) -> list[LogitCheck]:
    """Save the merged model in ``dtype`` to ``folder``, reload it from disk, and check its logits.

    Raises:
        EdgetuneError: the reloaded model's logits are outside the dtype's tolerance (module docstring).
    """
    from transformers import AutoModelForCausalLM

    # Cast tensor by tensor while saving: the float32 model stays exact for an ONNX export after this one.
    # Tied tensors (embeddings and head) must stay one tensor, or the file holds the vocabulary matrix twice.
    cast: dict[int, torch.Tensor] = {}
    weights = {
        name: cast.setdefault(tensor.data_ptr(), tensor.to(DTYPES[dtype]))
        for name, tensor in merged.model.state_dict().items()
    }
    merged.model.save_pretrained(folder, state_dict=weights)
    del weights
    # save_pretrained records the in-memory model's dtype (float32); loaders read this field for "auto".
    config_file = folder / "config.json"
    recorded = json.loads(config_file.read_text()) | {"dtype": str(DTYPES[dtype]).removeprefix("torch.")}
    config_file.write_text(json.dumps(recorded, indent=2))
    merged.tokenizer.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    saved = compare_logits(
        f"saved {dtype} weights vs float32 {'adapters' if merged.run.is_lora else 'trained model'}",
        merged.reference_logits,
        torch_logits(reloaded, merged.batch),
        merged.batch["attention_mask"],
        saved_tolerance(dtype, merged.reference_logits, merged.batch["attention_mask"]),
    )
    checks = [*merged.checks, saved]
    provenance = {
        "run_dir": str(merged.run.run_dir.resolve()),
        "weights_dir": str(merged.run.weights_dir.resolve()),
        "origin": merged.run.origin,
        "model": merged.run.model_name,
        "revision": merged.run.revision,
        "strategy": merged.run.strategy.name,
        "dtype": dtype,
        "checks": [c.to_dict() for c in checks],
    }
    (folder / EXPORT_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    if not saved.passed:
        raise EdgetuneError(
            f"the saved {dtype} model drifts too far from the adapters ({saved.describe()})",
            "export with --dtype fp32 (or bf16 if fp16 overflowed)",
        )
    return checks


def saved_tolerance(dtype: str, reference: torch.Tensor, mask: torch.Tensor) -> float:
    """The bound on max |logit diff| of weights saved in ``dtype``: relative for 16-bit, absolute for fp32."""
    if dtype == "fp32":
        return MERGE_TOLERANCE
    return SAVED_TOLERANCE[dtype] * largest_kept_logit(reference, mask)


def dequantized_float32(base: torch.nn.Module) -> torch.nn.Module:
    """A plain float32 copy of ``base`` with every 4-bit linear dequantized as the training forward saw it."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(base.config, dtype=torch.float32)
    for name, parameter in plain.named_parameters():
        owner_name, _, attribute = name.rpartition(".")
        owner = base.get_submodule(owner_name)
        with torch.no_grad():
            parameter.copy_(_dense_weight(owner) if attribute == "weight" else getattr(owner, attribute))
    plain.config.use_cache = True
    if hasattr(plain.config, "quantization_config"):
        del plain.config.quantization_config
    return plain.eval()


def _dense_weight(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.detach()
    from bitsandbytes import functional

    data = weight.data
    if getattr(quant_state, "packing_format_for_cpu", False):
        # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place at its first eval forward without
        # grad, rounding the block scales to bf16. dequantize_4bit reads the original layout, so undo the
        # repacking as bitsandbytes' own state_dict() does. That inverse is lossy (scales rounded to bf16, then
        # re-quantized to 8 bits: about 1%), which is why merge_run dequantizes before any forward.
        data, quant_state = functional._convert_weight_packed_for_cpu_inverse(data, quant_state)
    return functional.dequantize_4bit(data, quant_state)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
