"""Measure the real peak memory of one training step for every strategy, the ground truth for the planner.

For each (model, strategy, batch, sequence) the model is loaded the way the strategy trains it, one step is
taken to create the optimizer state, and the second step runs inside a MemoryProbe. The measured peak is the
resident bytes before the step (weights, quantization state, adapters, optimizer state) plus the step's
peak of newly allocated tensor bytes: on CPU, the figure comparable with CUDA's max_memory_allocated. Each row
also records the process's peak RSS during that step (compared with the plan's total, runtime included) and the
loss implementation the step used. Every row runs in a fresh process, as ``edgetune train`` would, so that RSS
holds nothing left over from the rows before it.

    .venv/bin/python bench/planner_measure.py            # tiny model + SmolLM2-135M, two shapes each
    .venv/bin/python bench/planner_measure.py --quick    # tiny model only
    .venv/bin/python bench/planner_measure.py --config bench/results/llama-3.2-1b-config.json --layers 2 \\
        --shapes 4x32,4x64 --strategies hizoo-qlora,scaled-adamw-qlora-gc \\
        --out bench/results/planner_measured_chunked.json

``--config`` measures any Hugging Face config with random weights (``bench/measure_models.py``); ``--layers``
keeps that many decoder layers. Rows are merged into ``--out`` (default bench/results/planner_measured.json):
a row replaces only the row of the same model, strategy, shape and loss, and rows of other runs stay.
"""

import argparse
import json
import multiprocessing
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure_models import model_name, read_config, save_model  # noqa: E402
from edgetune.plan.sources import resolve_model  # noqa: E402
from edgetune.plan.strategies import STRATEGIES  # noqa: E402
from edgetune.train.batching import batches, pad_token_id  # noqa: E402
from edgetune.train.chunked_loss import supports_chunked_loss  # noqa: E402
from edgetune.train.data import DataConfig, load_dataset  # noqa: E402
from edgetune.train.loading import LoraSettings, load_model, load_tokenizer  # noqa: E402
from edgetune.train.memory import MemoryProbe, resident_bytes  # noqa: E402
from edgetune.train.step import make_optimizer, run_step  # noqa: E402

LORA_RANK = 16
SHAPES = {"tiny": [(2, 64), (4, 128)], "smollm2-135m": [(2, 128), (4, 256)]}
ROW_KEY = ("model", "strategy", "batch_size", "seq_len", "loss")


def measure(model_name: str, source_path: str, strategy_name: str, batch_size: int, seq_len: int) -> dict:
    started_row = time.perf_counter()
    strategy = STRATEGIES[strategy_name]
    source = resolve_model(source_path)
    tokenizer = load_tokenizer(source)
    data = load_dataset(DataConfig(seq_len=seq_len), tokenizer)
    lora = LoraSettings(rank=LORA_RANK, alpha=2 * LORA_RANK) if strategy.lora else None
    model = load_model(source, strategy.base, lora=lora, gradient_checkpointing=strategy.checkpointing)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
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
        "loss": "chunked" if supports_chunked_loss(base) else "full",
        "resident_bytes": resident,
        "step_peak_bytes": report.peak_allocated_bytes,
        "measured_peak_bytes": resident + report.peak_allocated_bytes,
        "peak_rss_bytes": report.peak_rss_bytes,
        "start_rss_bytes": report.start_rss_bytes,
        "rss_source": report.rss_source,
        "step_seconds": time.perf_counter() - started,
        "row_seconds": time.perf_counter() - started_row,
    }


def measure_fresh(*args) -> dict:
    """``measure`` in a new process (spawned, so nothing of this one is copied into its RSS)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure, *args).result()


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``4x32,2x64`` -> [(4, 32), (2, 64)] (batch x sequence)."""
    return [(int(b), int(s)) for b, s in (item.lower().split("x") for item in text.split(","))]


def merge(path: Path, run: dict, models: dict[str, dict], rows: list[dict]) -> dict:
    """The file at ``path`` with ``rows`` added: a new row replaces the old row with the same ``ROW_KEY``."""
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    if "runs" not in old:  # the 2026-11 layout: one run's fields at the top, rows measured with the full loss
        meta = {k: old.pop(k) for k in ("command", "machine", "torch", "threads", "date") if k in old}
        old["runs"] = [meta] if meta else []
    keys = {tuple(r.get(k, "full") for k in ROW_KEY) for r in rows}
    kept = [r for r in old["rows"] if tuple(r.get(k, "full") for k in ROW_KEY) not in keys]
    return {
        "runs": old["runs"] + [run],
        "models": {**old.get("models", {}), **models},
        "rows": kept + rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    parser.add_argument("--config", help="a Hugging Face config.json to measure with random weights")
    parser.add_argument("--layers", type=int, help="override num_hidden_layers of the config (or the tiny model)")
    parser.add_argument("--shapes", help="batch x sequence list, e.g. 4x32,2x64 (default: the model's two)")
    parser.add_argument("--strategies", help="comma-separated strategy names (default: all)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "planner_measured.json"))
    args = parser.parse_args()
    strategies = args.strategies.split(",") if args.strategies else list(STRATEGIES)
    unknown = [name for name in strategies if name not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {', '.join(unknown)}; use {', '.join(STRATEGIES)}")
    with tempfile.TemporaryDirectory(prefix="edgetune-measure-") as scratch:
        save_model(read_config(args.config, args.layers), Path(scratch))
        run, configs, rows = measure_all(args, strategies, Path(scratch))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merge(out, run, configs, rows), indent=2) + "\n")


def measure_all(args: argparse.Namespace, strategies: list[str], folder: Path) -> tuple[dict, dict, list[dict]]:
    """Every (model, shape, strategy) row, each in a fresh process; the run's record; the models' configs."""
    name = model_name(args.config, args.layers)
    models = {name: (str(folder), parse_shapes(args.shapes) if args.shapes else SHAPES.get(name, SHAPES["tiny"]))}
    if not (args.quick or args.config or args.layers or args.shapes or args.strategies):
        models["smollm2-135m"] = ("smollm2-135m", SHAPES["smollm2-135m"])
    rows = []
    started = time.perf_counter()
    for model, (path, shapes) in models.items():
        for batch_size, seq_len in shapes:
            for strategy_name in strategies:
                rows.append(measure_fresh(model, path, strategy_name, batch_size, seq_len))
                print(json.dumps(rows[-1]), flush=True)
    run = {
        "command": "python " + " ".join(["bench/planner_measure.py", *sys.argv[1:]]),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - started, 1),
        "rows": len(rows),
    }
    configs = {m: json.loads((resolve_model(path).path / "config.json").read_text()) for m, (path, _) in models.items()}
    return run, configs, rows


if __name__ == "__main__":
    main()
