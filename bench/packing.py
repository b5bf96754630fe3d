"""Packed vs padded batches on the chat example: tokens per second and tokens in the loss per second.

    .venv/bin/python bench/packing.py [--steps 6] [--precision fp32]

Loads ``examples/data/chatterbot-chat.jsonl`` with SmolLM2-135M's own chat template twice (``data.packing`` on and
off, ``seq_len`` 256), then times LoRA (r=16, AdamW) training steps of batch 4 on each, interleaved (packed,
padded, packed, ...) after one warm-up step each, so both see the same machine load. Reports medians. Writes
``bench/results/packing.json`` and ``bench/results/packing.md``.

fp32 by default: on CPUs without native bf16 (this project's build machines), bf16 matmuls are 20-100x slower and
would measure the emulation, not the batches. Run it alone: another torch process on the same cores distorts it.
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
from edgetune.train.data import DataConfig, load_dataset  # noqa: E402
from edgetune.train.loading import LoraSettings, load_model, load_tokenizer  # noqa: E402
from edgetune.train.tokens import IGNORE_INDEX  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DATA = ROOT / "examples" / "data" / "chatterbot-chat.jsonl"
BATCH, SEQ = 4, 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per layout")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args()
    source = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(source)
    layouts = {}
    for packing in (True, False):
        data = load_dataset(DataConfig(path=str(DATA), seq_len=SEQ, packing=packing), tokenizer)
        stream = batches(data.train, BATCH, pad_token_id(tokenizer), shuffle=True, seed=0)
        layouts["packed" if packing else "padded"] = {"data": data, "stream": stream, "times": [], "batches": []}
    torch.manual_seed(0)
    model = load_model(source, args.precision, lora=LoraSettings(rank=16, alpha=32.0), gradient_checkpointing=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for step in range(args.steps + 1):
        for layout in layouts.values():
            batch = next(layout["stream"])
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:  # the first step of each layout warms up allocators and kernels
                layout["times"].append(time.perf_counter() - start)
                layout["batches"].append(batch)
    results = {"meta": _meta(args), "layouts": {name: _summary(layout) for name, layout in layouts.items()}}
    packed, padded = results["layouts"]["packed"], results["layouts"]["padded"]
    results["ratios"] = {
        "tokens_per_s": packed["tokens_per_s"] / padded["tokens_per_s"],
        "loss_tokens_per_s": packed["loss_tokens_per_s"] / padded["loss_tokens_per_s"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "packing.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "packing.md").write_text(render(results))
    print(render(results))


def _summary(layout: dict) -> dict:
    batches_ = layout["batches"]
    tokens = [_real_tokens(b) for b in batches_]
    loss_tokens = [int((b["labels"] != IGNORE_INDEX).sum()) for b in batches_]
    positions = [b["input_ids"].numel() for b in batches_]
    seconds = statistics.median(layout["times"])
    stats = layout["data"].stats
    return {
        "step_s_median": seconds,
        "step_s": layout["times"],
        "tokens_per_step": statistics.mean(tokens),
        "positions_per_step": statistics.mean(positions),
        "loss_tokens_per_step": statistics.mean(loss_tokens),
        "tokens_per_s": sum(tokens) / sum(layout["times"]),
        "loss_tokens_per_s": sum(loss_tokens) / sum(layout["times"]),
        "training_rows": stats.n_train_rows,
        "steps_per_epoch": -(-stats.n_train_rows // BATCH),
    }


def _real_tokens(batch: dict) -> int:
    """Tokens that are not padding: the attention mask's ones, or for packed rows everything but the tail."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    # A packed row's padding is the trailing segment whose ids are all the pad id and whose labels are all -100.
    total = 0
    for ids, positions in zip(batch["input_ids"], batch["position_ids"], strict=True):
        starts = (positions == 0).nonzero().flatten().tolist()
        tail = starts[-1]
        total += len(ids) if tail == 0 or ids[tail:].unique().numel() > 1 else tail
    return total


def _meta(args) -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "command": "python bench/packing.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "model": "smollm2-135m, LoRA r=16 on q/k/v/o/gate/up/down, AdamW, no checkpointing",
        "precision": args.precision,
        "batch": BATCH,
        "seq_len": SEQ,
        "data": str(DATA.relative_to(ROOT)),
        "timed_steps": args.steps,
    }


def render(results: dict) -> str:
    meta, rows = results["meta"], results["layouts"]
    lines = [
        "# Packed vs padded batches (chat example)",
        "",
        f"`{meta['command']}` on {meta['date']}; {meta['machine']}, {meta['threads']} threads; {meta['model']}, "
        f"{meta['precision']}, batch {meta['batch']}, seq_len {meta['seq_len']}, data `{meta['data']}`; medians of "
        f"{meta['timed_steps']} interleaved steps after one warm-up step each.",
        "",
        "| layout | step (s) | positions / step | tokens / step | loss tokens / step | tokens / s | loss tokens / s "
        "| training rows | steps / epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['step_s_median']:.2f} | {r['positions_per_step']:.0f} | {r['tokens_per_step']:.0f} | "
            f"{r['loss_tokens_per_step']:.0f} | {r['tokens_per_s']:.0f} | {r['loss_tokens_per_s']:.0f} | "
            f"{r['training_rows']:,} | {r['steps_per_epoch']:,} |"
        )
    ratios = results["ratios"]
    lines += [
        "",
        f"Packed / padded: {ratios['tokens_per_s']:.2f}x the tokens per second and {ratios['loss_tokens_per_s']:.2f}x "
        "the loss tokens per second, measured side by side in this run.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
