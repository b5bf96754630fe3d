"""Export benchmark: `edgetune export` of a SmolLM2-135M run to a merged folder and ONNX, every check's figures.

    .venv/bin/python bench/export.py RUN_DIR [RUN_DIR ...]

Each run folder is exported to a scratch folder (bf16 merged + ONNX, one merge), then to fp16 and fp32 merged
folders; the figures (sizes, times, every logit check) go to bench/results/export.json and export.md. Make the
runs with `edgetune train` first, e.g. the main job (`edgetune train`, an AdaFish run over a bf16 base) and a
QLoRA run (`edgetune train train.strategy=scaled-adamw-qlora-gc train.steps=20 output.dir=runs/qlora`).

Not here yet: GGUF against llama.cpp itself. `edgetune export RUN --gguf` checks the file as transformers reads it
back; the next step is a row per --gguf-type that runs llama.cpp on the same file (llama-cpp-python's
`Llama(model_path, logits_all=True).eval(ids)` on the tokenizer's ids of logit_checks.SAMPLE_TEXTS, or
`llama-perplexity -m OUT.gguf` on a held-out text) and compares those logits, top-1 tokens and perplexity with the
float32 merge, plus tokens/s of `llama-bench -m OUT.gguf`. It needs a llama.cpp build on the benchmark machine.
"""

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import edgetune

RESULTS = Path(__file__).resolve().parent / "results"


def export_run(run_dir: Path, scratch: Path) -> dict:
    began = time.perf_counter()
    both = edgetune.export(run_dir, merged_dir=scratch / "bf16", onnx_path=scratch / "model.onnx")
    row = both.to_dict() | {"wall_seconds_bf16_and_onnx": time.perf_counter() - began, "other_dtypes": {}}
    for dtype in ("fp16", "fp32"):
        merged = edgetune.export(run_dir, merged_dir=scratch / dtype, dtype=dtype).merged
        row["other_dtypes"][dtype] = merged.to_dict()
    return row


def render(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Export benchmark",
        "",
        f"`{meta['command']}` on {meta['machine']}, torch {meta['torch']}, {meta['date']}, load average at start "
        f"{meta['load_start'][0]:.1f}. Logit differences are max |diff| over the sample prompts' kept positions. "
        "Seconds: writing and checking a merged folder (after one shared merge), or tracing and saving the ONNX "
        "graph; ms/token: onnxruntime greedy decoding without a KV cache.",
        "",
        "| run | strategy | output | size MiB | seconds | check | max abs diff | tolerance | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        name = Path(run["run_dir"]).name
        merged_rows = [run["merged"], *run["other_dtypes"].values()]
        for merged in merged_rows:
            for check in merged["checks"]:
                lines.append(
                    f"| {name} | {run['strategy']} | merged {merged['dtype']} | {merged['size_bytes'] / 2**20:.0f} | "
                    f"{merged['seconds']:.1f} | {check['name']} | {check['max_abs_diff']:.3g} | "
                    f"{check['tolerance']:.3g} | {check['top1_agreement']:.3f} |"
                )
        onnx = run["onnx"]
        lines.append(
            f"| {name} | {run['strategy']} | ONNX opset {onnx['opset']} | {onnx['size_bytes'] / 2**20:.0f} | "
            f"{onnx['export_seconds']:.1f} | {onnx['logits']['name']} | {onnx['logits']['max_abs_diff']:.3g} | "
            f"{onnx['logits']['tolerance']:.3g} | {onnx['logits']['top1_agreement']:.3f} |"
        )
        lines.append(
            f"| {name} | {run['strategy']} | ONNX greedy | | {onnx['onnx_seconds_per_token'] * 1000:.0f} ms/token | "
            f"{onnx['greedy_tokens']} greedy tokens | {'identical' if onnx['greedy_identical'] else 'DIFFER'} | | |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    results = {
        "meta": {
            "command": " ".join([".venv/bin/python", "bench/export.py", *map(str, args.run_dirs)]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_start": os.getloadavg(),
        },
        "runs": [],
    }
    for run_dir in args.run_dirs:
        with tempfile.TemporaryDirectory(prefix="edgetune-export-bench-") as scratch:
            results["runs"].append(export_run(run_dir, Path(scratch)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "export.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "export.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
