"""Plan, then train, from Python: what `edgetune plan` and `edgetune train` do, as API calls.

python examples/plan_then_train.py [--model smollm2-135m] [--steps 30] [--output runs/plan-then-train]
"""

import argparse

import edgetune
from edgetune.plan.report import format_plan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m or a model folder")
    parser.add_argument("--data", help="a .txt/.jsonl/.csv file (default: the bundled text)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--output", default="runs/plan-then-train")
    args = parser.parse_args(argv)

    plan = edgetune.plan(args.model, batch_size=4, seq_len=args.seq_len)  # free memory of this machine
    print(format_plan(plan))
    if plan.recommended is None:
        raise SystemExit("nothing fits this machine; see the levers above")

    overrides = [
        f"model.name={args.model}",
        f"train.strategy={plan.recommended}",
        f"train.steps={args.steps}",
        f"data.seq_len={args.seq_len}",
        f"output.dir={args.output}",
    ]
    if args.data:
        overrides.append(f"data.path={args.data}")
    config = edgetune.train_config(overrides=overrides)
    result = edgetune.train(config, on_step=lambda s: print(f"step {s.step}/{s.total_steps}  loss {s.loss:.4f}"))
    print(f"{result.status}: held-out loss {result.val_loss_before:.4f} -> {result.val_loss_after:.4f}")
    print(f"planned {result.planned_peak_bytes / 2**20:.0f} MiB, measured {result.measured_peak_bytes / 2**20:.0f} MiB")
    print(f"adapters in {result.output_dir}")


if __name__ == "__main__":
    main()
