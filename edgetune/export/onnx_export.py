"""ONNX export of a run's merged model, verified by running it in onnxruntime on CPU.

The graph maps ``input_ids`` and ``attention_mask`` (int64, dynamic batch and length) to ``logits`` (float32)
and recomputes the whole prefix on every call: there is no KV-cache input, so generation costs one full
forward per token. It is traced with torch's dynamo exporter (``torch.export`` + onnxscript) from the float32
merged model of ``edgetune.export.merge``, then checked three ways before it is moved into place:

- ``onnx.checker.check_model`` on the saved file (by path, so external weights are checked too);
- max |logit diff| against torch on the sample prompts, tolerance ``LOGIT_TOLERANCE`` (float32 both sides);
- ``GREEDY_TOKENS`` greedy tokens from ``GREEDY_PROMPT``: onnxruntime and torch must pick the same ones.

Graphs whose weights exceed ``EXTERNAL_DATA_BYTES`` keep them in ``OUT.onnx.data`` next to the graph (the
protobuf format caps one file at 2 GB); both files must stay together.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from edgetune.errors import EdgetuneError
from edgetune.export.logit_checks import GREEDY_PROMPT, LogitCheck, compare_logits, torch_logits
from edgetune.export.merge import MergedRun
from edgetune.export.staged_output import staged

logger = logging.getLogger(__name__)

LOGIT_TOLERANCE = 1e-3
GREEDY_TOKENS = 20
EXTERNAL_DATA_BYTES = 3 * 2**29  # 1.5 GiB of weights: margin under protobuf's 2 GB for the graph itself
DATA_SUFFIX = ".data"
# Decoder-only families whose export the test suite runs through onnxruntime (tests/test_onnx_export.py).
VERIFIED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class OnnxExport:
    """What ``export_onnx`` wrote and how it checked out."""

    path: Path
    external_data: bool
    size_bytes: int
    export_seconds: float
    opset: int
    logits: LogitCheck
    greedy_torch: list[int]
    greedy_onnx: list[int]
    onnx_seconds_per_token: float

    @property
    def greedy_identical(self) -> bool:
        return self.greedy_torch == self.greedy_onnx

    def to_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "external_data": self.external_data,
            "size_bytes": self.size_bytes,
            "export_seconds": self.export_seconds,
            "opset": self.opset,
            "logits": self.logits.to_dict(),
            "greedy_tokens": len(self.greedy_torch),
            "greedy_identical": self.greedy_identical,
            "onnx_seconds_per_token": self.onnx_seconds_per_token,
        }


class _LogitsOnly(torch.nn.Module):
    # The graph's whole interface: two int64 inputs, one float output, no cache objects to trace.
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def check_onnx_path(out: Path) -> None:
    """Raises EdgetuneError for an output path that is not an ``.onnx`` file name."""
    if out.suffix != ".onnx":
        raise EdgetuneError(f"{out} does not end in .onnx", f"name the file like {out.with_suffix('.onnx').name}")


def write_onnx(
    merged: MergedRun,
    out: Path,
    *,
    external_data: bool | None = None,
    on_event: Callable[[str], None] | None = None,
) -> OnnxExport:
    """Export a merged run to ``out`` and verify it with onnxruntime before it lands.

    The caller has checked ``out`` with ``check_onnx_path`` and ``staged_output.check_destination``.

    Args:
        merged: the run, merged in float32 (``edgetune.export.merge.merge_run``).
        out: the ``.onnx`` file to write.
        external_data: weights in ``OUT.onnx.data``; None decides by size (``EXTERNAL_DATA_BYTES``).
        on_event: called with one-line progress messages.

    Raises:
        EdgetuneError: an unsupported model type, a failed trace, or a failed check (``out`` is then untouched).
    """
    notify = on_event or logger.info
    model = merged.model.float().eval()
    check_onnx_model_type(getattr(model.config, "model_type", "?"))
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weights_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data
    with staged(out, folder=False, companions=(DATA_SUFFIX,)) as path:
        notify(f"exporting to ONNX ({weights_bytes / 2**20:,.0f} MiB of float32 weights)")
        began = time.perf_counter()
        opset = _trace_and_save(model, merged.batch, path, external)
        seconds = time.perf_counter() - began
        result = _verify(path, model, merged, notify)
        size = path.stat().st_size + (path.with_name(path.name + DATA_SUFFIX).stat().st_size if external else 0)
    notify(f"wrote {out}" + (f" and {out.name}{DATA_SUFFIX}" if external else ""))
    return OnnxExport(out, external, size, seconds, opset, *result)


def check_onnx_model_type(model_type: str) -> None:
    """Raises EdgetuneError for a model family the ONNX path has not been verified on."""
    if model_type not in VERIFIED_MODEL_TYPES:
        raise EdgetuneError(
            f"ONNX export is not supported for model type {model_type!r} (verified: {', '.join(VERIFIED_MODEL_TYPES)})",
            "export the merged Hugging Face folder with --merged and convert it with optimum's ONNX exporter",
        )


def _trace_and_save(model: torch.nn.Module, batch: dict[str, torch.Tensor], path: Path, external: bool) -> int:
    batch_dim = torch.export.Dim("batch", min=1, max=1024)
    length_dim = torch.export.Dim("sequence", min=2, max=int(getattr(model.config, "max_position_embeddings", 4096)))
    shapes = {name: {0: batch_dim, 1: length_dim} for name in ("input_ids", "attention_mask")}
    try:
        program = torch.onnx.export(
            _LogitsOnly(model),
            (batch["input_ids"], batch["attention_mask"]),
            dynamo=True,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes=shapes,
            verbose=False,
        )
        program.save(str(path), external_data=external)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; the user needs one line
        raise EdgetuneError(
            f"torch could not export {model.config.model_type} to ONNX ({str(exc).splitlines()[0][:200]})",
            "export the merged Hugging Face folder with --merged instead, and rerun with --debug to report this",
        ) from exc
    return int(program.model_proto.opset_import[0].version)


def _verify(path: Path, model: torch.nn.Module, merged: MergedRun, notify: Callable[[str], None]):
    import onnx
    import onnxruntime

    onnx.checker.check_model(str(path), full_check=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = merged.batch
    ort_logits = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in batch.items()})[0])
    logits = compare_logits(
        "onnxruntime vs torch (float32)",
        torch_logits(model, batch),
        ort_logits,
        batch["attention_mask"],
        LOGIT_TOLERANCE,
    )
    notify(logits.describe())
    prompt = merged.tokenizer(GREEDY_PROMPT, return_tensors="pt")["input_ids"]
    greedy_torch = _greedy(lambda ids: torch_logits(model, _full_mask(ids)), prompt)
    began = time.perf_counter()
    greedy_onnx = _greedy(
        lambda ids: torch.from_numpy(session.run(None, {k: v.numpy() for k, v in _full_mask(ids).items()})[0]), prompt
    )
    per_token = (time.perf_counter() - began) / GREEDY_TOKENS
    if not logits.passed or greedy_torch != greedy_onnx:
        raise EdgetuneError(
            f"the ONNX model does not reproduce torch ({logits.describe()}; greedy tokens "
            f"{'identical' if greedy_torch == greedy_onnx else 'differ'})",
            "rerun with --debug and report it; the merged folder (--merged) is unaffected",
        )
    notify(f"greedy {GREEDY_TOKENS} tokens identical in torch and onnxruntime ({per_token * 1000:.0f} ms/token)")
    return logits, greedy_torch, greedy_onnx, per_token


def _full_mask(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _greedy(logits_of: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor) -> list[int]:
    ids = prompt
    for _ in range(GREEDY_TOKENS):
        next_id = logits_of(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids[0, prompt.shape[1] :].tolist()
