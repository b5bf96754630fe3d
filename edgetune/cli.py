"""``edgetune`` command line: a thin layer that parses arguments, calls the API and formats results.

Errors a user can fix are printed as one line and exit with code 2; ``--debug`` shows the traceback instead.
"""

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence

from edgetune import __version__
from edgetune.cli_output import TrainProgress, export_summary, train_summary
from edgetune.errors import EdgetuneError

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return the process exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return int(exc.code or 0)
    _configure_output(args.debug)
    try:
        return args.handler(args)
    except EdgetuneError as exc:
        if args.debug:
            raise
        print(f"edgetune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("edgetune: interrupted", file=sys.stderr)
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetune", description="Fine-tune language models in the memory of one consumer GPU, edge board or CPU."
    )
    parser.add_argument("--version", action="version", version=f"edgetune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # --debug is accepted before or after the subcommand; SUPPRESS keeps the subcommand from resetting it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _add_devices(commands, common)
    _add_train(commands, common)
    _add_plan(commands, common)
    _add_probe(commands, common)
    _add_export(commands, common)
    return parser


def _add_devices(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    sub = commands.add_parser(
        "devices", parents=[common], help="free memory of this machine's GPUs (or CPU), or the device profiles"
    )
    sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.add_argument("--profiles", action="store_true", help="list the bundled device profiles instead")
    sub.add_argument("--profile", metavar="KEY", help="show one device profile, e.g. rtx-4060-8gb")
    sub.set_defaults(handler=_run_devices)


def _run_devices(args: argparse.Namespace) -> int:
    from edgetune import api

    if args.profiles or args.profile:
        from edgetune.profiles import format_profiles_table

        profiles = [api.device_profile(args.profile)] if args.profile else api.device_profiles()
        _emit(args.json, [p.to_dict() for p in profiles], lambda: format_profiles_table(profiles))
    else:
        from edgetune.device import format_devices_table

        devices = api.devices()
        _emit(args.json, [d.to_dict() for d in devices], lambda: format_devices_table(devices))
    return 0


def _add_train(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from edgetune.config import describe_fields

    keys = "\n".join(f"  {key:<28} {kind:<14} {text}" for key, kind, text in describe_fields())
    sub = commands.add_parser(
        "train",
        parents=[common],
        help="fine-tune: plan, pick a strategy, train with checkpoints, save adapters (no arguments: the default job)",
        description="Fine-tune a model. With no strategy set, `edgetune plan` picks one. With no arguments, "
        "fine-tunes the embedded SmolLM2-135M on the bundled text.",
        epilog=f"config keys (YAML sections, or key=value overrides):\n{keys}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("config", nargs="?", help="a YAML config (see --print-config)")
    sub.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.steps=100 lora.rank=8")
    sub.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    sub.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    sub.add_argument("--force", action="store_true", help="train even if the plan says it will not fit")
    sub.add_argument("--json", action="store_true", help="print the result as JSON")
    sub.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import signal

    from edgetune import api
    from edgetune.trainer import CancelToken

    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path and not config_path.endswith((".yaml", ".yml")):
        config_path, overrides = None, [config_path, *overrides]
    if args.force:
        overrides.append("train.force=true")
    config = api.train_config(config_path, overrides, resume=args.resume)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    cancel = CancelToken()
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        # The first signal asks for a checkpoint at the next step boundary; a second one stops at once.
        signal.signal(signum, lambda *_: cancel.cancel() if not cancel.cancelled else _hard_stop())
    progress = TrainProgress()
    try:
        result = api.train(
            config, resume=args.resume is not None, on_step=progress.update, on_event=progress.message, cancel=cancel
        )
    finally:
        progress.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(train_summary(result))
    return 0 if result.status in ("finished", "cancelled") else 1


def _hard_stop() -> None:
    raise KeyboardInterrupt


def _add_plan(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    sub = commands.add_parser(
        "plan",
        parents=[common],
        help="size every strategy for a model and run shape, say what fits and pick one",
        description="Size every strategy (weights, adapters, gradients, optimizer state, activations, logits, "
        "slack) against the free memory of this machine, a device profile or an explicit budget, and recommend "
        "the fastest-converging strategy that fits: AdaFish, then ScaledAdamW on QLoRA, then HiZOO.",
    )
    sub.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a model folder, a config.json, a hub id")
    sub.add_argument("--batch-size", type=int, default=4)
    sub.add_argument("--seq-len", type=int, default=256)
    sub.add_argument("--lora-rank", type=int, default=16)
    where = sub.add_mutually_exclusive_group()
    where.add_argument("--profile", help="plan for a device profile, e.g. rtx-4060-8gb (see devices --profiles)")
    where.add_argument("--budget", help="plan for this much free memory, e.g. 6GiB")
    sub.add_argument(
        "--budget-device",
        choices=["cuda", "cpu", "unified"],
        default="cuda",
        help="what kind of memory --budget describes (default cuda)",
    )
    sub.add_argument("--json", action="store_true", help="print the plan as JSON (all figures in bytes)")
    sub.set_defaults(handler=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from edgetune import api
    from edgetune.report import format_plan

    result = api.plan(
        args.model,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lora_rank=args.lora_rank,
        profile=args.profile,
        budget=args.budget,
        budget_device=args.budget_device,
        on_event=lambda message: print(message, file=sys.stderr, flush=True),
    )
    for warning in result.warnings:
        print(f"edgetune: warning: {warning}", file=sys.stderr)
    _emit(args.json, result.to_dict(), lambda: format_plan(result))
    return 0


def _add_probe(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from edgetune.probing import ProbeConfig

    defaults = ProbeConfig()
    sub = commands.add_parser(
        "probe",
        parents=[common],
        help="measure real training steps (loss, time, peak memory) of a model on a data set",
        description="Load the model the way edgetune trains it, run a few training steps on real text and "
        "report loss, speed and peak memory. With no arguments: SmolLM2-135M, 4-bit NF4 base, LoRA r=16, "
        "gradient checkpointing, AdamW, on the bundled Pride and Prejudice text.",
    )
    sub.add_argument("--model", default=defaults.model, help="smollm2-135m, a model folder or a cached hub id")
    sub.add_argument("--precision", default=defaults.precision, choices=["fp32", "bf16", "nf4"])
    sub.add_argument("--lora-rank", type=int, default=defaults.lora_rank, help="0 = full fine-tuning")
    sub.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha)
    sub.add_argument("--no-checkpointing", action="store_true", help="keep activations instead of recomputing")
    sub.add_argument("--optimizer", default=defaults.optimizer, choices=["adamw", "none"])
    sub.add_argument("--lr", type=float, default=defaults.lr)
    sub.add_argument("--batch-size", type=int, default=defaults.batch_size)
    sub.add_argument("--seq-len", type=int, default=defaults.seq_len)
    sub.add_argument("--steps", type=int, default=defaults.steps)
    sub.add_argument("--data", default=None, help=".txt, .jsonl or .csv (default: the bundled text)")
    sub.add_argument("--device", default=defaults.device, help="cpu or cuda[:N]")
    sub.add_argument("--seed", type=int, default=defaults.seed)
    sub.add_argument("--json", action="store_true", help="print the result as JSON")
    sub.set_defaults(handler=_run_probe)


def _run_probe(args: argparse.Namespace) -> int:
    from edgetune import api
    from edgetune.probing import ProbeConfig, format_probe

    config = ProbeConfig(
        model=args.model,
        precision=args.precision,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        gradient_checkpointing=not args.no_checkpointing,
        optimizer=args.optimizer,
        lr=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        data=args.data,
        device=args.device,
        seed=args.seed,
    )
    result = api.probe(config, on_event=lambda message: print(message, file=sys.stderr, flush=True))
    _emit(args.json, result.to_dict(), lambda: format_probe(result))
    return 0


def _add_export(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    sub = commands.add_parser(
        "export",
        parents=[common],
        help="merge a run's adapters into a 16-bit model folder and/or export an ONNX file checked by onnxruntime",
        description="Merge the adapters of an `edgetune train` run into a dequantized copy of the base they were "
        "trained on and save a Hugging Face folder (--merged), and/or export that model to ONNX and check it "
        "against torch with onnxruntime (--onnx). Each output is checked numerically before it is written.",
    )
    sub.add_argument("run_dir", metavar="RUN_DIR", help="the output folder of `edgetune train`")
    sub.add_argument("--merged", metavar="OUT_DIR", help="write the merged model here (safetensors, config, tokenizer)")
    sub.add_argument("--onnx", metavar="OUT.onnx", help="write an ONNX graph (input ids, attention mask -> logits)")
    sub.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="merged weights (default bf16)")
    sub.add_argument("--external-data", action="store_true", help="ONNX weights in OUT.onnx.data (automatic >1.5 GiB)")
    sub.add_argument("--overwrite", action="store_true", help="replace existing outputs once the new ones pass")
    sub.add_argument("--json", action="store_true", help="print the result as JSON")
    sub.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from edgetune import api

    result = api.export(
        args.run_dir,
        merged_dir=args.merged,
        onnx_path=args.onnx,
        dtype=args.dtype,
        overwrite=args.overwrite,
        external_data=True if args.external_data else None,
        on_event=lambda message: print(message, file=sys.stderr, flush=True),
    )
    _emit(args.json, result.to_dict(), lambda: export_summary(result))
    return 0


def _emit(as_json: bool, payload: object, table: Callable[[], str]) -> None:
    print(json.dumps(payload, indent=2, default=str) if as_json else table())


def _configure_output(debug: bool) -> None:
    """Keep the terminal to edgetune's own messages unless --debug asks for everything."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr)
    if debug:
        return
    warnings.filterwarnings("ignore")
    noisy_loggers = (
        "transformers",
        "peft",
        "bitsandbytes",
        "accelerate",
        "torch",
        "huggingface_hub",
        "httpx",
        "onnx_ir",
        "onnxscript",
    )
    for noisy in noisy_loggers:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
    except ImportError:
        pass
