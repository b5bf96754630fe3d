"""examples/desktop_app.py driven for real: an X server (Xvfb), the real mouse and keyboard (xdotool), real training.

The app prints a line per state change (READY with the buttons' screen centres, STEP, CANCELLED, ERROR); the test
clicks the buttons through XTEST, exactly as a user's mouse would, and checks the run folder afterwards.
Debian packages: xvfb, xdotool (ImageMagick is optional, for a screenshot).
"""

import importlib.util
import json
import os
import queue
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import CORPUS

from edgetune.train.checkpoint import list_checkpoints

APP = Path(__file__).resolve().parents[1] / "examples" / "desktop_app.py"
STEPS = 200
OUTCOMES = {"CANCELLED", "FINISHED", "STOPPED", "ERROR"}

pytestmark = [
    pytest.mark.skipif(
        shutil.which("Xvfb") is None or shutil.which("xdotool") is None,
        reason="needs the Xvfb and xdotool binaries (Debian: apt-get install xvfb xdotool)",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("_tkinter") is None, reason="this Python has no tkinter (Debian: python3-tk)"
    ),
]


@pytest.fixture(scope="module")
def display():
    """A private Xvfb; -displayfd lets the server pick a free display number, so parallel runs cannot collide."""
    read_fd, write_fd = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "800x600x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    try:
        number = _read_display_number(read_fd)
        if not number:
            pytest.fail(f"Xvfb did not report a display number (exit code {server.poll()})")
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(timeout=10)
        os.close(read_fd)  # only now: Xvfb dies of EPIPE if the pipe closes before it has written all of "N\n"


def _read_display_number(fd: int) -> str:
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], 30)
        chunk = os.read(fd, 16) if ready else b""
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


class App:
    """The example as a subprocess; its stdout lines are read on a thread so that every wait can time out."""

    def __init__(self, display: str, args: list[str]) -> None:
        self.display = display
        self.process = subprocess.Popen(
            [sys.executable, str(APP), *args],
            env=os.environ | {"DISPLAY": display},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.process.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.process.stderr, self.stderr.append), daemon=True).start()

    @staticmethod
    def _pump(stream, sink) -> None:
        for line in stream:
            sink(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout_s: float = 90) -> str:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if line.startswith(prefix):
                return line
            if line.split(" ", 1)[0] in OUTCOMES:  # the run is over and will never print the awaited line
                break
        stderr = "\n".join(self.stderr[-20:])
        raise AssertionError(f"no {prefix!r} line within {timeout_s} s; stdout: {self.seen}; stderr: {stderr}")

    def xdotool(self, *args: str) -> str:
        done = subprocess.run(
            ["xdotool", *args],
            env=os.environ | {"DISPLAY": self.display},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return done.stdout

    def click(self, centre: tuple[int, int]) -> None:
        # mousemove + click go through XTEST: the X server sees a real pointer, not a synthetic event.
        self.xdotool("mousemove", "--sync", str(centre[0]), str(centre[1]), "click", "1")

    def close_with_ctrl_q(self, window: str) -> int:
        # X focus first, then a real (XTEST) key press: with no window manager nothing else gives the window focus,
        # and Tk ignores keys sent to an unfocused window unless the pointer happens to be over it.
        self.xdotool("windowfocus", window, "key", "ctrl+q")
        return self.process.wait(timeout=60)


@pytest.fixture
def launch(display):
    apps: list[App] = []

    def start(*args: str) -> App:
        apps.append(App(display, list(args)))
        return apps[-1]

    yield start
    for app in apps:
        if app.process.poll() is None:
            app.process.kill()
            app.process.wait(timeout=10)


def button_centres(ready: str) -> dict[str, tuple[int, int]]:
    """``READY start=103,183 cancel=283,183`` -> {"start": (103, 183), "cancel": (283, 183)}."""
    return {name: (int(x), int(y)) for name, x, y in re.findall(r"(\w+)=(\d+),(\d+)", ready)}


def tiny_run_args(model_dir: Path, tmp_path: Path) -> list[str]:
    text = tmp_path / "text.txt"
    # Forty short paragraphs: enough blocks for 200 steps of batch 2, and tokenized in milliseconds.
    text.write_text("\n\n".join(" ".join(CORPUS[(i + j) % len(CORPUS)] for j in range(3)) for i in range(40)))
    return [
        f"model.name={model_dir}",
        f"data.path={text}",
        "data.seq_len=32",
        f"train.steps={STEPS}",
        "train.batch_size=2",
        "train.eval_every=1000",
        "train.eval_batches=1",
        "train.device=cpu",
        f"output.dir={tmp_path / 'run'}",
        "output.checkpoint_every=1000",
    ]


def test_start_and_cancel_buttons_train_then_checkpoint_and_the_window_closes(launch, tiny_trainable_dir, tmp_path):
    app = launch(*tiny_run_args(tiny_trainable_dir, tmp_path))
    centres = button_centres(app.wait_for("READY"))
    window = app.xdotool("search", "--sync", "--name", "^edgetune$").split()[0]
    geometry = dict(line.split("=") for line in app.xdotool("getwindowgeometry", "--shell", window).split())
    left, top, width, height = (int(geometry[key]) for key in ("X", "Y", "WIDTH", "HEIGHT"))
    for x, y in centres.values():
        assert left <= x < left + width and top <= y < top + height, (centres, geometry)

    app.click(centres["start"])
    first = int(app.wait_for("STEP ").split()[1].split("/")[0])
    app.click(centres["cancel"])
    cancelled = app.wait_for("CANCELLED")
    if shutil.which("import"):  # ImageMagick: a picture of the final window, for a human debugging a failure
        subprocess.run(
            ["import", "-window", "root", str(tmp_path / "window.png")],
            env=os.environ | {"DISPLAY": app.display},
            timeout=30,
        )

    fields = dict(part.split("=", 1) for part in cancelled.split()[1:])
    steps_done, run_dir = int(fields["step"]), Path(fields["run_dir"])
    assert run_dir == tmp_path / "run"
    assert first <= steps_done < STEPS  # the token is honoured at the next step boundary, long before the end
    # Every step reached the window, in order, through the worker's queue and the Tk poll.
    shown = [int(line.split()[1].split("/")[0]) for line in app.seen if line.startswith("STEP ")]
    assert shown == list(range(1, steps_done + 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "cancelled" and summary["steps_done"] == steps_done
    assert len((run_dir / "steps.jsonl").read_text().splitlines()) == steps_done
    newest = list_checkpoints(run_dir, verify=True)[0]
    assert newest.step == steps_done and newest.problem is None

    assert app.close_with_ctrl_q(window) == 0
    assert not any("Traceback" in line for line in app.stderr)


def test_an_edgetune_error_in_the_worker_shows_in_the_status_line(launch, tmp_path):
    missing = tmp_path / "no-such-model"
    app = launch(f"model.name={missing}", f"output.dir={tmp_path / 'run'}", "train.device=cpu", "--autostart")
    app.wait_for("READY")
    error = app.wait_for("ERROR")
    assert str(missing) in error and "; " in error  # EdgetuneError's "problem; fix", shown as is
    window = app.xdotool("search", "--sync", "--name", "^edgetune$").split()[0]
    assert app.close_with_ctrl_q(window) == 0
    assert not any("Traceback" in line for line in app.stderr)


def test_closing_the_window_during_a_run_saves_a_checkpoint_first(launch, tiny_trainable_dir, tmp_path):
    app = launch(*tiny_run_args(tiny_trainable_dir, tmp_path), "--autostart")
    app.wait_for("READY")
    first = int(app.wait_for("STEP ").split()[1].split("/")[0])
    window = app.xdotool("search", "--sync", "--name", "^edgetune$").split()[0]
    assert app.close_with_ctrl_q(window) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "cancelled" and first <= summary["steps_done"] < STEPS
    assert list_checkpoints(tmp_path / "run", verify=True)[0].step == summary["steps_done"]
    assert not any("Traceback" in line for line in app.stderr)
