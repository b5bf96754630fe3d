"""A run's tokenizer as GGUF metadata, the way llama.cpp's ``convert_hf_to_gguf.py`` describes a byte-level BPE.

llama.cpp reimplements each tokenizer in C++, so the GGUF must name the pre-tokenizer (``tokenizer.ggml.pre``)
that splits text before BPE. Like llama.cpp's converter, the name is found by encoding a fixed check text and
hashing the ids (``get_vocab_base_pre``); the table below holds the entries for the families edgetune exports.
A tokenizer whose pre-tokenizer is GPT-2's byte-level split alone is described as ``gpt-2`` whatever its vocabulary
(llama.cpp's ``gpt-2`` pre-tokenizer is exactly that split). Anything else (SentencePiece models, unknown
pre-tokenizers) is refused before the merge: llama.cpp would tokenize it differently from training.

Reference: llama.cpp ``convert_hf_to_gguf.py`` (``get_vocab_base``, ``get_vocab_base_pre``, ``_set_vocab_gpt2``,
``does_token_look_special``) and ``gguf-py/gguf/vocab.py`` (``SpecialVocab``, merges with spaces).
"""

import json
from dataclasses import dataclass, field
from hashlib import sha256

from edgetune.errors import EdgetuneError

# Reference: llama.cpp convert_hf_to_gguf.py get_vocab_base_pre (chktxt and the hashes of the ids it encodes to).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? "
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M (and SmolLM2)
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B (Qwen2.5, Qwen3)
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo-Base-2407
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}
# gguf.TokenType values (the enum is not imported here so that this module loads without gguf).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class GgufVocab:
    """What ``tokenizer.ggml.*`` records: tokens, their types, merges, special ids and the chat template."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def describe_tokenizer(tokenizer, vocab_size: int) -> GgufVocab:
    """The GGUF description of a Hugging Face fast tokenizer, or a one-line error if GGUF cannot describe it.

    Args:
        tokenizer: the run's tokenizer (a fast tokenizer with a ``tokenizer.json`` backend).
        vocab_size: the model's embedding rows; ids the tokenizer does not use are written as unused pads.

    Raises:
        EdgetuneError: not a byte-level BPE tokenizer, an unknown pre-tokenizer, or more tokens than embeddings.
    """
    spec = _backend_spec(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or not _uses_byte_level(spec):
        raise EdgetuneError(
            f"the tokenizer of this run is a {model.get('type', 'non-BPE')} tokenizer without GPT-2 byte-level "
            "encoding, which edgetune's GGUF export cannot describe for llama.cpp",
            "export --merged and convert the folder with llama.cpp's convert_hf_to_gguf.py",
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise EdgetuneError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} embeddings",
            "export --merged instead; the run's tokenizer and model do not match",
        )
    tokens, types = _tokens_and_types(tokenizer, vocab, vocab_size)
    return GgufVocab(
        pre=_pre_tokenizer_name(tokenizer, spec),
        tokens=tokens,
        token_types=types,
        merges=_merges(model.get("merges") or []),
        special_ids=_special_ids(tokenizer),
        add_bos=_adds(tokenizer, tokenizer.bos_token_id, first=True),
        add_eos=_adds(tokenizer, tokenizer.eos_token_id, first=False),
        chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    )


def _backend_spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EdgetuneError(
            "the run's tokenizer has no tokenizer.json (a slow, Python-only tokenizer)",
            "export --merged and convert the folder with llama.cpp's convert_hf_to_gguf.py",
        )
    return json.loads(backend.to_str())


def _uses_byte_level(spec: dict) -> bool:
    return "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) and "ByteLevel" in json.dumps(spec.get("decoder"))


def _pre_tokenizer_name(tokenizer, spec: dict) -> str:
    ids = tokenizer.encode(CHECK_TEXT)
    known = KNOWN_PRE_TOKENIZERS.get(sha256(str(ids).encode()).hexdigest())
    if known is not None:
        return known
    pre = spec.get("pre_tokenizer") or {}
    # GPT-2's own split (ByteLevel with its regex, nothing before it) is llama.cpp's "gpt-2" for any vocabulary.
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and spec.get("normalizer") is None:
        return "gpt-2"
    raise EdgetuneError(
        "the tokenizer's pre-tokenizer is not one llama.cpp knows (its check-text hash is not in edgetune's table)",
        "export --merged and convert the folder with an up-to-date llama.cpp convert_hf_to_gguf.py",
    )


def _tokens_and_types(tokenizer, vocab: dict[str, int], vocab_size: int) -> tuple[list[str], list[int]]:
    reverse = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in reverse:
            # Embedding rows past the tokenizer (vocabularies padded to a multiple of 64 or 128).
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        elif index in added:
            token = reverse[index]
            special = added[index].special or _looks_special(token)
            tokens.append(token)
            types.append(CONTROL if special else USER_DEFINED)
        else:
            tokens.append(reverse[index])
            types.append(NORMAL)
    return tokens, types


def _looks_special(token: str) -> bool:
    # Reference: llama.cpp does_token_look_special: added tokens some models forget to mark as special.
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _merges(merges: list) -> list[str]:
    if not merges or isinstance(merges[0], str):
        return list(merges)
    # tokenizers >= 0.20 stores pairs; GGUF stores "a b", with a space inside a part written as U+0120 + 256.
    return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair) for pair in merges]


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {kind: getattr(tokenizer, f"{kind}_token_id", None) for kind in ("bos", "eos", "unk", "pad")}
    return {kind: int(value) for kind, value in ids.items() if isinstance(value, int)}


def _adds(tokenizer, token_id: int | None, *, first: bool) -> bool:
    """Whether encoding plain text adds this special token (llama.cpp's add_bos/add_eos), found by trying it."""
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0 if first else -1] == token_id
