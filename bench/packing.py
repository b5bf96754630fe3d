"""Packed vs padded batches on the chat example: tokens per second and tokens in the loss per second.

    .venv/bin/python bench/packing.py [--steps 10] [--precision fp32]

Loads ``examples/data/chatterbot-chat.jsonl`` with SmolLM2-135M's own chat template with ``data.packing`` on and
off (``seq_len`` 256), then times LoRA (r=16, AdamW) training steps with the trainer's loss (``causal_lm_loss``) on
three layouts, interleaved (one step of each in turn) after one warm-up step each, so all see the same machine
load: packed rows at batch 4, packed rows at batch 1 (about the positions of a padded batch), and padded examples at
batch 4. Reports medians. Writes
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
from edgetune.train.chunked_loss import causal_lm_loss  # noqa: E402
from edgetune.train.data import DataConfig, load_dataset  # noqa: E402
from edgetune.train.loading import LoraSettings, load_model, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DATA = ROOT / "examples" / "data" / "chatterbot-chat.jsonl"
BATCH, SEQ = 4, 256
# (name, packing, rows per batch): batch 4 either way, and packed rows at batch 1, which holds about as many
# positions per step as a padded batch of 4 chat examples, so per-position costs that grow with the batch cancel.
LAYOUTS = (("packed", True, BATCH), ("packed, batch 1", True, 1), ("padded", False, BATCH))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per layout")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args()
    source = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(source)
    layouts = {}
    for name, packing, batch in LAYOUTS:
        data = load_dataset(DataConfig(path=str(DATA), seq_len=SEQ, packing=packing), tokenizer)
        stream = batches(data.train, batch, pad_token_id(tokenizer), shuffle=True, seed=0)
        layouts[name] = {"data": data, "stream": stream, "times": [], "batches": [], "batch": batch}
    torch.manual_seed(0)
    model = load_model(source, args.precision, lora=LoraSettings(rank=16, alpha=32.0), gradient_checkpointing=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for step in range(args.steps + 1):
        for layout in layouts.values():
            batch = next(layout["stream"])
            start = time.perf_counter()
            causal_lm_loss(model, batch).backward()  # the trainer's loss: labelled positions only, chunked
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:  # the first step of each layout warms up allocators and kernels
                layout["times"].append(time.perf_counter() - start)
                layout["batches"].append(batch)
    results = {"meta": _meta(args), "layouts": {name: _summary(layout) for name, layout in layouts.items()}}
    padded = results["layouts"]["padded"]
    results["ratios"] = {
        name: {
            "tokens_per_s": row["tokens_per_s"] / padded["tokens_per_s"],
            "loss_tokens_per_s": row["loss_tokens_per_s"] / padded["loss_tokens_per_s"],
        }
        for name, row in results["layouts"].items()
        if name != "padded"
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "packing.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "packing.md").write_text(render(results))
    print(render(results))


def _summary(layout: dict) -> dict:
    """Step time measured on sampled batches; tokens per step averaged over the whole epoch.

    The sampled batches' own token counts swing with which examples they drew (a padded batch of four one-line
    answers against one with a 26-turn conversation), so the per-second figures divide the epoch's tokens by its
    steps and by the median step time; the sampled batches' counts are reported beside them.
    """
    batches_ = layout["batches"]
    stats = layout["data"].stats
    steps_per_epoch = -(-stats.n_train_rows // layout["batch"])
    seconds = statistics.median(layout["times"])
    return {
        "step_s_median": seconds,
        "step_s": layout["times"],
        "sampled_positions_per_step": statistics.mean(b["input_ids"].numel() for b in batches_),
        "sampled_tokens_per_step": statistics.mean(_real_tokens(b) for b in batches_),
        "tokens_per_step": stats.n_train_tokens / steps_per_epoch,
        "loss_tokens_per_step": stats.n_loss_tokens / steps_per_epoch,
        "tokens_per_s": stats.n_train_tokens / steps_per_epoch / seconds,
        "loss_tokens_per_s": stats.n_loss_tokens / steps_per_epoch / seconds,
        "batch": layout["batch"],
        "training_rows": stats.n_train_rows,
        "steps_per_epoch": steps_per_epoch,
        "epoch_s": steps_per_epoch * seconds,
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
        f"{meta['precision']}, seq_len {meta['seq_len']}, data `{meta['data']}`; medians of "
        f"{meta['timed_steps']} interleaved steps after one warm-up step each.",
        "",
        "| layout | batch | step (s) | sampled positions / step | tokens / step | loss tokens / step | tokens / s "
        "| loss tokens / s | training rows | steps / epoch | epoch (min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['batch']} | {r['step_s_median']:.2f} | {r['sampled_positions_per_step']:.0f} | "
            f"{r['tokens_per_step']:.0f} | {r['loss_tokens_per_step']:.0f} | {r['tokens_per_s']:.0f} | "
            f"{r['loss_tokens_per_s']:.0f} | {r['training_rows']:,} | {r['steps_per_epoch']:,} | "
            f"{r['epoch_s'] / 60:.1f} |"
        )
    lines.append("")
    for name, ratio in results["ratios"].items():
        lines.append(
            f"- {name} / padded: {ratio['tokens_per_s']:.2f}x the tokens per second, "
            f"{ratio['loss_tokens_per_s']:.2f}x the loss tokens per second."
        )
    lines += [
        "",
        "Measured side by side in this run. Tokens per step are the epoch's averages (training tokens / steps per "
        "epoch); step times are medians of the sampled steps.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
