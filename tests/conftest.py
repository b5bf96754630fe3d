import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today? I am fine, thank you.",
    "It is a truth universally acknowledged, that a single man must be in want of a wife.",
    "user assistant system reply question answer",
]


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A 2-layer Llama small enough that a forward/backward takes milliseconds on CPU."""
    settings = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama folder (config + safetensors, no tokenizer), dims multiples of 64 for NF4 blocks."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    return folder


def make_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer trained here, with ChatML tokens, eos, pad and optionally a bos."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer)
    extra = {}
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))]
        )
        extra["bos_token"] = "<s>"
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<pad>", **extra)
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="session")
def tiny_trainable_dir(tmp_path_factory):
    """A tiny Llama saved with a real (locally trained) tokenizer: a model folder edgetune can train."""
    folder = tmp_path_factory.mktemp("tiny-trainable")
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_train_overrides(model_dir, text, run_dir, steps, *extra) -> list[str]:
    """Config overrides for a seconds-long `edgetune train` of the tiny model on a small text."""
    return [
        f"model.name={model_dir}",
        f"data.path={text}",
        "data.seq_len=32",
        "train.batch_size=2",
        f"train.steps={steps}",
        "train.eval_batches=1",
        "train.device=cpu",
        "train.budget=8GiB",
        f"output.dir={run_dir}",
        *extra,
    ]


WORDS = "the quick brown fox jumps over the lazy dog hello world how are you today I am fine thank you".split()


def write_file(tmp_path: Path, name: str, content: str | bytes) -> str:
    """A data file in tmp_path holding content (text as UTF-8), as a path string."""
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def write_jsonl(tmp_path: Path, rows: list, name: str = "d.jsonl") -> str:
    """Rows written one JSON object per line."""
    return write_file(tmp_path, name, "\n".join(json.dumps(row) for row in rows) + "\n")


def write_tiny_text(path: Path, lines: int = 9) -> Path:
    """About one 32-token block per line for the tiny tokenizer: 9 lines give 7 training and 1 validation example."""
    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(lines)) + "\n")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a busy 2-core machine OpenMP teams turn a 50 ms tiny step into seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_runs(tiny_trainable_dir, tmp_path_factory) -> dict[str, Path]:
    """Finished `edgetune train` runs of the tiny model: LoRA on NF4 and on bf16, and a full-parameter run.

    A high learning rate makes the adapters far from their zero start after three steps, so a merge that drops
    or misplaces them shows in the logits.
    """
    from edgetune import api

    text = write_tiny_text(tmp_path_factory.mktemp("runs-data") / "text.txt")
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for key, strategy, lr in (
        ("nf4", "scaled-adamw-qlora-gc", "1e-2"),
        ("bf16", "adafish-lora", "1e-2"),
        ("full", "mezo-full", "1e-3"),
    ):
        run_dir = tmp_path_factory.mktemp(f"run-{key}") / "run"
        extra = (f"train.strategy={strategy}", f"train.lr={lr}")
        api.train(api.train_config(None, tiny_train_overrides(tiny_trainable_dir, text, run_dir, 3, *extra)))
        runs[key] = run_dir
    torch.set_num_threads(threads)
    return runs
