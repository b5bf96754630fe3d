import json
import subprocess
import sys
from pathlib import Path

from edgetune.train.run_folder import plot_memory_timeline

PACKAGE = Path(__file__).resolve().parents[2] / "edgetune"


def test_library_code_never_switches_the_plotting_backend():
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "matplotlib.use(" in path.read_text() or "pyplot" in path.read_text().replace("never through pyplot", "")
    ]
    assert offenders == []


def test_the_memory_picture_leaves_an_embedding_apps_backend_and_figures_alone(tmp_path):
    log = tmp_path / "steps.jsonl"
    rows = [
        {"step": s, "memory": {"resident_bytes": 2**20, "step_peak_bytes": s * 2**20, "peak_rss_bytes": 2**27}}
        for s in (1, 2, 3)
    ]
    log.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # An app that chose its backend and holds an open figure, in a fresh interpreter so pytest's state is untouched.
    code = (
        "import matplotlib, sys\n"
        "matplotlib.use('svg')\n"
        "from matplotlib import pyplot\n"
        "figure = pyplot.figure()\n"
        "from edgetune.train.run_folder import plot_memory_timeline\n"
        "from pathlib import Path\n"
        f"plot_memory_timeline(Path({str(log)!r}), Path({str(tmp_path / 'm.png')!r}), 3 * 2**20)\n"
        "print(matplotlib.get_backend(), pyplot.get_fignums())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["svg", "[1]"]
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_memory_picture_is_a_png(tmp_path):
    log = tmp_path / "steps.jsonl"
    log.write_text(json.dumps({"step": 1, "memory": {"resident_bytes": 1, "step_peak_bytes": 2, "reserved_bytes": 3}}))
    plot_memory_timeline(log, tmp_path / "m.png", 10)
    assert (tmp_path / "m.png").stat().st_size > 1000
