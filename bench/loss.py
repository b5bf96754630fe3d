"""The chunked loss against transformers' own: step time and peak memory, and the planner's bytes per chunk logit.

    .venv/bin/python bench/loss.py [--sections speed,memory] [--steps 8]

speed: SmolLM2-135M with LoRA r=16 (fp32 on this CPU; see bench/packing.py for why), batch 4 x 256 of the bundled
text (every position labelled) and of packed chat rows (about a third labelled), one forward and backward per
step, ``model(**batch).loss`` and ``causal_lm_loss`` interleaved after a warm-up step each; medians, and the peak
of new allocations in each step (MemoryProbe).
memory: the chunked loss alone on random tensors (8,000 entries, 600 positions, chunks of 16-256, fp32 and bf16,
with and without grad, head frozen or trained): bytes per chunk logit at its peak, the figures
``edgetune.plan.calibration.CHUNK_LOGIT_BYTES`` holds.

Writes bench/results/loss.json and bench/results/loss.md. Run it alone on the machine.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "20000")  # see bench/optimizers.py

import torch  # noqa: E402

from edgetune.plan.sources import resolve_model  # noqa: E402
from edgetune.train.batching import batches, pad_token_id  # noqa: E402
from edgetune.train.chunked_loss import _ChunkedCrossEntropy, causal_lm_loss, loss_sum  # noqa: E402
from edgetune.train.data import DataConfig, load_dataset  # noqa: E402
from edgetune.train.loading import LoraSettings, load_model, load_tokenizer  # noqa: E402
from edgetune.train.memory import MemoryProbe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CHAT = ROOT / "examples" / "data" / "chatterbot-chat.jsonl"


def speed(steps: int) -> dict:
    source = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(source)
    torch.manual_seed(0)
    model = load_model(source, "fp32", lora=LoraSettings(rank=16, alpha=32.0))
    losses = {"transformers": lambda batch: model(**batch).loss, "chunked": lambda batch: causal_lm_loss(model, batch)}
    out = {}
    for data_name, path in (("text", None), ("packed chat", str(CHAT))):
        data = load_dataset(DataConfig(path=path, seq_len=256), tokenizer)
        stream = batches(data.train, 4, pad_token_id(tokenizer), shuffle=True, seed=0)
        times = {name: [] for name in losses}
        peaks = {name: [] for name in losses}
        values = {name: [] for name in losses}
        for step in range(steps + 1):
            batch = next(stream)
            for name, loss_of in losses.items():
                with MemoryProbe("cpu") as probe:
                    start = time.perf_counter()
                    loss = loss_of(batch)
                    loss.backward()
                    elapsed = time.perf_counter() - start
                model.zero_grad(set_to_none=True)
                if step:
                    times[name].append(elapsed)
                    peaks[name].append(probe.report.peak_allocated_bytes)
                    values[name].append(float(loss.detach()))
        labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in [batch])
        out[data_name] = {
            name: {
                "step_s_median": statistics.median(times[name]),
                "step_s": times[name],
                "peak_bytes_max": max(peaks[name]),
                "losses": values[name],
            }
            for name in losses
        }
        out[data_name]["ratio_step_s"] = (
            out[data_name]["chunked"]["step_s_median"] / out[data_name]["transformers"]["step_s_median"]
        )
        out[data_name]["labelled_positions_last_batch"] = labelled
    return out


def memory() -> list[dict]:
    rows = []
    vocab, width, n = 8000, 64, 600
    for dtype in (torch.float32, torch.bfloat16):
        for mode in ("forward", "frozen head", "trained head"):
            for chunk in (16, 64, 256):
                torch.manual_seed(0)
                hidden = torch.randn(n, width, dtype=dtype, requires_grad=mode != "forward")
                weight = torch.randn(vocab, width, dtype=dtype, requires_grad=mode == "trained head")
                targets = torch.randint(0, vocab, (n,))
                with MemoryProbe("cpu") as probe:
                    if mode == "forward":
                        loss_sum(hidden.detach(), weight.detach(), targets, chunk)
                    else:
                        _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk)
                # Buffers that do not scale with the chunk: the hidden states' gradient and the head's fp32 one.
                fixed = 0 if mode == "forward" else n * width * hidden.element_size()
                fixed += vocab * width * 4 if mode == "trained head" else 0
                per_logit = (probe.report.peak_allocated_bytes - fixed) / (chunk * vocab)
                rows.append(
                    {"dtype": str(dtype).split(".")[1], "pass": mode, "chunk": chunk, "bytes_per_logit": per_logit}
                )
    return rows


def render(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Chunked loss vs transformers' loss",
        "",
        f"`{meta['command']}` on {meta['date']}; {meta['machine']}, {meta['threads']} threads.",
        "",
    ]
    if "speed" in results:
        lines += [
            "## Step time and peak (SmolLM2-135M, LoRA r=16, fp32, batch 4 x 256, forward + backward)",
            "",
            "| data | loss | step (s, median) | peak of new allocations (MiB) |",
            "|---|---|---|---|",
        ]
        for data_name, row in results["speed"].items():
            for name in ("transformers", "chunked"):
                r = row[name]
                lines.append(f"| {data_name} | {name} | {r['step_s_median']:.2f} | {r['peak_bytes_max'] / 2**20:.0f} |")
        lines.append("")
        for data_name, row in results["speed"].items():
            lines.append(f"- {data_name}: chunked / transformers step time {row['ratio_step_s']:.3f}x.")
        lines.append("")
    if "memory" in results:
        lines += ["## Bytes per chunk logit at the peak (the planner's CHUNK_LOGIT_BYTES)", ""]
        lines += ["| dtype | pass | chunk 16 | chunk 64 | chunk 256 |", "|---|---|---|---|---|"]
        table: dict = {}
        for r in results["memory"]:
            table.setdefault((r["dtype"], r["pass"]), {})[r["chunk"]] = r["bytes_per_logit"]
        for (dtype, mode), by_chunk in table.items():
            lines.append(f"| {dtype} | {mode} | " + " | ".join(f"{by_chunk[c]:.2f}" for c in (16, 64, 256)) + " |")
        lines += [
            "",
            "The figure does not depend on the chunk size; `edgetune.plan.calibration.CHUNK_LOGIT_BYTES` holds it.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="speed,memory")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    path = RESULTS / "loss.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["meta"] = {
        "date": datetime.date.today().isoformat(),
        "command": "python bench/loss.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
    }
    sections = args.sections.split(",")
    if "memory" in sections:
        results["memory"] = memory()
    if "speed" in sections:
        results["speed"] = speed(args.steps)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "loss.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
