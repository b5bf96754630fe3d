"""Export a finished run to ONNX, then generate text with onnxruntime and the tokenizer alone (no torch).

    edgetune train                                     # or any run folder of yours
    python examples/export_onnx.py runs/edgetune --out exports/smollm2.onnx --prompt "Mr. Darcy said"

The export merges the adapters into the dequantized base, traces the float32 model and checks it in
onnxruntime before writing it. The graph has no KV cache, so each new token reruns the whole prefix: fine for
short replies, slow for long ones.
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
    """Greedy decoding: the most likely next token, appended, ``tokens`` times or until ``eos``."""
    ids = tokenizer.encode(prompt).ids
    for _ in range(tokens):
        input_ids = np.array([ids], dtype=np.int64)
        logits = session.run(["logits"], {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)})[0]
        next_id = int(logits[0, -1].argmax())
        if next_id == eos:
            break
        ids.append(next_id)
    return tokenizer.decode(ids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="an `edgetune train` output folder")
    parser.add_argument("--out", default="exports/model.onnx")
    parser.add_argument("--prompt", default="It is a truth universally acknowledged, that")
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    result = edgetune.export(args.run_dir, onnx_path=args.out, overwrite=args.overwrite, on_event=print).onnx
    print(f"{result.path}: {result.size_bytes / 2**20:.0f} MiB, exported in {result.export_seconds:.0f} s")

    weights = Path(args.run_dir) / ("adapter" if (Path(args.run_dir) / "adapter").is_dir() else "model")
    tokenizer = Tokenizer.from_file(str(weights / "tokenizer.json"))
    eos_token = json.loads((weights / "tokenizer_config.json").read_text()).get("eos_token")
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    began = time.perf_counter()
    text = generate(session, tokenizer, args.prompt, args.tokens, tokenizer.token_to_id(eos_token or ""))
    print(f"onnxruntime ({time.perf_counter() - began:.1f} s): {text}")


if __name__ == "__main__":
    main()
