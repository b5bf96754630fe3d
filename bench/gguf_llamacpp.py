"""edgetune's GGUF export in llama.cpp itself: greedy tokens against torch, and llama.cpp's speed.

    .venv/bin/python bench/gguf_llamacpp.py RUN_DIR --llama-simple PATH/TO/llama-simple [--types f16,q8_0]

llama.cpp comes from the llama-cpp-python source distribution on PyPI (its prebuilt wheels need a newer glibc than
Debian 12 has), built with the compilers here; only its `llama-simple` example is needed:

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \\
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF && cmake --build build --target llama-simple

For each type the run is exported with `edgetune export --gguf`, then every prompt is continued greedily for
`--tokens` tokens by llama.cpp (`llama-simple`, greedy sampling) and by torch (the run's base with its adapters,
float32, `generate` with a KV cache), and by torch on the file's own weights as transformers' GGUF loader
dequantizes them (separating what the quantized weights change from what llama.cpp computes). Agreement is
measured on the generated token ids (llama.cpp's text is re-tokenized with the run's tokenizer): identical
continuations, and the mean share of tokens before the first difference. Writes bench/results/gguf_llamacpp.{json,md}.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM  # noqa: E402

from edgetune import api  # noqa: E402

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, there was a",
    "Water boils at a temperature of",
    "The three primary colours are",
)
SPEED = re.compile(r"decoded (\d+) tokens in ([0-9.]+) s, speed: ([0-9.]+) t/s")


def torch_continuations(model, tokenizer, tokens: int) -> tuple[list[list[int]], float]:
    """Greedy continuations of each prompt by torch, and generated tokens per second."""
    results, generated, seconds = [], 0, 0.0
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False
            )
        seconds += time.perf_counter() - started
        results.append(out[0, ids.shape[1] :].tolist())
        generated += len(results[-1])
    return results, generated / seconds


def llamacpp_continuation(binary: Path, gguf: Path, prompt: str, tokens: int) -> tuple[str, float]:
    """llama-simple's greedy continuation of ``prompt`` (its stdout is the prompt, then the generated text)."""
    done = subprocess.run(
        [str(binary), "-m", str(gguf), "-n", str(tokens), prompt], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"llama-simple failed: {done.stderr[-500:]}")
    speed = SPEED.search(done.stderr)
    text = done.stdout.rstrip("\n")
    return text[len(prompt) :] if text.startswith(prompt) else text, float(speed.group(3)) if speed else float("nan")


def agreement(reference: list[int], other: list[int]) -> float:
    """Share of ``reference`` tokens before the first difference."""
    same = 0
    for a, b in zip(reference, other, strict=False):
        if a != b:
            break
        same += 1
    return same / max(len(reference), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--llama-simple", required=True, type=Path)
    parser.add_argument("--types", default="f16,q8_0")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    chat = api.open_chat(args.run_dir, device="cpu")
    reference, torch_speed = torch_continuations(chat.model, chat.tokenizer, args.tokens)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgetune-gguf-") as scratch:
        for gguf_type in args.types.split(","):
            gguf = Path(scratch) / gguf_type / "model.gguf"
            api.export(args.run_dir, gguf_path=gguf, gguf_type=gguf_type)
            # The same file's weights dequantized by transformers' GGUF loader, run by torch in float32: what
            # llama.cpp should produce if the file is right, apart from its own arithmetic.
            own = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
            own_reference, _ = torch_continuations(own, chat.tokenizer, args.tokens)
            shares, own_shares, identical, speeds = [], [], 0, []
            for prompt, expected, own_expected in zip(PROMPTS, reference, own_reference, strict=True):
                text, speed = llamacpp_continuation(args.llama_simple, gguf, prompt, args.tokens)
                ids = chat.tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
                prompt_ids = chat.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                produced = ids[len(prompt_ids) : len(prompt_ids) + len(expected)]
                shares.append(agreement(expected, produced))
                own_shares.append(agreement(own_expected, produced))
                identical += produced == expected
                speeds.append(speed)
            rows.append(
                {
                    "type": gguf_type,
                    "size_bytes": gguf.stat().st_size,
                    "identical_continuations": identical,
                    "prompts": len(PROMPTS),
                    "mean_agreeing_share": sum(shares) / len(shares),
                    "agreeing_share_by_prompt": dict(zip(PROMPTS, shares, strict=True)),
                    "agreeing_share_with_own_weights": sum(own_shares) / len(own_shares),
                    "llamacpp_tokens_per_second": sum(speeds) / len(speeds),
                }
            )
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "run_dir": args.run_dir,
        "tokens": args.tokens,
        "torch_tokens_per_second": torch_speed,
        "threads_torch": torch.get_num_threads(),
        "rows": rows,
    }
    out = ROOT / "bench" / "results"
    (out / "gguf_llamacpp.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gguf_llamacpp.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [
        "# GGUF in llama.cpp",
        "",
        f"Produced by `python bench/gguf_llamacpp.py RUN_DIR --llama-simple build/bin/llama-simple` "
        f"({result['date']}), {len(PROMPTS)} prompts, {result['tokens']} greedy tokens each; "
        f"torch (float32 base + adapters, KV cache, {result['threads_torch']} threads): "
        f"{result['torch_tokens_per_second']:.1f} tokens/s.",
        "",
        "| type | MiB | identical continuations | tokens agreeing before the first difference | same, against torch on "
        "the file's own dequantized weights | llama.cpp tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['type']} | {row['size_bytes'] / 2**20:.0f} | {row['identical_continuations']} / {row['prompts']} "
            f"| {100 * row['mean_agreeing_share']:.0f}% | {100 * row['agreeing_share_with_own_weights']:.0f}% "
            f"| {row['llamacpp_tokens_per_second']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
