"""Export a finished run to ONNX, then generate text with onnxruntime and the tokenizer alone (no torch).

    edgetune train                                     # or any run folder of yours
    python examples/export_onnx.py runs/edgetune --out exports/smollm2.onnx --prompt "Mr. Darcy said"

The export merges the adapters into the dequantized base, traces the float32 model with its KV cache and checks
it in onnxruntime before writing it (`--int8` also writes OUT.int8.onnx). Generation runs the prompt once with an
empty past, then feeds one token and the graph's `present.*` outputs back as `past_key_values.*` each step.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime
from tokenizers import Tokenizer

import edgetune


def generate(session: onnxruntime.InferenceSession, tokenizer: Tokenizer, prompt: str, tokens: int, eos: int | None):
    """Greedy decoding with the KV cache: the most likely next token, ``tokens`` times or until ``eos``."""
    ids = tokenizer.encode(prompt).ids
    outputs = [o.name for o in session.get_outputs()]
    # The prefill's past is empty: [batch, kv_heads, 0, head_dim], sizes read from the graph's inputs.
    past = {
        i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
        for i in session.get_inputs()
        if i.name.startswith("past_key_values.")
    }
    new = list(ids)  # the whole prompt first, then one token a step
    for _ in range(tokens):
        length = len(ids)
        feed = {
            "input_ids": np.array([new], dtype=np.int64),
            "attention_mask": np.ones((1, length), dtype=np.int64),
            "position_ids": np.arange(length - len(new), length, dtype=np.int64)[None],
        }
        results = dict(zip(outputs, session.run(None, feed | past), strict=True))
        past = {
            name.replace("present", "past_key_values"): value for name, value in results.items() if name != "logits"
        }
        next_id = int(results["logits"][0, -1].argmax())
        if next_id == eos:
            break
        ids.append(next_id)
        new = [next_id]
    return tokenizer.decode(ids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="an `edgetune train` output folder")
    parser.add_argument("--out", default="exports/model.onnx")
    parser.add_argument("--prompt", default="It is a truth universally acknowledged, that")
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--int8", action="store_true", help="also write and generate with OUT.int8.onnx")
    args = parser.parse_args(argv)

    exported = edgetune.export(
        args.run_dir, onnx_path=args.out, onnx_int8=args.int8, overwrite=args.overwrite, on_event=print
    ).onnx
    print(f"{exported.path}: {exported.size_bytes / 2**20:.0f} MiB, exported in {exported.export_seconds:.0f} s")

    weights = Path(args.run_dir) / ("adapter" if (Path(args.run_dir) / "adapter").is_dir() else "model")
    tokenizer = Tokenizer.from_file(str(weights / "tokenizer.json"))
    eos_token = json.loads((weights / "tokenizer_config.json").read_text()).get("eos_token")
    for path in [exported.path] + ([exported.int8.path] if exported.int8 else []):
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        began = time.perf_counter()
        text = generate(session, tokenizer, args.prompt, args.tokens, tokenizer.token_to_id(eos_token or ""))
        print(f"onnxruntime, {path.name} ({time.perf_counter() - began:.1f} s): {text}")


if __name__ == "__main__":
    main()
