"""Rebuild the example chat and instruction files from the English part of ``chatterbot-corpus`` (BSD-3-Clause).

    python examples/data/make_chatterbot.py

Downloads the ``chatterbot-corpus==1.3.3`` wheel from the package registry without its dependencies (it pins an old
PyYAML), reads ``chatterbot_corpus/data/english/*.yml`` and writes, next to this script:
- ``chatterbot-chat.jsonl``: one ``messages`` conversation per corpus conversation (turns alternate user and
  assistant, as the corpus lists them), for ``examples/configs/smollm2-chat.yaml``;
- ``chatterbot-alpaca.jsonl``: one alpaca row (``instruction``, ``input``, ``output``) per question and answer,
  for ``examples/configs/smollm2-alpaca.yaml``.
Conversations are kept in file order, files in name order, so the output is the same on every machine.
"""

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

VERSION = "1.3.3"
HERE = Path(__file__).resolve().parent


def conversations() -> list[list[str]]:
    """Every English conversation of the corpus, as lists of turns."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "-d",
                tmp,
                f"chatterbot-corpus=={VERSION}",
            ],
            check=True,
        )
        wheel = zipfile.ZipFile(next(Path(tmp).glob("chatterbot_corpus-*.whl")))
        names = sorted(
            n for n in wheel.namelist() if n.startswith("chatterbot_corpus/data/english/") and n.endswith(".yml")
        )
        found = []
        for name in names:
            for turns in yaml.safe_load(wheel.read(name))["conversations"]:
                turns = [str(t).strip() for t in turns if str(t).strip()]
                if len(turns) >= 2:
                    found.append(turns[: len(turns) // 2 * 2])  # end on an answer
        return found


def main() -> None:
    convs = conversations()
    with (HERE / "chatterbot-chat.jsonl").open("w", encoding="utf-8") as chat:
        for turns in convs:
            roles = ["user", "assistant"] * (len(turns) // 2)
            messages = [{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)]
            chat.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    with (HERE / "chatterbot-alpaca.jsonl").open("w", encoding="utf-8") as alpaca:
        for turns in convs:
            for question, answer in zip(turns[::2], turns[1::2], strict=True):
                row = {"instruction": question, "input": "", "output": answer}
                alpaca.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(convs)} conversations written to {HERE}")


if __name__ == "__main__":
    main()
