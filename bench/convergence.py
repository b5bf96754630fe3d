"""Convergence benchmark on SmolLM2-135M: held-out loss against steps, forward passes and seconds, per optimizer.

    python bench/convergence.py --plan                                  # the default runs and their estimated time
    python bench/convergence.py --task text --optimizer adamw           # one part: a task x an optimizer x lrs x seeds
    python bench/convergence.py --task text --optimizer adamw --lrs 1e-4,3e-4 --seeds 0
    python bench/convergence.py --task sentiment --optimizer adafish --variant identity
    python bench/convergence.py --report                                # only rewrite the markdown
    python bench/convergence.py --ladder        # only rewrite edgetune/plan/measured_convergence.py (the planner's)

A run is (task, optimizer[/variant], lr, seed). The seed sets the LoRA initialisation, the batch order and the
zeroth-order perturbations; the held-out sets are fixed (bench/convergence_tasks.py). Every run starts from the fp32
base with fresh LoRA r=8, alpha 16 on all seven linears of each layer, and trains at a constant lr (the variants
"linear" and "cosine" decay it to 0 by edgetune train's own schedule instead, what a user's run does). Backprop runs
take ``--steps`` steps of batch 4 and evaluate at step 0 and every ``--eval-every`` steps; zeroth-order runs (forward
only, eval mode, no grad) spend ``--forwards`` forward passes (MeZO 2 a step, HiZOO 3, FZOO directions + 1) and
evaluate every ``--zo-eval-every`` forwards. Training seconds exclude the evaluations.

Each run is stored in bench/results/convergence.json under task/optimizer/variant/lr/seed as soon as it ends (a rerun
replaces it, an interrupted part keeps what finished), then bench/results/convergence.md is rebuilt from all stored
runs (bench/convergence_report.py). Runs of several optimizers in one command are interleaved (A, B, A, B, ...), so
their step times see the same machine load.

Time (smoke runs at 1 thread on the 2-core machine under another benchmark's load; bench/README.md has the details): a
backprop run takes about 10 min on text, 8 on instruct and 5 on sentiment, a zeroth-order run about 15 min; a part
(3 rates x 3 seeds) 9 times that. ``--plan`` prints the estimate for a selection, from stored runs' timings when there
are some, else from ``REFERENCE_S``.
"""

import argparse
import dataclasses
import datetime
import json
import logging
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# libgomp's long spin stalls every op on a shared machine (bench/optimizers.py); set before torch loads libgomp.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # edgetune from this checkout, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when imported by the tests

import convergence_ladder as ladder  # noqa: E402
import convergence_optimizers as optimizers  # noqa: E402
import convergence_report as report  # noqa: E402
import convergence_tasks as tasks  # noqa: E402
import torch  # noqa: E402
from convergence_optimizers import OPTIMIZERS, SCHEDULES, VARIANTS, Options, trainable  # noqa: E402
from convergence_runs import Budget, train_backprop, train_zeroth_order  # noqa: E402

from edgetune.plan.sources import resolve_model  # noqa: E402
from edgetune.train.loading import LoraSettings, load_model, load_tokenizer  # noqa: E402
from edgetune.train.schedule import make_scheduler  # noqa: E402

logger = logging.getLogger("bench.convergence")
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
MEASURED_MODULE = ROOT / "edgetune" / "plan" / "measured_convergence.py"  # what the planner's ladder quotes
LORA = LoraSettings(rank=8, alpha=16.0)  # the default targets: q, k, v, o, gate, up, down
LOAD_S = 5.0  # loading the model and attaching fresh adapters, per run
ZERO_ORDER_TASKS = ("sentiment",)  # where the zeroth-order optimizers run unless --task names others
# Seconds measured by the smoke runs (1 thread, 2-core machine under another benchmark's load, bench/README.md): a
# backprop step, a forward pass of a zeroth-order step, one held-out evaluation. --plan prefers stored runs' timings.
REFERENCE_S = {
    "text": {"step": 4.2, "forward": 1.6, "eval": 14.0},
    "instruct": {"step": 3.7, "forward": 1.4, "eval": 12.0},
    "sentiment": {"step": 1.6, "forward": 0.8, "eval": 11.0},
}
PART_WARN_S = 50 * 60  # a part longer than this is better run seed by seed


@dataclass(frozen=True)
class Run:
    """One run's identity: its key in the results, and how its optimizer is built."""

    task: str
    optimizer: str
    variant: str
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.task}/{self.optimizer}/{self.variant}/{self.lr:g}/{self.seed}"

    @property
    def options(self) -> Options:
        return optimizers.options(self.optimizer, self.variant)

    @property
    def forwards_per_step(self) -> int | None:
        return optimizers.forwards_per_step(self.optimizer, self.variant)

    @property
    def schedule(self) -> str:
        return self.variant if self.variant in SCHEDULES else "constant"


def execute(run: Run, source: Any, task: tasks.Task, budget: Budget, cmd: str) -> dict[str, Any]:
    """Train one run from a fresh model (LoRA initialised from the run's seed) and return its record."""
    load = os.getloadavg()
    torch.manual_seed(run.seed)
    model = load_model(source, "fp32", lora=LORA)
    optimizer = OPTIMIZERS[run.optimizer].build(model, run.lr, run.seed, run.options)
    steps = budget.steps if run.forwards_per_step is None else budget.forwards // run.forwards_per_step
    scheduler = None
    if run.schedule != "constant":  # edgetune train's own schedule (no warmup, its default): what a user's run does
        scheduler = make_scheduler(optimizer, run.schedule, warmup_steps=0, total_steps=steps)
    if run.forwards_per_step is None:
        record = train_backprop(model, optimizer, task, run.seed, budget, scheduler)
    else:
        record = train_zeroth_order(model, optimizer, task, run.seed, budget, steps, scheduler)
        record["forward_budget"] = budget.forwards
        if record["forwards_per_step"] != run.forwards_per_step:
            logger.warning(
                "%s: %s forwards a step, not %d", run.key, record["forwards_per_step"], run.forwards_per_step
            )
    step_s = record["step_s"]
    record.update(
        task=run.task,
        optimizer=run.optimizer,
        variant=run.variant,
        options=run.options,
        schedule=run.schedule,
        lr=run.lr,
        last_lr=optimizer.param_groups[0]["lr"],  # the rate after the last step: 0 under a decaying schedule
        seed=run.seed,
        kind="backprop" if run.forwards_per_step is None else "zeroth-order",
        batch_size=budget.batch_size,
        steps=len(step_s),
        forwards=record["curve"][-1]["forwards"],
        median_step_s=statistics.median(step_s) if step_s else 0.0,
        train_s=sum(step_s),
        trainable_params=sum(p.numel() for p in trainable(model)),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        env={k: os.environ.get(k, "unset") for k in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")},
        load_average={"start": load, "end": os.getloadavg()},
        model=source.name,
        machine=report.machine(),
        date=now(),
        command=cmd,
    )
    return record


def select(args: argparse.Namespace) -> list[Run]:
    """The runs the arguments ask for, interleaved across parts (A, B, A, B, ...), seed by seed.

    Raises:
        ValueError: an unknown task, optimizer or variant.
    """
    names, requested = split(args.optimizer), split(args.variant) or ["default"]
    for name in names:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
    parts: list[list[Run]] = []
    for task in split(args.task) or list(tasks.TASKS):
        if task not in tasks.TASKS:
            raise ValueError(f"unknown task {task!r}; use one of {', '.join(tasks.TASKS)}")
        for name in names or default_optimizers(task):
            # An optimizer without variants runs its default beside another one's variants; a schedule variant
            # applies to every optimizer.
            own = [v for v in requested if v in SCHEDULES] or ["default"]
            variants = requested if name in VARIANTS else own
            for variant in variants:
                optimizers.options(name, variant)  # raises on an unknown variant
            lrs = [float(x) for x in split(args.lrs)] or OPTIMIZERS[name].lrs
            parts += [[Run(task, name, v, lr, seed) for seed in args.seeds for lr in lrs] for v in variants]
    if unused := set(requested) - {part[0].variant for part in parts if part}:
        known = "; ".join(f"{name}: {', '.join(table)}" for name, table in VARIANTS.items())
        raise ValueError(f"no selected optimizer has the variant(s) {sorted(unused)} ({known})")
    longest = max((len(part) for part in parts), default=0)
    return [part[i] for i in range(longest) for part in parts if i < len(part)]


def default_optimizers(task: str) -> list[str]:
    """Every backprop optimizer, and the zeroth-order ones on ``ZERO_ORDER_TASKS``."""
    return [n for n, m in OPTIMIZERS.items() if m.forwards_per_step is None or task in ZERO_ORDER_TASKS]


def split(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def estimate_s(run: Run, budget: Budget, stored: dict[str, Any]) -> float:
    """Seconds a run should take: stored runs' median timings of the same task and optimizer, else REFERENCE_S."""
    alike = [r for r in stored.values() if r["task"] == run.task and r["optimizer"] == run.optimizer]
    timing = dict(REFERENCE_S[run.task])
    if alike:
        per_forward = [r["median_step_s"] / r["forwards_per_step"] for r in alike]
        timing.update(step=statistics.median(r["median_step_s"] for r in alike), forward=statistics.median(per_forward))
        timing["eval"] = statistics.median(p["eval_s"] for r in alike for p in r["curve"])
    if run.forwards_per_step is None:
        train, evals = budget.steps * timing["step"], budget.steps // budget.eval_every + 1
    else:
        train, evals = budget.forwards * timing["forward"], budget.forwards // budget.zo_eval_every + 1
    return LOAD_S + train + evals * timing["eval"]


def plan_text(runs: list[Run], budget: Budget, stored: dict[str, Any]) -> str:
    """The runs in order with their estimated minutes, then each part's total and the grand total."""
    lines, parts = [], {}
    for run in runs:
        seconds = estimate_s(run, budget, stored)
        part = f"{run.task} x {run.optimizer}" + ("" if run.variant == "default" else f"/{run.variant}")
        parts[part] = parts.get(part, 0.0) + seconds
        length = f"{budget.steps} steps" if run.forwards_per_step is None else f"{budget.forwards} forwards"
        lines.append(f"{run.key:<45} {length:>15} {seconds / 60:6.1f} min")
    lines += ["", "parts:"]
    for part, seconds in parts.items():
        split_up = "  (over 50 min: run it seed by seed, --seeds 0 then 1 then 2)" if seconds > PART_WARN_S else ""
        lines.append(f"  {part:<40} {seconds / 60:6.1f} min{split_up}")
    basis = "stored runs' timings where there are some, else REFERENCE_S (1 thread, loaded machine)"
    lines.append(f"total: {len(runs)} runs, {sum(parts.values()) / 3600:.1f} h from {basis}")
    return "\n".join(lines)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command(argv: list[str] | None) -> str:
    return " ".join(["python", "bench/convergence.py", *(sys.argv[1:] if argv is None else argv)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--task", help=f"comma-separated tasks of {tasks.TASKS} (default: all)")
    add("--optimizer", help=f"comma-separated of {tuple(OPTIMIZERS)} (default: backprop ones; ZO on sentiment)")
    own = ", ".join(f"{k}: {list(v)}" for k, v in VARIANTS.items())
    add("--variant", help=f"comma-separated variants ({own}; every optimizer: {list(SCHEDULES)})")
    add("--lrs", help="comma-separated learning rates (default: each optimizer's grid)")
    add("--seeds", type=lambda v: [int(x) for x in split(v)], default=[0, 1, 2], help="comma-separated (0,1,2)")
    add("--steps", type=int, default=Budget.steps, help="backprop steps per run")
    add("--eval-every", type=int, default=Budget.eval_every, help="backprop steps between evaluations")
    add("--forwards", type=int, default=Budget.forwards, help="forward passes per zeroth-order run")
    add("--zo-eval-every", type=int, default=Budget.zo_eval_every, help="forward passes between evaluations")
    add("--batch-size", type=int, default=Budget.batch_size)
    add("--held-out", type=int, help=f"held-out examples of every task (default: {tasks.HELD_OUT})")
    add("--model", default="smollm2-135m", help="the model (default: the bundled SmolLM2-135M)")
    add("--out", type=Path, default=RESULTS, help="folder of convergence.json and convergence.md")
    add("--plan", "--dry-run", action="store_true", help="print the runs and their estimated time; run nothing")
    add("--report", action="store_true", help="only rewrite the markdown from the stored runs")
    add("--ladder", action="store_true", help=f"only rewrite {MEASURED_MODULE.relative_to(ROOT)} from the stored runs")
    return parser.parse_args(argv)


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}, "tasks": {}}


def write(results: dict[str, Any], out: Path) -> None:
    """The JSON (with the per-task summary the planner quotes) and the markdown, from all stored runs."""
    results["summary"] = report.summarize(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "convergence.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "convergence.md").write_text(report.render(results))


def main(argv: list[str] | None = None) -> int:
    """Run the selected runs, storing each as it ends; or only plan, or only report."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = load_results(args.out / "convergence.json")
    if args.report:
        write(results, args.out)
        return 0
    if args.ladder:
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        MEASURED_MODULE.write_text(ladder.module_source(results, date))
        print(f"wrote {MEASURED_MODULE}; run ruff format on it")
        return 0
    budget = Budget(args.steps, args.eval_every, args.forwards, args.zo_eval_every, args.batch_size)
    try:
        runs = select(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.plan:
        print(plan_text(runs, budget, results["runs"]))
        return 0
    source = resolve_model(args.model)
    tokenizer, loaded, cmd = load_tokenizer(source), {}, command(argv)
    for run in runs:
        if run.task not in loaded:
            loaded[run.task] = tasks.load_task(run.task, tokenizer, args.held_out)
        logger.info("run %s", run.key)
        results["runs"][run.key] = execute(run, source, loaded[run.task], budget, cmd)
        results["tasks"][run.task] = {**loaded[run.task].facts, "model": args.model, "lora": dataclasses.asdict(LORA)}
        results["meta"] = {"machine": report.machine(), "torch": torch.__version__, "last_command": cmd}
        write(results, args.out)  # after every run: an interrupted part keeps what finished
    return 0


if __name__ == "__main__":
    sys.exit(main())
