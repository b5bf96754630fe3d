"""ONNX export of a run's merged model with a KV cache, verified by running it in onnxruntime on CPU.

The graph (``edgetune.export.onnx_graph``) takes ``input_ids``, ``attention_mask``, ``position_ids`` and the
per-layer ``past_key_values.{i}.key`` / ``.value`` and returns ``logits`` and ``present.{i}.key`` / ``.value``,
the layout onnxruntime-genai and optimum use: a prefill passes an empty past, then each step passes one token and
the presents, so a generated token costs one token's forward. It is traced with torch's dynamo exporter
(``torch.export`` + onnxscript) from the float32 merged model of ``edgetune.export.merge``, then checked before
it is moved into place:

- ``onnx.checker.check_model`` on the saved file (by path, so external weights are checked too);
- max |logit diff| against torch on the sample prompts with an empty past, tolerance ``LOGIT_TOLERANCE``;
- ``GREEDY_TOKENS`` greedy tokens from ``GREEDY_PROMPT`` decoded with the cache (one token per step) must be
  torch's own ``generate`` tokens, and each step's logits must be within ``LOGIT_TOLERANCE`` of torch's.

With ``int8`` a second file, ``OUT.int8.onnx``, is quantized from the checked graph and checked on its own terms
(``edgetune.export.onnx_int8``). Graphs whose weights exceed ``EXTERNAL_DATA_BYTES`` keep them in
``OUT.onnx.data`` next to the graph (the protobuf format caps one file at 2 GB); both files must stay together.
"""

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from edgetune.errors import EdgetuneError
from edgetune.export.logit_checks import GREEDY_PROMPT, LogitCheck, compare_logits, torch_greedy, torch_logits
from edgetune.export.merge import MergedRun
from edgetune.export.onnx_decode import cpu_session, greedy_with_cache, prefill_logits
from edgetune.export.onnx_graph import trace_and_save
from edgetune.export.onnx_int8 import Int8Export, int8_path, write_int8
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
    """What ``export_onnx`` wrote and how it checked out (``int8``: the second file, when asked for)."""

    path: Path
    external_data: bool
    size_bytes: int
    export_seconds: float
    opset: int
    logits: LogitCheck
    cached_logits: LogitCheck
    greedy_torch: list[int]
    greedy_onnx: list[int]
    onnx_seconds_per_token: float
    int8: Int8Export | None = None

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
            "kv_cache": True,
            "logits": self.logits.to_dict(),
            "cached_logits": self.cached_logits.to_dict(),
            "greedy_tokens": len(self.greedy_torch),
            "greedy_identical": self.greedy_identical,
            "onnx_seconds_per_token": self.onnx_seconds_per_token,
            "int8": self.int8.to_dict() if self.int8 else None,
        }


def check_onnx_path(out: Path) -> None:
    """Raises EdgetuneError for an output path that is not an ``.onnx`` file name."""
    if out.suffix != ".onnx":
        raise EdgetuneError(f"{out} does not end in .onnx", f"name the file like {out.with_suffix('.onnx').name}")


def write_onnx(
    merged: MergedRun,
    out: Path,
    *,
    external_data: bool | None = None,
    int8: bool = False,
    on_event: Callable[[str], None] | None = None,
) -> OnnxExport:
    """Export a merged run to ``out`` (and ``OUT.int8.onnx`` with ``int8``), verified in onnxruntime first.

    The caller has checked ``out`` (and the int8 path) with ``check_onnx_path`` and
    ``staged_output.check_destination``.

    Args:
        merged: the run, merged in float32 (``edgetune.export.merge.merge_run``).
        out: the ``.onnx`` file to write.
        external_data: weights in ``OUT.onnx.data``; None decides by size (``EXTERNAL_DATA_BYTES``).
        int8: also write onnxruntime's dynamic int8 quantization of the graph as ``OUT.int8.onnx``.
        on_event: called with one-line progress messages.

    Raises:
        EdgetuneError: an unsupported model type, a failed trace, or a failed check (nothing is then written).
    """
    notify = on_event or logger.info
    model = merged.model.float().eval()
    check_onnx_model_type(getattr(model.config, "model_type", "?"))
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weights_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data
    with staged(out, folder=False, companions=(DATA_SUFFIX,)) as path:
        notify(f"exporting to ONNX with a KV cache ({weights_bytes / 2**20:,.0f} MiB of float32 weights)")
        began = time.perf_counter()
        opset = trace_and_save(model, path, external)
        seconds = time.perf_counter() - began
        checks = _verify(path, model, merged, notify)
        size = path.stat().st_size + (path.with_name(path.name + DATA_SUFFIX).stat().st_size if external else 0)
        result = OnnxExport(out, external, size, seconds, opset, *checks)
        if int8:
            result = dataclasses.replace(
                result, int8=_write_int8(path, int8_path(out), external, model, merged, result, notify)
            )
    written = [out.name, *([out.name + DATA_SUFFIX] if external else []), *([result.int8.path.name] if int8 else [])]
    notify(f"wrote {', '.join(written)} in {out.parent}")
    return result


def check_onnx_model_type(model_type: str) -> None:
    """Raises EdgetuneError for a model family the ONNX path has not been verified on."""
    if model_type not in VERIFIED_MODEL_TYPES:
        raise EdgetuneError(
            f"ONNX export is not supported for model type {model_type!r} (verified: {', '.join(VERIFIED_MODEL_TYPES)})",
            "export the merged Hugging Face folder with --merged and convert it with optimum's ONNX exporter",
        )


def _verify(path: Path, model: torch.nn.Module, merged: MergedRun, notify: Callable[[str], None]):
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    session = cpu_session(path)
    batch = merged.batch
    ort_logits = torch.from_numpy(prefill_logits(session, batch["input_ids"].numpy(), batch["attention_mask"].numpy()))
    name = "onnxruntime vs torch (float32)"
    logits = compare_logits(name, torch_logits(model, batch), ort_logits, batch["attention_mask"], LOGIT_TOLERANCE)
    notify(logits.describe())
    prompt = merged.tokenizer(GREEDY_PROMPT)["input_ids"]
    greedy_torch = torch_greedy(model, torch.tensor([prompt]), GREEDY_TOKENS)
    began = time.perf_counter()
    decoded = greedy_with_cache(session, prompt, GREEDY_TOKENS)
    per_token = (time.perf_counter() - began) / GREEDY_TOKENS
    cached = _cached_logits_check(model, prompt, decoded.tokens, decoded.step_logits)
    notify(cached.describe())
    identical = greedy_torch == decoded.tokens
    if not (logits.passed and cached.passed and identical):
        raise EdgetuneError(
            f"the ONNX model does not reproduce torch ({logits.describe()}; {cached.describe()}; greedy tokens "
            f"{'identical' if identical else 'differ'})",
            "rerun with --debug and report it; the merged folder (--merged) is unaffected",
        )
    notify(f"greedy {GREEDY_TOKENS} tokens with the KV cache identical to torch's ({per_token * 1000:.0f} ms/token)")
    return logits, cached, greedy_torch, decoded.tokens, per_token


def _cached_logits_check(model: torch.nn.Module, prompt: list[int], tokens: list[int], step_logits) -> LogitCheck:
    # Each decoding step's logits against torch's for the same position, computed in one pass without a cache.
    sequence = torch.tensor([prompt + tokens])
    reference = torch_logits(model, {"input_ids": sequence, "attention_mask": torch.ones_like(sequence)})
    steps = reference[:, len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
    candidate = torch.from_numpy(step_logits).unsqueeze(0)
    name = "onnxruntime with the KV cache, one token per step, vs torch (float32)"
    return compare_logits(name, steps, candidate, torch.ones(steps.shape[:2]), LOGIT_TOLERANCE)


def _write_int8(
    source: Path, out: Path, external: bool, model, merged: MergedRun, fp32: OnnxExport, notify
) -> Int8Export:
    notify("quantizing to int8 with onnxruntime (dynamic, MatMul weights QInt8)")
    prompt = merged.tokenizer(GREEDY_PROMPT)["input_ids"]
    with staged(out, folder=False, companions=(DATA_SUFFIX,)) as path:
        reference = torch_logits(model, merged.batch)
        result = write_int8(source, path, external, merged.batch, reference, prompt, fp32.greedy_torch)
        notify(result.describe())
        if not result.passed:
            raise EdgetuneError(
                f"the int8 ONNX model is too far from torch ({result.describe()})",
                "export without --onnx-int8 to keep the float32 graph alone",
            )
    return dataclasses.replace(result, path=out)
