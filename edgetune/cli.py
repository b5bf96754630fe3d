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
        args, extra = parser.parse_known_args(argv)
        # key=value overrides may follow an option (`train my.yaml --resume RUN train.steps=9`), which argparse
        # does not give back to the positional list; anything else left over is the usage error it is.
        if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = [*args.overrides, *extra]
        elif extra:
            parser.parse_args(argv)
    except _UsageError as exc:
        print(f"edgetune: error: {exc.problem}; see `{exc.prog} --help`", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # argparse exits on --help and --version (0)
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


class _UsageError(Exception):
    def __init__(self, problem: str, prog: str) -> None:
        super().__init__(problem)
        self.problem, self.prog = problem, prog


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``edgetune: error: ...; see ... --help``), not the usage block."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        raise _UsageError(message, self.prog)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="edgetune", description="Fine-tune language models in the memory of one consumer GPU, edge board or CPU."
    )
    parser.add_argument("--version", action="version", version=f"edgetune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # --debug is accepted before or after the subcommand; SUPPRESS keeps the subcommand from resetting it.
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _add_devices(commands, common)
    _add_train(commands, common)
    _add_plan(commands, common)
    _add_probe(commands, common)
    _add_export(commands, common)
    from edgetune.cli_chat import add_chat_commands

    add_chat_commands(commands, common)
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

    if args.profiles or args.profile is not None:
        from edgetune.plan.profiles import format_profiles_table

        profiles = [api.device_profile(args.profile)] if args.profile is not None else api.device_profiles()
        _emit(args.json, [p.to_dict() for p in profiles], lambda: format_profiles_table(profiles))
    else:
        from edgetune.plan.device import format_devices_table

        devices = api.devices()
        _emit(args.json, [d.to_dict() for d in devices], lambda: format_devices_table(devices))
    return 0


def _add_train(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from edgetune.train.config import describe_fields

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
    sub.add_argument("config", nargs="?", help="a YAML config (see --print-config); with --resume, changes to apply")
    sub.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.steps=100 lora.rank=8")
    sub.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    sub.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    sub.add_argument("--force", action="store_true", help="train even if the plan says it will not fit")
    sub.add_argument("--json", action="store_true", help="print the result as JSON")
    sub.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import signal

    from edgetune import api
    from edgetune.train.loop import CancelToken

    config_path, other, overrides = _split_source(args.config, list(args.overrides))
    config_path = config_path or other  # train's first argument is a config file, whatever its suffix
    if args.force:
        overrides.append("train.force=true")
    progress = TrainProgress()
    config = api.train_config(config_path, overrides, resume=args.resume, on_event=progress.message)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    cancel, received = CancelToken(), []
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum, _frame) -> None:
        # The first signal asks for a checkpoint at the next step boundary; a second one stops at once.
        if cancel.cancelled:
            _hard_stop()
        received.append(signum)
        cancel.cancel()

    for signum in previous:
        signal.signal(signum, on_signal)
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
    if received and result.status == "cancelled":
        # The shell convention for a job stopped by a signal (130 Ctrl-C, 143 SIGTERM), so that
        # `edgetune train && edgetune export` does not export a half-trained model.
        return 128 + received[0]
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
        "the first rung of the ladder that fits: AdaFish on LoRA, then ScaledAdamW on QLoRA, then the forward-only "
        "optimizer measured best (each reason quotes bench/results/convergence.md). Reads the same "
        "YAML config as `edgetune train`; without one it plans the run `edgetune train` makes by default.",
    )
    sub.add_argument("source", nargs="?", metavar="CONFIG.yaml|MODEL", help="a train config, or a model to plan")
    sub.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lora.rank=8")
    sub.add_argument(
        "--model", help="smollm2-135m, a model folder, a config.json, a .gguf file, or a hub id (fetches config.json)"
    )
    sub.add_argument("--revision", help="a hub model's branch, tag or commit (default: main)")
    sub.add_argument("--batch-size", type=int, help="sequences per step (default: the config's, 4)")
    sub.add_argument("--seq-len", type=int, help="tokens per sequence (default: the config's, 128)")
    sub.add_argument("--lora-rank", type=int, help="adapter rank (default: the config's, 16)")
    sub.add_argument(
        "--lora-targets", help="comma-separated linear names, or all-linear (default: the config's, every linear)"
    )
    sub.add_argument("--strategies", help="comma-separated strategies to size (default: all of them)")
    _add_run_options(sub)
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


def _add_run_options(sub: argparse.ArgumentParser) -> None:
    """The options that describe a run of your own, or one in another tool (plan/run_options.py)."""
    from edgetune.plan.run_options import METHODS, OPTIMIZERS, REPORTS
    from edgetune.plan.stacks import CHECKPOINTING, LOSS_KINDS, STACKS
    from edgetune.plan.strategies import PLAN_PRECISIONS

    run = sub.add_argument_group("a run of your own (sized instead of edgetune's strategies)")
    run.add_argument("--method", choices=METHODS, help="full, lora, qlora, or inference (weights + KV cache)")
    run.add_argument("--precision", choices=PLAN_PRECISIONS, help="the base weights' precision (default bf16)")
    run.add_argument("--optimizer", choices=list(OPTIMIZERS), help="the optimizer (default adamw)")
    run.add_argument("--checkpointing", choices=CHECKPOINTING, help="gradient checkpointing (default: the stack's)")
    run.add_argument(
        "--stack",
        choices=list(STACKS),
        default="edgetune",
        help="price the run as this tool stores it (default edgetune)",
    )
    run.add_argument("--loss", choices=LOSS_KINDS, help="the loss, when it is not the stack's (e.g. a Liger plugin)")
    run.add_argument("--double-quant", choices=["on", "off"], help="NF4 double quantization (default: the stack's)")
    run.add_argument(
        "--report", choices=REPORTS, default="device", help="the total shown: allocated, reserved or device (default)"
    )


def _run_plan(args: argparse.Namespace) -> int:
    from edgetune import api
    from edgetune.plan.report import format_plan

    config_path, model, overrides = _split_source(args.source, list(args.overrides))
    if model is not None and args.model is not None and model != args.model:
        raise EdgetuneError(f"two models given: {model} and --model {args.model}", "name the model once")
    config = api.train_config(config_path, overrides)
    result = api.plan(
        args.model or model,
        revision=args.revision,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lora_rank=args.lora_rank,
        lora_targets=_names(args.lora_targets, "--lora-targets"),
        strategies=_names(args.strategies, "--strategies"),
        method=args.method,
        precision=args.precision,
        optimizer=args.optimizer,
        checkpointing=args.checkpointing,
        stack=args.stack,
        loss=args.loss,
        report=args.report,
        double_quant=None if args.double_quant is None else args.double_quant == "on",
        profile=args.profile,
        budget=args.budget,
        budget_device=args.budget_device,
        config=config,
        on_event=_print_event,
    )
    for warning in result.warnings:
        _print_event(f"warning: {warning}")
    _emit(args.json, result.to_dict(), lambda: format_plan(result))
    return 0


def _names(value: str | None, flag: str) -> tuple[str, ...] | None:
    """A comma-separated list of names, or None when the flag is absent."""
    if value is None:
        return None
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise EdgetuneError(f"{flag} {value!r} names nothing", f"give {flag} comma-separated names")
    return names


def _split_source(source: str | None, overrides: list[str]) -> tuple[str | None, str | None, list[str]]:
    """(config file, model, overrides) from the first positional argument of `plan` or `train`."""
    if source is None:
        return None, None, overrides
    if source.endswith((".yaml", ".yml")):
        return source, None, overrides
    if "=" in source:
        return None, None, [source, *overrides]
    return None, source, overrides


def _print_event(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _add_probe(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from edgetune.plan.strategies import PRECISIONS, STRATEGIES
    from edgetune.train.probe import ProbeConfig

    defaults = ProbeConfig()
    sub = commands.add_parser(
        "probe",
        parents=[common],
        help="measure real training steps (loss, time, peak memory) of any strategy on a data set",
        description="Load the model the way a strategy trains it, run a few of its training steps on real text "
        "with the step function `edgetune train` uses, and report loss, speed and peak memory. With no arguments: "
        f"SmolLM2-135M, {defaults.strategy}, batch {defaults.batch_size} x {defaults.seq_len} tokens, on the bundled "
        "Pride and Prejudice text.",
    )
    sub.add_argument(
        "--model", default=defaults.model, help="smollm2-135m, a model folder, a .gguf file, or a hub id (downloads it)"
    )
    sub.add_argument("--revision", help="a hub model's branch, tag or commit (default: main)")
    sub.add_argument(
        "--strategy",
        default=defaults.strategy,
        choices=list(STRATEGIES),
        metavar="NAME",
        help=f"any strategy of `edgetune plan` (default {defaults.strategy})",
    )
    sub.add_argument("--precision", choices=list(PRECISIONS), help="load the base in this precision instead")
    sub.add_argument("--no-checkpointing", action="store_true", help="keep activations instead of recomputing")
    sub.add_argument("--lora-rank", type=int, default=defaults.lora_rank)
    sub.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha)
    sub.add_argument("--no-update", action="store_true", help="forward and backward only; weights stay as loaded")
    sub.add_argument("--lr", type=float, help="learning rate (default: the strategy's)")
    sub.add_argument("--batch-size", type=int, default=defaults.batch_size)
    sub.add_argument("--seq-len", type=int, default=defaults.seq_len)
    sub.add_argument("--steps", type=int, default=defaults.steps)
    sub.add_argument("--data", default=None, help="any data.path edgetune train takes (default: the bundled text)")
    sub.add_argument("--device", default=defaults.device, help="cpu or cuda[:N]")
    sub.add_argument("--seed", type=int, default=defaults.seed)
    sub.add_argument("--json", action="store_true", help="print the result as JSON")
    sub.set_defaults(handler=_run_probe)


def _run_probe(args: argparse.Namespace) -> int:
    from edgetune import api
    from edgetune.train.probe import ProbeConfig, format_probe

    config = ProbeConfig(
        model=args.model,
        revision=args.revision,
        strategy=args.strategy,
        precision=args.precision,
        checkpointing=False if args.no_checkpointing else None,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        update=not args.no_update,
        lr=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        data=args.data,
        device=args.device,
        seed=args.seed,
    )
    result = api.probe(config, on_event=_print_event)
    _emit(args.json, result.to_dict(), lambda: format_probe(result))
    return 0


def _add_export(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    sub = commands.add_parser(
        "export",
        parents=[common],
        help="merge a run's adapters into a 16-bit model folder, an ONNX file and/or a GGUF, each checked",
        description="Merge the adapters of an `edgetune train` run into a dequantized copy of the base they were "
        "trained on and save a Hugging Face folder (--merged), export that model to ONNX and check it against "
        "torch with onnxruntime (--onnx), and/or write a GGUF for llama.cpp with an Ollama Modelfile, read back "
        "and checked (--gguf). Each output is checked numerically before it is written.",
    )
    sub.add_argument(
        "run_dir", metavar="RUN_DIR", help="a run folder, one of its checkpoints/step-N, or a peft adapter (--base)"
    )
    sub.add_argument("--base", metavar="MODEL", help="the base model of a peft adapter folder trained elsewhere")
    sub.add_argument("--merged", metavar="OUT_DIR", help="write the merged model here (safetensors, config, tokenizer)")
    sub.add_argument(
        "--onnx", metavar="OUT.onnx", help="write an ONNX graph with a KV cache (past_key_values in, present out)"
    )
    sub.add_argument(
        "--onnx-int8", action="store_true", help="also write OUT.int8.onnx, onnxruntime's dynamic int8 quantization"
    )
    sub.add_argument(
        "--gguf", metavar="OUT.gguf", help="write a GGUF for llama.cpp and a Modelfile for Ollama beside it"
    )
    sub.add_argument(
        "--gguf-type",
        choices=["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"],
        default="q8_0",
        help="GGUF weights (default q8_0)",
    )
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
        gguf_path=args.gguf,
        gguf_type=args.gguf_type,
        dtype=args.dtype,
        overwrite=args.overwrite,
        external_data=True if args.external_data else None,
        onnx_int8=args.onnx_int8,
        on_event=lambda message: print(message, file=sys.stderr, flush=True),
        base=args.base,
    )
    _emit(args.json, result.to_dict(), lambda: export_summary(result))
    return 0


def _emit(as_json: bool, payload: object, table: Callable[[], str]) -> None:
    print(json.dumps(payload, indent=2, default=str) if as_json else table())


def _configure_output(debug: bool) -> None:
    """Keep the terminal to edgetune's own messages unless --debug asks for everything."""
    from edgetune.train.notices import FORWARDED

    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        # Warnings the API forwarded to on_event are printed there, as `warning: ...`; not a second time here.
        handler.addFilter(lambda record: not getattr(record, FORWARDED, False))
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
