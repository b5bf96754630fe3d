"""``edgetune chat`` and ``edgetune generate``: talk to a run, an export or a bare model from the terminal.

In a terminal, ``chat`` is a conversation: each answer streams as it is generated and the history is kept. When
stdin is not a terminal (a pipe, a file, a test) every input line is one independent prompt and every answer is
one output line, so the command scripts.
"""

import argparse
import sys

from edgetune.errors import EdgetuneError


def add_chat_commands(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    chat = commands.add_parser(
        "chat",
        parents=[common],
        help="talk to a finished run (base + adapters), a merged export, or a bare model (--model)",
        description="Talk to a model. In a terminal: a conversation, answers streamed, /reset clears the history, "
        "/quit or Ctrl-D ends it. From a pipe: one prompt per input line, one answer per output line.",
    )
    chat.add_argument(
        "target",
        nargs="?",
        metavar="RUN_DIR|MODEL_DIR",
        help="a run folder, one of its checkpoints/step-N, a merged export, or a peft adapter folder (with --base)",
    )
    _add_settings(chat)
    chat.set_defaults(handler=_run_chat)
    one = commands.add_parser(
        "generate", parents=[common], help="answer one prompt with a run, an export or a bare model (--model)"
    )
    one.add_argument("words", nargs="+", metavar="[RUN_DIR] PROMPT", help="a run or model folder, then the prompt")
    _add_settings(one)
    one.set_defaults(handler=_run_generate)


def _add_settings(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--model", help="talk to this model without fine-tuning (name, folder, .gguf or hub id)")
    sub.add_argument("--base", metavar="MODEL", help="the base model of a peft adapter folder trained elsewhere")
    sub.add_argument("--system", help="a system message before the conversation")
    sub.add_argument("--max-new-tokens", type=int, default=256, help="the longest answer in tokens (default 256)")
    sub.add_argument("--temperature", type=float, default=0.7, help="0 answers greedily (default 0.7)")
    sub.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default 0.9)")
    sub.add_argument("--seed", type=int, help="makes sampled answers repeatable")
    sub.add_argument("--device", help="cuda or cpu (default: cuda when available)")


def _settings(args: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        system=args.system,
    )


def _run_generate(args: argparse.Namespace) -> int:
    from edgetune import api
    from edgetune.chat.generation import GenerationSettings

    GenerationSettings(**_settings(args))  # a bad setting fails before the model loads
    target, words = (None, args.words) if args.model else (args.words[0], args.words[1:])
    prompt = " ".join(words)
    if not prompt.strip():
        raise EdgetuneError("no prompt given", 'pass the prompt after the run folder: edgetune generate RUN "Hi"')
    chat = api.open_chat(target, model=args.model, base=args.base, device=args.device, on_event=_status)
    for piece in api.generate(chat, prompt, **_settings(args)):
        print(piece, end="", flush=True)
    print()
    return 0


def _run_chat(args: argparse.Namespace) -> int:
    from edgetune import api
    from edgetune.chat.generation import GenerationSettings

    GenerationSettings(**_settings(args))
    interactive = sys.stdin.isatty()
    lines = None if interactive else [line.rstrip("\n") for line in sys.stdin]
    if lines is not None and not any(line.strip() for line in lines):
        raise EdgetuneError("stdin held no prompt", "pipe one prompt per line, or run `edgetune chat` in a terminal")
    chat = api.open_chat(args.target, model=args.model, base=args.base, device=args.device, on_event=_status)
    if lines is not None:
        for line in (line for line in lines if line.strip()):
            answer = "".join(api.generate(chat, line, **_settings(args)))
            print(" ".join(answer.split("\n")).strip(), flush=True)  # one answer per line
        return 0
    _status(f"talking to {chat.description}; /reset clears the history, /quit or Ctrl-D ends")
    history: list[dict[str, str]] = []
    while (line := _ask()) is not None:
        if line.strip() in ("/quit", "/exit"):
            break
        if line.strip() == "/reset":
            history.clear()
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        answer = []
        for piece in api.generate(chat, history, **_settings(args)):
            answer.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(answer)})
    return 0


def _ask() -> str | None:
    try:
        return input("you> ")
    except EOFError:
        print()
        return None


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
