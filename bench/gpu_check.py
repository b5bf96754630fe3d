"""Planned vs measured memory and speed of every ladder strategy on one GPU: the planner's check on a real device.

    python bench/gpu_check.py                              # one CUDA GPU; starts no case after 7.5 minutes
    python bench/gpu_check.py --dry-run --out /tmp/check   # the same plumbing on the CPU, tiny models

Models: SmolLM2-135M (the bundled default) and a Llama-3.2-1B-shaped model with random bf16 weights (built on the
device and saved to a temporary folder, with SmolLM2's tokenizer). Shapes 4 x 256 and 1 x 1024. Strategies: the
ladder, then whichever of the adamw-lora-gc, hizoo-qlora and mezo-qlora baselines it left out, so a run cut short by
its time budget loses baselines first.
Each case is planned here (``api.plan`` with a 1 TiB budget, so every strategy is sized) and measured in a fresh
process (``api.probe``: real training steps on the bundled text), which gives clean peaks and keeps an OOM or a hang
(each case has a time limit) to its own row.

Measured peak: CUDA ``max_memory_allocated`` (against the planned peak). Measured total: NVML's used memory less what
was in use before the run, i.e. context, allocator cache and library workspaces (against the planned total, which
adds the CUDA context and allocator slack). ``max_memory_reserved`` is set against the planned peak plus slack.
Tokens per second are timed as ``edgetune probe`` times a step, the memory readings at its end included. The first
step is left out when there are more, since it also creates the optimizer state and picks kernels.

``--dry-run`` substitutes the CPU (the CUDA figures are null; the tracked tensor peak and peak RSS stand in), 2-layer
versions of both models, 1 step, shapes 2 x 32 and 1 x 64 and the first 4,000 characters of the text: bf16 matmuls
on a CPU without native bf16 run about 8x slower than fp32, so the real shapes would take minutes per case. A case
then takes about 12 s on a 2-core CPU, mostly starting Python and loading libraries.
``--random-smollm2 --tokenizer DIR`` builds SmolLM2-135M with random weights too, for a machine that cannot fetch the
bundled model (memory and speed do not depend on the weights' values).

Writes OUT/gpu.json and OUT/gpu.md (OUT is --out, default bench/results). Each case's process runs
bench/gpu_check_worker.py; bench/gpu_check_report.py holds the comparisons and the table.
"""

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # edgetune from this checkout, installed or not

from edgetune import api  # noqa: E402
from edgetune.errors import EdgetuneError  # noqa: E402
from edgetune.plan.strategies import LADDER, STRATEGIES  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module, also when this file is imported
from gpu_check_report import MEASURED_PEAK, MEASURED_TOTAL, compared, ratios, render  # noqa: E402

# The rungs the ladder left out that a user still asks for; a strategy already on the ladder is not run twice.
BASELINES = ("adamw-lora-gc", "hizoo-qlora", "mezo-qlora")
LORA_RANK = 16
BUDGET = "1TiB"  # large enough that every strategy is sized, none refused
TEXT = ROOT / "edgetune" / "assets" / "pride_and_prejudice.txt"
DRY_TEXT_CHARS = 4000
MIN_CASE_S = 20  # less than this left of the budget: a fresh process would not get past loading the model
BUILD_TIMEOUT_S = 300
WORKER = Path(__file__).resolve().parent / "gpu_check_worker.py"
SMOLLM2 = "smollm2-135m"
LLAMA_1B = "llama-3.2-1b-random"
# The config fields that shape memory: SmolLM2-135M's config.json, and Llama-3.2-1B's less its rope_scaling (which
# changes no tensor's size), as committed beside the CPU measurements.
CONFIGS = {
    SMOLLM2: dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        max_position_embeddings=8192,
    ),
    # The same random-weight shape bench/planner_measure.py measures on CPU.
    LLAMA_1B: json.loads((Path(__file__).resolve().parent / "results" / "llama-3.2-1b-config.json").read_text()),
}


def shrink(config: dict) -> dict:
    """Two layers of width 64 (NF4 quantizes blocks of 64); the vocabulary stays, so the tokenizer's ids fit."""
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16)
    return config | small | dict(num_key_value_heads=2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models, 1 step: check the plumbing")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for gpu.json and gpu.md")
    parser.add_argument("--models", default=f"{SMOLLM2},{LLAMA_1B}")
    parser.add_argument("--strategies", default=",".join(dict.fromkeys(LADDER + BASELINES)))
    parser.add_argument("--shapes", type=shapes, help="BATCHxSEQ,... (default 4x256,1x1024; dry run 2x32,1x64)")
    parser.add_argument("--steps", type=int, help="steps per case (default 4; dry run 1)")
    parser.add_argument("--budget-s", type=float, default=450, help="stop starting cases after this many seconds")
    parser.add_argument("--case-timeout-s", type=float, default=120, help="time limit of one case's process")
    parser.add_argument("--tokenizer", help="folder with the tokenizer for built models (default: the bundled model)")
    parser.add_argument("--random-smollm2", action="store_true", help="build SmolLM2-135M with random weights")
    args = parser.parse_args(argv)
    args.shapes = args.shapes or shapes("2x32,1x64" if args.dry_run else "4x256,1x1024")
    args.steps = args.steps or (1 if args.dry_run else 4)
    args.models = args.models.split(",")
    args.strategies = args.strategies.split(",")
    for kind, values, known in (("model", args.models, CONFIGS), ("strategy", args.strategies, STRATEGIES)):
        unknown = [value for value in values if value not in known]
        if unknown:
            parser.error(f"unknown {kind} {unknown[0]!r}; use one of {', '.join(known)}")
    return args


def shapes(text: str) -> list[tuple[int, int]]:
    try:
        found = [tuple(int(n) for n in shape.split("x", 1)) for shape in text.split(",")]
    except ValueError:
        found = []
    if not found or any(len(shape) != 2 or min(shape) < 1 for shape in found):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of shapes; write them like 4x256,1x1024")
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="edgetune-gpu-check-"))
    try:
        device_name, idle = f"CPU ({platform.processor() or platform.machine()})", None
        if not args.dry_run:
            device_name, idle = cuda_device()
        rows = run(args, work, started + args.budget_s, idle)
    except EdgetuneError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {"meta": meta(args, argv, device_name, idle, time.monotonic() - started), "rows": rows}
    results["ratios"] = ratios(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "gpu.md").write_text(render(results))
    print(render(results))
    return 0


def cuda_device() -> tuple[str, int | None]:
    """The GPU's name and the memory in use before any case, read from NVML, so this process holds no CUDA context.

    Raises:
        EdgetuneError: no GPU is visible.
    """
    device = api.devices()[0]
    if device.index >= 0:
        return device.name, device.used_bytes
    import torch

    if torch.cuda.is_available():  # a container without NVML: the cases still run, the NVML column stays empty
        return "CUDA device (no NVML)", None
    raise EdgetuneError("no CUDA device is visible", "run on a GPU machine, or pass --dry-run to check on the CPU")


def run(args: argparse.Namespace, work: Path, deadline: float, idle_bytes: int | None) -> list[dict]:
    """Build the models, plan every case here, and measure each in its own process while the time budget lasts."""
    kind = "cpu" if args.dry_run else "cuda"
    models, to_build = model_folders(args, work)
    build = build_models(args, work, to_build, deadline)
    text = None
    if args.dry_run:
        text = work / "text.txt"
        text.write_text(TEXT.read_text()[:DRY_TEXT_CHARS])
    rows = []
    for index, (strategy, model, (batch_size, seq_len)) in enumerate(cases(args)):
        row = {"model": model, "strategy": strategy, "batch_size": batch_size, "seq_len": seq_len}
        row |= planned(models[model], strategy, batch_size, seq_len, kind)
        left_s = min(args.case_timeout_s, deadline - time.monotonic())
        if build["status"] != "ok":
            row |= {"status": "not run", "error": f"no models: {build['status']}: {build['error']}"}
        elif left_s < MIN_CASE_S:
            row |= {"status": "skipped", "error": f"the {args.budget_s:.0f} s time budget ran out"}
        else:
            job = {"kind": "probe", "device": kind, "model_path": models[model], "strategy": strategy}
            job |= {"batch_size": batch_size, "seq_len": seq_len, "lora_rank": LORA_RANK, "steps": args.steps}
            row |= launch(job | {"data": text and str(text)}, work / f"case-{index:02d}", left_s)
        rows.append(row | compared(row, idle_bytes))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "log_tail"}), flush=True)
    return rows


def cases(args: argparse.Namespace) -> list[tuple[str, str, tuple[int, int]]]:
    """Ladder strategies before baselines, so a run cut short by its time budget loses the baselines first."""
    order = [s for s in args.strategies if s in LADDER] + [s for s in args.strategies if s not in LADDER]
    return [(strategy, model, shape) for strategy in order for model in args.models for shape in args.shapes]


def model_folders(args: argparse.Namespace, work: Path) -> tuple[dict[str, str], list[str]]:
    """Each model's folder, and the folders a build process must fill with random weights.

    Their config.json is written here, so planning need not wait for the weights.
    """
    from transformers import AutoConfig

    models, to_build = {}, []
    for model in args.models:
        if model == SMOLLM2 and not args.dry_run and not args.random_smollm2:
            models[model] = str(api.model_source(SMOLLM2).path)  # fails here, in one line, if it cannot be fetched
            continue
        folder = work / model
        AutoConfig.for_model(**(shrink(CONFIGS[model]) if args.dry_run else CONFIGS[model])).save_pretrained(folder)
        models[model] = str(folder)
        to_build.append(str(folder))
    return models, to_build


def build_models(args: argparse.Namespace, work: Path, folders: list[str], deadline: float) -> dict:
    """Random weights and a tokenizer in each folder, made by one process on the device the cases use."""
    if not folders:
        return {"status": "ok"}
    left_s = min(BUILD_TIMEOUT_S, deadline - time.monotonic())
    if left_s < MIN_CASE_S:
        return {"status": "skipped", "error": f"the {args.budget_s:.0f} s time budget ran out"}
    tokenizer = args.tokenizer or str(api.model_source(SMOLLM2).path)
    job = {"kind": "build", "device": "cpu" if args.dry_run else "cuda", "folders": folders, "tokenizer": tokenizer}
    return launch(job, work / "build", left_s)


def planned(model: str, strategy: str, batch_size: int, seq_len: int, kind: str) -> dict:
    """The planner's peak (comparable with max_memory_allocated), its allocator slack and its total.

    The total adds the CUDA context (on the CPU: the Python runtime) and the slack to the peak.
    """
    plan = api.plan(
        model,
        batch_size=batch_size,
        seq_len=seq_len,
        lora_rank=LORA_RANK,
        budget=BUDGET,
        budget_device=kind,
        strategies=(strategy,),
    ).plans[strategy]
    overhead = {component.name: component.bytes for component in plan.overhead}
    return {
        "planned_peak_bytes": plan.estimate.peak_bytes,
        "planned_total_bytes": plan.total_bytes,
        "planned_slack_bytes": overhead["allocator slack"],
        "planned_peak_phase": plan.estimate.peak_phase,
    }


def launch(job: dict, stem: Path, timeout_s: float) -> dict:
    """Run one job in a fresh interpreter; its result, or why there is none (OOM, error, time limit)."""
    stem.with_suffix(".job.json").write_text(json.dumps(job))
    result, log = stem.with_suffix(".result.json"), stem.with_suffix(".log")
    started = time.monotonic()
    command = [sys.executable, str(WORKER), str(stem.with_suffix(".job.json"))]
    with log.open("w") as handle:
        try:
            subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
            outcome = json.loads(result.read_text()) if result.exists() else None
        except subprocess.TimeoutExpired:
            outcome = {"status": "timeout", "error": f"no result within the {timeout_s:.0f} s limit"}
    tail = log.read_text(errors="replace").splitlines()[-20:]
    if outcome is None:  # killed from outside (host OOM killer) or crashed in native code
        outcome = {"status": "error", "error": tail[-1] if tail else "the process died without output"}
    if outcome["status"] != "ok":
        outcome["log_tail"] = tail
    return outcome | {"wall_s": round(time.monotonic() - started, 1)}


def meta(args: argparse.Namespace, argv: list[str] | None, device_name: str, idle: int | None, elapsed: float) -> dict:
    import torch

    command = " ".join(["python bench/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    return {"command": command, "date": datetime.date.today().isoformat(), "dry_run": args.dry_run} | {
        "device": device_name,
        "torch": torch.__version__,
        "lora_rank": LORA_RANK,
        "steps": args.steps,
        "budget_s": args.budget_s,
        "elapsed_s": round(elapsed, 1),
        "nvml_idle_bytes": idle,
        "measured_peak": MEASURED_PEAK[args.dry_run],
        "measured_total": MEASURED_TOTAL[args.dry_run],
    }


if __name__ == "__main__":
    sys.exit(main())
