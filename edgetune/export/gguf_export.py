"""GGUF export of a run's merged model, for llama.cpp and Ollama, read back and checked before it lands.

The float32 merge of ``edgetune.export.merge`` is written with the ``gguf`` package the way llama.cpp's
``convert_hf_to_gguf.py`` writes the same families: its architecture keys, ``gguf.TensorNameMap`` names, Q and K
rows of Llama/Mistral reordered for llama.cpp's rotary layout (``LlamaModel.permute``), norms and biases in F32,
every matrix in ``--gguf-type``. For the 4- and 5-bit types the embedding (and a separate output matrix) are
Q8_0, as llama.cpp's ``llama-quantize`` keeps them at higher precision; a matrix whose rows are not a multiple of
the 32-value block is stored F16. Llama 3.1's rotary scaling is written as llama.cpp's ``rope_freqs`` factors.

The checks (``edgetune.export.gguf_check``) run on the staged file; the ``Modelfile`` for Ollama is staged with it.

Reference: llama.cpp ``convert_hf_to_gguf.py`` (``TextModel.set_gguf_parameters``, ``LlamaModel``,
``Qwen2Model``, ``Qwen3Model``) and ``tools/quantize`` (tensor types per file type).
"""

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgetune.errors import EdgetuneError
from edgetune.export.gguf_vocab import GgufVocab, describe_tokenizer
from edgetune.export.logit_checks import LogitCheck
from edgetune.export.merge import MergedRun
from edgetune.export.ollama_modelfile import MODELFILE, is_edgetune_modelfile, modelfile_text
from edgetune.export.staged_output import check_destination, staged

logger = logging.getLogger(__name__)

# --gguf-type -> (tensor type of the matrices, llama.cpp file type); both are gguf enum member names.
GGUF_TYPES: dict[str, tuple[str, str]] = {
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
}
# model_type -> (llama.cpp architecture, whether Q/K rows are reordered). llama.cpp runs Mistral as llama.
FAMILIES: dict[str, tuple[str, bool]] = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),
    "qwen2": ("QWEN2", False),
    "qwen3": ("QWEN3", False),
}
PROVENANCE_KEY = "edgetune.export.run_dir"
BLOCK = 32  # values per block of every type offered here


@dataclass
class GgufPlan:
    """Everything checked before the merge: where to write, in which type, and the tokenizer's description."""

    out: Path
    gguf_type: str
    tokenizer: object
    vocab: GgufVocab
    generation_config: Path | None


@dataclass(frozen=True)
class GgufExport:
    """What ``write_gguf`` wrote and how it checked out."""

    path: Path
    modelfile: Path
    gguf_type: str
    size_bytes: int
    seconds: float
    checks: list[LogitCheck]
    tensor_types: dict[str, int]
    tokenizer_identical: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "modelfile": str(self.modelfile),
            "gguf_type": self.gguf_type,
            "size_bytes": self.size_bytes,
            "seconds": self.seconds,
            "checks": [check.to_dict() for check in self.checks],
            "tensor_types": self.tensor_types,
            "tokenizer_identical": self.tokenizer_identical,
        }


def check_gguf_request(out: Path, gguf_type: str, model_type: str, *, overwrite: bool, protected: dict) -> None:
    """Refuse, before any model is loaded, a GGUF export that cannot succeed or would replace foreign files.

    Raises:
        EdgetuneError: not a ``.gguf`` name, an unknown type, an unsupported family, or an existing GGUF or
            ``Modelfile`` (without ``overwrite``, or not written by edgetune).
    """
    if out.suffix != ".gguf":
        raise EdgetuneError(f"{out} does not end in .gguf", f"name the file like {out.with_suffix('.gguf').name}")
    if gguf_type not in GGUF_TYPES:
        raise EdgetuneError(f"unknown --gguf-type {gguf_type!r}", f"use one of {', '.join(GGUF_TYPES)}")
    if model_type not in FAMILIES:
        raise EdgetuneError(
            f"GGUF export is not supported for model type {model_type!r} (supported: llama, mistral, qwen2, qwen3)",
            "export --merged and convert the folder with llama.cpp's convert_hf_to_gguf.py",
        )
    modelfile = out.parent / MODELFILE
    for path in (out, modelfile):
        check_destination(path, overwrite=overwrite, protected=protected, record=None)
    if out.exists() and not _is_edgetune_gguf(out):
        raise EdgetuneError(
            f"{out} exists and is not a GGUF edgetune exported", "choose a new path; --overwrite replaces only those"
        )
    if modelfile.exists() and not is_edgetune_modelfile(modelfile):
        raise EdgetuneError(
            f"{modelfile} exists and was not written by edgetune", "write the GGUF to another folder, or move it away"
        )


def plan_gguf(out: Path, gguf_type: str, tokenizer_dir: Path, base_dir: Path, vocab_size: int) -> GgufPlan:
    """Load the run's tokenizer and describe it for GGUF: a tokenizer GGUF cannot hold fails here, before the merge.

    Raises:
        EdgetuneError: the tokenizer cannot be described (``gguf_vocab.describe_tokenizer``).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    generation_config = base_dir / "generation_config.json"
    return GgufPlan(out, gguf_type, tokenizer, describe_tokenizer(tokenizer, vocab_size), generation_config)


def write_gguf(merged: MergedRun, plan: GgufPlan, on_event: Callable[[str], None] | None = None) -> GgufExport:
    """Write the merged model and its Modelfile, check the GGUF read back, and only then move both into place.

    Raises:
        EdgetuneError: the read-back model is outside the type's bounds (nothing is written then).
    """
    from edgetune.export.gguf_check import verify_gguf

    notify = on_event or logger.info
    began = time.perf_counter()
    out = plan.out
    with staged(out, folder=False) as path, staged(out.parent / MODELFILE, folder=False) as modelfile:
        notify(f"writing {out.name} ({plan.gguf_type})")
        types = _write(merged, plan, path)
        checks, tokenizer_identical = verify_gguf(merged, plan, path, notify)
        modelfile.write_text(
            modelfile_text(plan.tokenizer, out.name, merged.run.run_dir, plan.generation_config, plan.vocab.add_bos)
        )
        size = path.stat().st_size
    notify(f"wrote {out} and {out.parent / MODELFILE}")
    seconds = time.perf_counter() - began
    return GgufExport(out, out.parent / MODELFILE, plan.gguf_type, size, seconds, checks, types, tokenizer_identical)


def _write(merged: MergedRun, plan: GgufPlan, path: Path) -> dict[str, int]:
    import gguf

    config = merged.model.config
    arch = gguf.MODEL_ARCH[FAMILIES[config.model_type][0]]
    # The writer logs its file list and sizes at INFO; edgetune's own progress line already says what is written.
    gguf_logger = logging.getLogger("gguf")
    level = gguf_logger.level
    gguf_logger.setLevel(logging.WARNING)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    try:
        _add_hyperparameters(writer, config, merged.run, plan.gguf_type)
        _add_vocab(writer, plan.vocab)
        counts: dict[str, int] = {}
        for name, data, qtype in _tensors(merged.model, arch, plan.gguf_type):
            writer.add_tensor(name, data, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
        gguf_logger.setLevel(level)
    return counts


def _add_hyperparameters(writer, config, run, gguf_type: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(Path(run.model_name).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[GGUF_TYPES[gguf_type][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string(PROVENANCE_KEY, str(run.run_dir.resolve()))
    writer.add_string("edgetune.export.strategy", run.strategy.name)


def _add_vocab(writer, vocab: GgufVocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _rope(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}) | (
        {"rope_theta": config.rope_theta} if getattr(config, "rope_theta", None) else {}
    )


def check_rope(config: dict) -> None:
    """Raises EdgetuneError for rotary scaling (in a config.json dict) that this export does not write."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ("default", "llama3"):
        raise EdgetuneError(
            f"GGUF export does not write {kind!r} rotary scaling", "export --merged and convert it with llama.cpp"
        )


def _tensors(model: torch.nn.Module, arch, gguf_type: str) -> Iterator[tuple[str, np.ndarray, object]]:
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    permute = FAMILIES[config.model_type][1]
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise EdgetuneError(
                f"no GGUF name for the tensor {hf_name}", "export --merged and convert it with llama.cpp"
            )
        data = tensor.detach().float()
        if permute and ".self_attn.q_proj." in hf_name:
            data = _permute(data, heads)
        elif permute and ".self_attn.k_proj." in hf_name:
            data = _permute(data, kv_heads)
        yield name, *_encode(name, data.numpy(), gguf_type)
    factors = _rope_factors(model)
    if factors is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors, gguf.GGMLQuantizationType.F32


def _permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    # Reference: llama.cpp LlamaModel.permute. HF rotates the two halves of each head; llama.cpp rotates
    # interleaved pairs, so each head's rows are reordered from (2, d/2) to (d/2, 2).
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _encode(name: str, data: np.ndarray, gguf_type: str) -> tuple[np.ndarray, object]:
    import gguf

    types = gguf.GGMLQuantizationType
    if data.ndim == 1:
        return data, types.F32
    qtype = types[GGUF_TYPES[gguf_type][0]]
    if qtype not in (types.F16, types.BF16, types.Q8_0) and name.startswith(("token_embd", "output.")):
        qtype = types.Q8_0
    if qtype not in (types.F16, types.BF16) and data.shape[-1] % BLOCK:
        qtype = types.F16
    return gguf.quants.quantize(data, qtype), qtype


def _rope_factors(model: torch.nn.Module) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` for Llama 3.1 scaling: how much each rotary frequency is divided by."""
    rope = _rope(model.config)
    if (rope.get("rope_type") or rope.get("type")) != "llama3":
        return None
    scaled = next(b for n, b in model.named_buffers() if n.endswith("rotary_emb.inv_freq")).float()
    dim = scaled.numel() * 2
    plain = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return (plain / scaled).numpy().astype(np.float32)


def _is_edgetune_gguf(path: Path) -> bool:
    import gguf

    try:
        return PROVENANCE_KEY in gguf.GGUFReader(str(path)).fields
    except Exception:  # noqa: BLE001 - gguf raises many types for a file that is not a GGUF
        return False
