"""Measure the real peak memory of one training step for every strategy, the ground truth for the planner.

For each (model, strategy, batch, sequence) the model is loaded the way the strategy trains it, one step is
taken to create the optimizer state, and the second step runs inside a MemoryProbe. The measured peak is the
resident bytes before the step (weights, quantization state, adapters, optimizer state) plus the step's
peak of newly allocated tensor bytes: on CPU, the figure comparable with CUDA's max_memory_allocated.

    .venv/bin/python bench/planner_measure.py            # tiny model + SmolLM2-135M, two shapes each
    .venv/bin/python bench/planner_measure.py --quick    # tiny model only

Writes bench/results/planner_measured.json.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgetune.plan.sources import resolve_model  # noqa: E402
from edgetune.plan.strategies import STRATEGIES  # noqa: E402
from edgetune.train.batching import batches, pad_token_id  # noqa: E402
from edgetune.train.data import DataConfig, load_dataset  # noqa: E402
from edgetune.train.loading import LoraSettings, load_model, load_tokenizer  # noqa: E402
from edgetune.train.memory import MemoryProbe, resident_bytes  # noqa: E402
from edgetune.train.step import make_optimizer, run_step  # noqa: E402

LORA_RANK = 16
SHAPES = {"tiny": [(2, 64), (4, 128)], "smollm2-135m": [(2, 128), (4, 256)]}


def tiny_model_dir() -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer (vocab 49,152), so the logits term is realistic."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(tempfile.mkdtemp(prefix="edgetune-tiny-"))
    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def measure(model_name: str, source_path: str, strategy_name: str, batch_size: int, seq_len: int) -> dict:
    strategy = STRATEGIES[strategy_name]
    source = resolve_model(source_path)
    tokenizer = load_tokenizer(source)
    data = load_dataset(DataConfig(seq_len=seq_len), tokenizer)
    lora = LoraSettings(rank=LORA_RANK, alpha=2 * LORA_RANK) if strategy.lora else None
    model = load_model(source, strategy.base, lora=lora, gradient_checkpointing=strategy.checkpointing)
    optimizer = make_optimizer(strategy, model)
    stream = batches(data.train, batch_size, pad_token_id(tokenizer), shuffle=True, seed=0)
    run_step(strategy, model, optimizer, [next(stream)])
    batch = next(stream)
    resident = resident_bytes(model, optimizer)
    started = time.perf_counter()
    with MemoryProbe("cpu") as probe:
        run_step(strategy, model, optimizer, [batch])
    report = probe.report
    return {
        "model": model_name,
        "strategy": strategy_name,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lora_rank": LORA_RANK if strategy.lora else 0,
        "resident_bytes": resident,
        "step_peak_bytes": report.peak_allocated_bytes,
        "measured_peak_bytes": resident + report.peak_allocated_bytes,
        "peak_rss_bytes": report.peak_rss_bytes,
        "step_seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "planner_measured.json"))
    args = parser.parse_args()
    models = {"tiny": str(tiny_model_dir())}
    if not args.quick:
        models["smollm2-135m"] = "smollm2-135m"
    rows = []
    for model_name, path in models.items():
        for batch_size, seq_len in SHAPES[model_name]:
            for strategy_name in STRATEGIES:
                rows.append(measure(model_name, path, strategy_name, batch_size, seq_len))
                print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": "python bench/planner_measure.py" + (" --quick" if args.quick else ""),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
