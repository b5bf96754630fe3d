"""A small desktop window around ``edgetune.train``: progress, loss, speed, memory and a Cancel button.

    python examples/desktop_app.py [section.key=value ...] [--autostart]
    python examples/desktop_app.py train.steps=100 output.dir=runs/desktop --autostart

The pattern to copy into your own app:

* Training runs in a worker thread. Its callbacks (``on_step``, ``on_event``) never touch widgets: they put events
  on a ``queue.Queue`` that the Tk main loop drains every 100 ms, because tkinter is not thread-safe.
* Cancel calls ``CancelToken.cancel()``. The trainer saves a checkpoint at the next step boundary and returns a
  normal ``TrainResult`` with ``status == "cancelled"``; nothing is killed.
* ``EdgetuneError`` messages are written for people (problem; fix), so they go in the status line as they are.

The app also prints a line per state change (READY, STEP, EVENT, CANCELLED, FINISHED, STOPPED, ERROR) so that
``tests/test_desktop_app.py`` can follow it without reading pixels; your app does not need that.
"""

import argparse
import logging
import queue
import threading
import tkinter as tk
from tkinter import ttk

from edgetune import CancelToken, EdgetuneError, StepInfo, TrainResult, train, train_config
from edgetune.train.config import TrainConfig

MIB = 1024 * 1024
POLL_MS = 100


def announce(line: str) -> None:
    """Print one state line for scripts and tests (flushed, so a pipe sees it at once)."""
    print(line, flush=True)


class TrainerWindow:
    """The window: Start, a progress bar, live numbers, a status line and Cancel."""

    def __init__(self, root: tk.Tk, overrides: list[str]) -> None:
        self.root, self.overrides = root, overrides
        self.events: queue.Queue[tuple[str, object]] = queue.Queue()
        self.token = CancelToken()
        self.worker: threading.Thread | None = None
        self.closing = False
        root.title("edgetune")
        frame = ttk.Frame(root, padding=12)
        frame.grid(sticky="nsew")
        self.progress = ttk.Progressbar(frame, length=360, mode="determinate")
        self.progress.grid(row=0, column=0, columnspan=2, pady=(0, 8))
        self.values = {}
        for row, name in enumerate(("Step", "Loss", "Tokens/s", "Memory", "Held-out loss"), start=1):
            ttk.Label(frame, text=f"{name}:").grid(row=row, column=0, sticky="w")
            self.values[name] = tk.StringVar(value="-")
            ttk.Label(frame, textvariable=self.values[name]).grid(row=row, column=1, sticky="w")
        self.status = tk.StringVar(value="Press Start to fine-tune.")
        ttk.Label(frame, textvariable=self.status, wraplength=360).grid(row=6, column=0, columnspan=2, pady=8)
        self.start_button = ttk.Button(frame, text="Start", command=self.start)
        self.start_button.grid(row=7, column=0)
        self.cancel_button = ttk.Button(frame, text="Cancel", command=self.cancel, state="disabled")
        self.cancel_button.grid(row=7, column=1)
        root.bind("<Escape>", lambda _: self.cancel())
        root.bind("<Control-q>", lambda _: self.close())
        root.protocol("WM_DELETE_WINDOW", self.close)
        root.after(POLL_MS, self.poll)

    def start(self) -> None:
        """Read the config (errors go to the status line) and start training in a worker thread."""
        if self.worker is not None:
            return
        try:
            config = train_config(None, self.overrides)
        except EdgetuneError as exc:
            self.on_error(exc)
            return
        self.start_button.state(["disabled"])
        self.cancel_button.state(["!disabled"])
        self.progress.configure(maximum=config.train.steps, value=0)
        self.status.set(f"Loading {config.model.name} ...")
        self.worker = threading.Thread(target=self.run, args=(config,), daemon=True)
        self.worker.start()

    def run(self, config: TrainConfig) -> None:
        """The worker thread: train, and report everything through the queue (never through widgets)."""
        try:
            result = train(
                config,
                on_step=lambda info: self.events.put(("step", info)),
                on_event=lambda message: self.events.put(("event", message)),
                cancel=self.token,
            )
            self.events.put(("done", result))
        except EdgetuneError as exc:
            self.events.put(("error", exc))
        except Exception as exc:  # a bug, or out of memory: still tell the user instead of hanging on "training"
            logging.getLogger(__name__).exception("training failed")
            self.events.put(("error", exc))

    def poll(self) -> None:
        """Apply the worker's events to the widgets; runs on the Tk thread every POLL_MS."""
        handlers = {"step": self.on_step, "event": self.on_event, "done": self.on_done, "error": self.on_error}
        while not self.events.empty():
            kind, payload = self.events.get_nowait()
            handlers[kind](payload)
        if self.closing and self.worker is None:
            self.root.destroy()  # the window was closed during the run, which has now saved its checkpoint
        else:
            self.root.after(POLL_MS, self.poll)

    def on_step(self, info: StepInfo) -> None:
        """Show one finished step."""
        self.progress.configure(value=info.step)
        self.values["Step"].set(f"{info.step} / {info.total_steps}")
        self.values["Loss"].set(f"{info.loss:.4f}")
        self.values["Tokens/s"].set(f"{info.tokens_per_second:,.0f}")
        # On a GPU, what the allocator holds; on a CPU, the process's resident memory.
        memory_bytes = info.memory.get("reserved_bytes", info.memory.get("rss_bytes", 0))
        self.values["Memory"].set(f"{memory_bytes / MIB:,.0f} MiB")
        if info.val_loss is not None:
            self.values["Held-out loss"].set(f"{info.val_loss:.4f}")
        self.status.set(f"Training; about {info.eta_seconds:.0f} s left.")
        announce(f"STEP {info.step}/{info.total_steps} loss={info.loss:.4f}")

    def on_event(self, message: str) -> None:
        """Show a one-line message from the trainer (conversion, strategy, evaluation)."""
        self.status.set(message)
        announce(f"EVENT {message}")

    def on_done(self, result: TrainResult) -> None:
        """Show how the run ended: finished, cancelled (with its checkpoint) or stopped."""
        self.cancel_button.state(["disabled"])
        self.values["Held-out loss"].set(f"{result.val_loss_before:.4f} -> {result.val_loss_after:.4f}")
        if result.status == "cancelled":
            self.status.set(f"Cancelled at step {result.steps_done}, checkpoint saved in {result.run_dir}.")
            announce(f"CANCELLED step={result.steps_done} run_dir={result.run_dir}")
        elif result.status == "finished":
            self.status.set(f"Finished {result.steps_done} steps; the adapter is in {result.output_dir}.")
            announce(f"FINISHED step={result.steps_done} output_dir={result.output_dir}")
        else:  # "stopped: <why>"
            self.status.set(f"{result.status} (after {result.steps_done} steps)")
            announce(f"STOPPED step={result.steps_done} {result.status}")
        self.worker = None

    def on_error(self, exc: Exception) -> None:
        """Show an error in the status line, not as a traceback."""
        text = str(exc) if isinstance(exc, EdgetuneError) else f"unexpected {type(exc).__name__}: {exc}"
        self.cancel_button.state(["disabled"])
        self.status.set(text)
        announce(f"ERROR {text}")
        self.worker = None

    def cancel(self) -> None:
        """Ask the run to stop; the trainer checkpoints at the next step boundary and returns."""
        if self.worker is not None and not self.token.cancelled:
            self.token.cancel()
            self.cancel_button.state(["disabled"])
            self.status.set("Cancelling: saving a checkpoint after this step ...")

    def close(self) -> None:
        """Close the window; a running job is cancelled first, and ``poll`` closes it once the checkpoint is saved."""
        if self.worker is None:
            self.root.destroy()
            return
        self.closing = True
        self.cancel()

    def announce_ready(self) -> None:
        """Print READY with the buttons' screen centres, so a test can click them with the real mouse."""
        centres = [
            f"{name}={b.winfo_rootx() + b.winfo_width() // 2},{b.winfo_rooty() + b.winfo_height() // 2}"
            for name, b in (("start", self.start_button), ("cancel", self.cancel_button))
        ]
        announce("READY " + " ".join(centres))


def main() -> int:
    """Parse the command line, show the window and run the Tk main loop until it closes."""
    parser = argparse.ArgumentParser(description="Fine-tune with edgetune in a small window.")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=100 model.name=DIR")
    parser.add_argument("--autostart", action="store_true", help="start training as soon as the window opens")
    args = parser.parse_args()
    root = tk.Tk()
    window = TrainerWindow(root, args.overrides)
    root.wait_visibility()
    root.update_idletasks()
    window.announce_ready()
    if args.autostart:
        window.start()
    root.mainloop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
