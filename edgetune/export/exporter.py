"""``edgetune export``: a finished run as a merged Hugging Face folder, an ONNX file and/or a GGUF, from one merge.

Every destination is checked before any model is loaded, so a typo costs seconds, not a merge; each output is
written to a staging path and moved into place only after its checks pass.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgetune.errors import EdgetuneError
from edgetune.export.finished_run import tokenizer_dir
from edgetune.export.gguf_export import GgufExport, check_gguf_request, check_rope, plan_gguf, write_gguf
from edgetune.export.merge import EXPORT_FILE, MergedExport, check_dtype, merge_run, write_merged
from edgetune.export.onnx_export import OnnxExport, check_onnx_model_type, check_onnx_path, write_onnx
from edgetune.export.onnx_int8 import int8_path
from edgetune.export.open_weights import open_weights
from edgetune.export.staged_output import check_destination
from edgetune.plan.sources import cache_dir, read_config_dict, resolve_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` wrote: the merged folder, the ONNX file, the GGUF (None for those not asked for)."""

    run_dir: Path
    strategy: str
    merged: MergedExport | None
    onnx: OnnxExport | None
    gguf: GgufExport | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "run_dir": str(self.run_dir),
            "strategy": self.strategy,
            "merged": self.merged.to_dict() if self.merged else None,
            "onnx": self.onnx.to_dict() if self.onnx else None,
            "gguf": self.gguf.to_dict() if self.gguf else None,
        }


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
) -> ExportResult:
    """Export what ``edgetune train`` produced in ``run_dir``.

    Args:
        run_dir: an ``edgetune train`` output folder, one of its ``checkpoints/step-N`` folders, or (with ``base``)
            a peft adapter folder (``edgetune.export.open_weights``).
        merged_dir: write the merged model here as a Hugging Face folder (safetensors, config, tokenizer).
        onnx_path: write an ONNX graph with a KV cache here (input ids, attention mask, position ids and past keys
            and values to logits and present keys and values), verified with onnxruntime.
        gguf_path: write a GGUF for llama.cpp here, read back and checked, with an Ollama ``Modelfile`` beside it.
        gguf_type: the GGUF's matrices: ``f16``, ``bf16``, ``q8_0`` (default), ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``.
        dtype: the merged folder's weights: ``bf16`` (default), ``fp16`` or ``fp32``. ONNX is always float32.
        overwrite: replace existing outputs (only once the new ones passed their checks).
        external_data: ONNX weights in a ``.data`` file next to the graph; None decides by size.
        onnx_int8: also write onnxruntime's dynamic int8 quantization of the graph next to it as ``OUT.int8.onnx``,
            with its own check (needs ``onnx_path``).
        on_event: called with one-line progress messages.
        base: the base model of a peft adapter folder trained elsewhere (a name, folder, .gguf or hub id).

    Raises:
        EdgetuneError: nothing asked for, a bad run folder, an output that exists without ``overwrite``, an
            unsupported model type, or a failed numeric check.
    """
    if onnx_int8 and onnx_path is None:
        raise EdgetuneError("--onnx-int8 needs --onnx", "add --onnx OUT.onnx; the int8 file is written next to it")
    if merged_dir is None and onnx_path is None and gguf_path is None:
        raise EdgetuneError("nothing to export", "pass --merged OUT_DIR, --onnx OUT.onnx and/or --gguf OUT.gguf")
    check_dtype(dtype)
    run = open_weights(run_dir, base=base)
    int8_out = int8_path(Path(onnx_path)) if onnx_int8 else None
    targets = [Path(p).resolve() for p in (merged_dir, onnx_path, gguf_path, int8_out) if p is not None]
    if len(set(targets)) < len(targets):
        raise EdgetuneError("two outputs name the same path", "give each output its own path")
    source = resolve_model(run.model_name, revision=run.revision, on_event=on_event)
    protected = {
        "the run folder": run.run_dir,
        "the model cache": cache_dir(),
        "the base model's folder": source.path if source.path.is_dir() else source.path.parent,
    }
    config = read_config_dict(source.config_file)
    if merged_dir is not None:
        check_destination(Path(merged_dir), overwrite=overwrite, protected=protected, record=EXPORT_FILE)
    if onnx_path is not None:
        check_onnx_path(Path(onnx_path))
        check_destination(Path(onnx_path), overwrite=overwrite, protected=protected, record=None)
        check_onnx_model_type(str(config["model_type"]))
    if int8_out is not None:
        check_destination(int8_out, overwrite=overwrite, protected=protected, record=None)
    gguf_plan = None
    if gguf_path is not None:
        check_gguf_request(
            Path(gguf_path), gguf_type, str(config["model_type"]), overwrite=overwrite, protected=protected
        )
        check_rope(config)
        base_dir = protected["the base model's folder"]
        gguf_plan = plan_gguf(
            Path(gguf_path), gguf_type, tokenizer_dir(run, source), base_dir, int(config["vocab_size"])
        )
    merged = merge_run(run, on_event)
    merged_result = write_merged(merged, Path(merged_dir), dtype, on_event) if merged_dir is not None else None
    onnx_result = (
        write_onnx(merged, Path(onnx_path), external_data=external_data, int8=onnx_int8, on_event=on_event)
        if onnx_path is not None
        else None
    )
    gguf_result = write_gguf(merged, gguf_plan, on_event) if gguf_plan is not None else None
    return ExportResult(run.run_dir, run.strategy.name, merged_result, onnx_result, gguf_result)
