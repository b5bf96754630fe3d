"""Export benchmark: `edgetune export` of a SmolLM2-135M run to a merged folder and ONNX, every check's figures,
and ONNX generation speed with and without the KV cache.

    .venv/bin/python bench/export.py RUN_DIR [RUN_DIR ...]
    OMP_NUM_THREADS=1 .venv/bin/python bench/export.py --speed        # ms/token, SmolLM2-135M, 64 tokens

`--speed` exports the bundled SmolLM2-135M (no run needed: speed does not depend on the weights' values) with its
KV cache to a scratch folder, quantizes it to int8, and times greedy generation of `SPEED_TOKENS` tokens after
GREEDY_PROMPT four ways, one after the other in one process with the same thread count: onnxruntime rerunning the
whole sequence each token (the graph fed an empty past, which costs what the graph without a cache did),
onnxruntime with the cache in float32 and in int8, and torch's `generate` with its cache. It keeps the run tables
already in export.json and replaces only the speed section (and the other way round).

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
SPEED_TOKENS = 64


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
        "graph; ms/token: onnxruntime greedy decoding in the export's check ("
        + (
            "with the KV cache)." if all(r["onnx"].get("kv_cache") for r in results["runs"]) else "without a KV cache)."
        ),
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


def measure_speed(scratch: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgetune.export.logit_checks import GREEDY_PROMPT, torch_greedy
    from edgetune.export.onnx_decode import cpu_session, greedy_with_cache, greedy_without_cache
    from edgetune.export.onnx_graph import trace_and_save
    from edgetune.export.onnx_int8 import quantize_int8
    from edgetune.plan.sources import resolve_model

    folder = resolve_model("smollm2-135m").path
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer(GREEDY_PROMPT)["input_ids"]
    began = time.perf_counter()
    trace_and_save(model, scratch / "model.onnx", external=False)
    export_seconds = time.perf_counter() - began
    began = time.perf_counter()
    int8_matmuls, float_matmuls = quantize_int8(scratch / "model.onnx", scratch / "model.int8.onnx", external=False)
    quantize_seconds = time.perf_counter() - began
    threads = torch.get_num_threads()
    fp32, int8 = (cpu_session(scratch / name, threads) for name in ("model.onnx", "model.int8.onnx"))
    ways = {
        "onnxruntime, no cache (reruns the sequence)": lambda n: greedy_without_cache(fp32, prompt, n),
        "onnxruntime, KV cache, float32": lambda n: greedy_with_cache(fp32, prompt, n).tokens,
        "onnxruntime, KV cache, int8": lambda n: greedy_with_cache(int8, prompt, n).tokens,
        "torch generate, KV cache, float32": lambda n: torch_greedy(model, torch.tensor([prompt]), n),
    }
    rows, reference = [], torch_greedy(model, torch.tensor([prompt]), SPEED_TOKENS)
    for name, generate in ways.items():
        generate(2)  # warm-up: first-run allocations and kernel choices are not per-token cost
        began = time.perf_counter()
        tokens = generate(SPEED_TOKENS)
        seconds = time.perf_counter() - began
        same = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b), len(tokens))
        rows.append({"way": name, "ms_per_token": seconds / SPEED_TOKENS * 1000, "tokens_matching_torch": same})
    checks = logit_checks(model, tokenizer, fp32, int8)
    baseline = rows[0]["ms_per_token"]
    for row in rows:
        row["speedup_over_no_cache"] = baseline / row["ms_per_token"]
    return {
        "model": "smollm2-135m",
        "prompt_tokens": len(prompt),
        "generated_tokens": SPEED_TOKENS,
        "threads": threads,
        "onnx_export_seconds": export_seconds,
        "int8_quantize_seconds": quantize_seconds,
        "int8_matmuls": int8_matmuls,
        "float_matmuls_kept": float_matmuls,
        "sizes_mib": {name: (scratch / name).stat().st_size / 2**20 for name in ("model.onnx", "model.int8.onnx")},
        "rows": rows,
        "logit_checks": checks,
    }


def logit_checks(model, tokenizer, fp32, int8) -> list[dict]:
    """The export's prefill checks on the sample prompts, float32 and int8 graph, against torch float32."""
    from edgetune.export.logit_checks import compare_logits, largest_kept_logit, sample_batch, torch_logits
    from edgetune.export.onnx_decode import prefill_logits
    from edgetune.export.onnx_export import LOGIT_TOLERANCE
    from edgetune.export.onnx_int8 import RELATIVE_LOGIT_BOUND

    batch = sample_batch(tokenizer)
    reference, mask = torch_logits(model, batch), batch["attention_mask"]
    int8_bound = RELATIVE_LOGIT_BOUND * largest_kept_logit(reference, mask)
    rows = []
    for name, session, bound in (("float32", fp32, LOGIT_TOLERANCE), ("int8", int8, int8_bound)):
        logits = torch.from_numpy(prefill_logits(session, batch["input_ids"].numpy(), mask.numpy()))
        rows.append(compare_logits(f"onnxruntime {name} vs torch float32", reference, logits, mask, bound).to_dict())
    return rows


def render_speed(speed: dict) -> str:
    meta = speed["meta"]
    lines = [
        "",
        "## Generation speed: ONNX with and without the KV cache",
        "",
        f"`{meta['command']}` on {meta['machine']}, torch {meta['torch']}, {meta['date']}, load average at start "
        f"{meta['load_start'][0]:.1f}, {speed['threads']} thread(s) for torch and onnxruntime alike. "
        f"{speed['model']}, greedy, {speed['generated_tokens']} tokens after a {speed['prompt_tokens']}-token prompt "
        "(prefill included in the per-token time). Files: float32 "
        f"{speed['sizes_mib']['model.onnx']:.0f} MiB, int8 {speed['sizes_mib']['model.int8.onnx']:.0f} MiB "
        f"({speed['int8_matmuls']} MatMuls int8, {speed['float_matmuls_kept']} MLP down projections kept float32); "
        f"export {speed['onnx_export_seconds']:.0f} s, quantization {speed['int8_quantize_seconds']:.0f} s.",
        "",
        "| way | ms/token | speed-up over no cache | greedy tokens matching torch's |",
        "|---|---|---|---|",
    ]
    for row in speed["rows"]:
        lines.append(
            f"| {row['way']} | {row['ms_per_token']:.0f} | {row['speedup_over_no_cache']:.1f}x | "
            f"{row['tokens_matching_torch']} of {speed['generated_tokens']} |"
        )
    lines += ["", "Logits on the sample prompts (the export's checks), against torch float32:", ""]
    lines += [
        f"- {check['name']}: max abs diff {check['max_abs_diff']:.3g} (bound {check['tolerance']:.3g}), mean "
        f"{check['mean_abs_diff']:.3g}, top-1 agreement {check['top1_agreement']:.1%}"
        for check in speed.get("logit_checks", [])
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="*", type=Path)
    parser.add_argument("--speed", action="store_true", help="time ONNX generation with and without the KV cache")
    args = parser.parse_args()
    meta = {
        "command": " ".join(
            [".venv/bin/python", "bench/export.py", *map(str, args.run_dirs)] + ["--speed"] * args.speed
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_start": os.getloadavg(),
    }
    path = RESULTS / "export.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if args.run_dirs:
        results |= {"meta": meta, "runs": []}
        for run_dir in args.run_dirs:
            with tempfile.TemporaryDirectory(prefix="edgetune-export-bench-") as scratch:
                results["runs"].append(export_run(run_dir, Path(scratch)))
    if args.speed:
        with tempfile.TemporaryDirectory(prefix="edgetune-export-speed-") as scratch:
            results["speed"] = measure_speed(Path(scratch)) | {"meta": meta}
    if not (args.run_dirs or args.speed):
        parser.error("give run folders, --speed, or both")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    table = (render(results) if "runs" in results else "# Export benchmark\n") + (
        render_speed(results["speed"]) if "speed" in results else ""
    )
    (RESULTS / "export.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
