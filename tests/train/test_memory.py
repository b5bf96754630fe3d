import json
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from edgetune.errors import EdgetuneError
from edgetune.train import memory
from edgetune.train.memory import MemoryProbe, MemoryReport, current_memory

MB = 1_000_000
MIB = 1024 * 1024  # CUDA tests use MiB: the caching allocator rounds each block up to 512 bytes
FLOAT32_BYTES = 4


def _floats(n_bytes: int, device: str = "cpu") -> torch.Tensor:
    return torch.empty(n_bytes // FLOAT32_BYTES, device=device)


def test_known_allocations_give_exact_peak_and_end():
    with MemoryProbe("cpu") as probe:
        a = _floats(40 * MB)
        b = _floats(20 * MB)
        mid = probe.sample()
        del a
        c = _floats(10 * MB)
    report = probe.report
    assert mid.end_allocated_bytes == 60 * MB
    assert report.peak_allocated_bytes == pytest.approx(60 * MB, rel=0.01)
    assert report.end_allocated_bytes == 30 * MB
    assert report.source == "dispatch-storage-tracker"
    assert report.device == "cpu"
    assert report.baseline_allocated_bytes is None and report.peak_reserved_bytes is None
    assert report.nvml_used_bytes is None
    del b, c


def test_in_place_ops_and_views_add_nothing():
    with MemoryProbe("cpu") as probe:
        x = _floats(4 * MB).fill_(1.0)
        x.add_(1.0).mul_(2.0)
        views = [x.view(1000, -1), x[10:], x.view(1000, -1).t(), x.unsqueeze(0), x.detach()]
        torch.add(x, 1.0, out=x)
    assert probe.report.peak_allocated_bytes == 4 * MB
    assert probe.report.end_allocated_bytes == 4 * MB
    del views


def test_tensors_made_before_the_region_are_not_counted():
    weight = torch.ones(250_000)
    with MemoryProbe("cpu") as probe:
        weight.mul_(2.0)
        half = weight[::2]
        before = probe.sample().peak_allocated_bytes
        doubled = weight * 2.0
    assert before == 0
    assert probe.report.peak_allocated_bytes == weight.numel() * FLOAT32_BYTES
    del half, doubled


def test_tuple_outputs_meta_sparse_and_scalars():
    dense = torch.randn(50, 40)
    dense[dense < 1.0] = 0.0
    with MemoryProbe("cpu") as probe:
        sparse = dense.to_sparse()
        values, indices = torch.max(dense, dim=0)
        torch.empty(10_000, device="meta")
        dense.sum().item()
    nnz = sparse._nnz()
    # COO keeps int64 indices (2 x nnz) and float32 values; max returns float32 values + int64 indices.
    expected_bytes = nnz * (2 * 8 + FLOAT32_BYTES) + 40 * (FLOAT32_BYTES + 8)
    assert probe.report.end_allocated_bytes == expected_bytes
    del values, indices


def test_growing_a_region_storage_is_counted():
    with MemoryProbe("cpu") as probe:
        grown = torch.empty(0)
        grown.resize_(1_000)
    assert probe.report.peak_allocated_bytes == 1_000 * FLOAT32_BYTES
    assert probe.report.end_allocated_bytes == 1_000 * FLOAT32_BYTES
    del grown


def test_linear_chain_saves_hand_computed_activations_and_backward_is_seen():
    torch.manual_seed(0)
    widths = [32, 64, 48, 16]
    layers = [torch.nn.Linear(i, o) for i, o in zip(widths, widths[1:], strict=False)]
    batch = 8
    x = torch.randn(batch, widths[0])
    with MemoryProbe("cpu") as probe:
        h = x
        for layer in layers:
            h = layer(h)
        loss = h.sum()
        del h
        after_forward = probe.sample()
        loss.backward()
    # Each Linear saves its input; x predates the region, the last output is not saved by sum().
    saved_bytes = batch * (widths[1] + widths[2]) * FLOAT32_BYTES
    loss_bytes = FLOAT32_BYTES
    assert after_forward.end_allocated_bytes == saved_bytes + loss_bytes
    assert after_forward.peak_allocated_bytes == batch * sum(widths[1:]) * FLOAT32_BYTES + loss_bytes
    # After backward the saved activations are gone and only the new .grad tensors remain.
    grad_bytes = sum(p.numel() for layer in layers for p in layer.parameters()) * FLOAT32_BYTES
    assert probe.report.end_allocated_bytes == grad_bytes + loss_bytes
    assert probe.report.peak_allocated_bytes >= grad_bytes + loss_bytes


def test_tiny_model_forward_backward(tiny_model):
    ids = torch.randint(0, 128, (2, 16))
    with MemoryProbe("cpu") as probe:
        logits = tiny_model(ids, use_cache=False).logits
        after_forward = probe.sample()
        loss = logits.pow(2).mean()
        loss.backward()
    logits_bytes = logits.numel() * logits.element_size()
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in tiny_model.parameters())
    assert after_forward.end_allocated_bytes > logits_bytes
    assert probe.report.end_allocated_bytes == grad_bytes + logits_bytes + loss.element_size()
    assert probe.report.peak_allocated_bytes >= max(after_forward.end_allocated_bytes, grad_bytes + logits_bytes)


def test_nested_and_sequential_probes():
    with MemoryProbe("cpu") as outer:
        kept = _floats(8 * MB)
        with MemoryProbe("cpu") as inner:
            temp = _floats(4 * MB)
            del temp
        with MemoryProbe("cpu") as second:
            more = _floats(2 * MB)
    assert inner.report.peak_allocated_bytes == 4 * MB and inner.report.end_allocated_bytes == 0
    assert second.report.peak_allocated_bytes == 2 * MB and second.report.end_allocated_bytes == 2 * MB
    assert outer.report.peak_allocated_bytes == 12 * MB
    assert outer.report.end_allocated_bytes == 10 * MB
    del kept, more


def _in_fresh_process(body: str) -> dict:
    """Run an RSS check in a new interpreter: RSS is process-wide, and memory that earlier tests freed stays
    resident in the allocator, so the same check inside a long test session may see no growth at all."""
    code = (
        "import json, torch\n"
        "from edgetune.train import memory\n"
        "from edgetune.train.memory import MemoryProbe, current_memory\n"
        f"MB = {MB}\n"
        f"{textwrap.dedent(body)}"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_peak_rss_sees_a_touched_tensor_after_it_is_freed():
    result = _in_fresh_process("""
        with MemoryProbe("cpu") as probe:
            big = torch.ones(100 * MB // 4)
            del big
        r = probe.report
        print(json.dumps({"source": r.rss_source, "grew": r.peak_rss_bytes - r.start_rss_bytes}))
    """)
    assert result["source"] in ("VmHWM", "psutil-sampling")
    assert result["grew"] >= 0.95 * 100 * MB


def test_nested_probe_does_not_erase_outer_peak_rss():
    result = _in_fresh_process("""
        with MemoryProbe("cpu") as outer:
            big = torch.ones(100 * MB // 4)
            del big
            with MemoryProbe("cpu") as inner:
                pass
        probes = {"outer": outer.report, "inner": inner.report}
        print(json.dumps({name: r.peak_rss_bytes - r.start_rss_bytes for name, r in probes.items()}))
    """)
    assert result["outer"] >= 0.95 * 100 * MB
    assert result["inner"] < 50 * MB


def test_peak_rss_falls_back_to_sampling():
    result = _in_fresh_process("""
        memory._CLEAR_REFS_PATH = "/nonexistent/clear_refs"
        with MemoryProbe("cpu") as probe:
            big = torch.ones(100 * MB // 4)  # kept to the end, so the final reading sees it
        r = probe.report
        print(json.dumps({"source": r.rss_source, "grew": r.peak_rss_bytes - r.start_rss_bytes}))
    """)
    assert result["source"] == "psutil-sampling"
    assert result["grew"] >= 0.95 * 100 * MB


def test_probe_in_worker_thread_counts_only_that_thread():
    entered, main_done, results = threading.Event(), threading.Event(), {}

    def work() -> None:
        with MemoryProbe("cpu") as probe:
            entered.set()
            main_done.wait(timeout=10)
            results["tensor"] = _floats(4 * MB)
        results["report"] = probe.report

    worker = threading.Thread(target=work)
    worker.start()
    entered.wait(timeout=10)
    on_main = _floats(8 * MB)  # dispatch modes are thread-local: the worker's probe must not see this
    main_done.set()
    worker.join(timeout=10)
    assert results["report"].peak_allocated_bytes == 4 * MB
    del on_main


def test_worker_thread_backward_is_seen():
    layer = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16)
    results = {}

    def work() -> None:
        with MemoryProbe("cpu") as probe:
            layer(x).sum().backward()
        results["report"] = probe.report

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(timeout=10)
    grad_bytes = sum(p.numel() for p in layer.parameters()) * FLOAT32_BYTES
    assert results["report"].end_allocated_bytes == grad_bytes


def test_report_survives_an_exception_in_the_region():
    probe = MemoryProbe("cpu")
    with pytest.raises(ZeroDivisionError):
        with probe:
            kept = _floats(1 * MB)  # noqa: F841
            raise ZeroDivisionError("inside the region")
    assert probe.report.peak_allocated_bytes == 1 * MB


def test_usage_errors():
    probe = MemoryProbe("cpu")
    with pytest.raises(EdgetuneError, match="not finished"):
        _ = probe.report
    with pytest.raises(EdgetuneError, match="outside"):
        probe.sample()
    with probe:
        with pytest.raises(EdgetuneError, match="already active"):
            probe.__enter__()
    with pytest.raises(EdgetuneError, match="'mps'"):
        MemoryProbe("mps")
    with pytest.raises(EdgetuneError, match="unknown device 'gpu0'"):
        MemoryProbe("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(EdgetuneError, match="CUDA is not available"):
        MemoryProbe("cuda")


def test_report_validation_and_dict():
    fields = dict(
        device="cpu",
        peak_allocated_bytes=10,
        end_allocated_bytes=5,
        baseline_allocated_bytes=None,
        peak_reserved_bytes=None,
        nvml_used_bytes=None,
        peak_rss_bytes=100,
        start_rss_bytes=90,
        source="dispatch-storage-tracker",
        rss_source="VmHWM",
    )
    assert MemoryReport(**fields).to_dict() == fields
    with pytest.raises(ValueError, match="negative"):
        MemoryReport(**{**fields, "peak_allocated_bytes": -1, "end_allocated_bytes": -2})
    with pytest.raises(ValueError, match="exceeds"):
        MemoryReport(**{**fields, "end_allocated_bytes": 11})


def test_current_memory_cpu_tracks_rss():
    result = _in_fresh_process("""
        before = current_memory("cpu")
        big = torch.ones(50 * MB // 4)
        after = current_memory(torch.device("cpu"))
        print(json.dumps({"keys": sorted(after), "grew": after["rss_bytes"] - before["rss_bytes"]}))
    """)
    assert result["keys"] == ["rss_bytes"]
    assert result["grew"] >= 0.9 * 50 * MB


class _FakeAllocator:
    """Stands in for torch.cuda's allocator statistics so the CUDA arithmetic runs without a GPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.allocated_bytes, self.peak_bytes = 0, 0
        fakes = dict(
            is_available=lambda: True,
            device_count=lambda: 1,
            current_device=lambda: 0,
            synchronize=lambda device=None: None,
            reset_peak_memory_stats=self._reset,
            memory_allocated=lambda device=None: self.allocated_bytes,
            max_memory_allocated=lambda device=None: self.peak_bytes,
            memory_reserved=lambda device=None: 2 * self.peak_bytes,
            max_memory_reserved=lambda device=None: 2 * self.peak_bytes,
        )
        for name, fake in fakes.items():
            monkeypatch.setattr(torch.cuda, name, fake)
        monkeypatch.setattr(memory, "_nvml_used_bytes", lambda index: 123)

    def _reset(self, device: object = None) -> None:
        self.peak_bytes = self.allocated_bytes

    def allocate(self, n_bytes: int) -> None:
        self.allocated_bytes += n_bytes
        self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)


def test_cuda_figures_are_region_relative_and_survive_nested_resets(monkeypatch):
    fake = _FakeAllocator(monkeypatch)
    fake.allocate(16 * MIB)  # weights before the region
    with MemoryProbe("cuda") as outer:
        fake.allocate(40 * MIB)
        fake.allocate(-40 * MIB)
        with MemoryProbe("cuda:0") as inner:  # resets the device peak; outer must keep its 40 MiB
            fake.allocate(4 * MIB)
    assert inner.report.peak_allocated_bytes == 4 * MIB and inner.report.end_allocated_bytes == 4 * MIB
    report = outer.report
    assert report.device == "cuda:0" and report.source == "torch.cuda.max_memory_allocated"
    assert report.baseline_allocated_bytes == 16 * MIB
    assert report.peak_allocated_bytes == 40 * MIB and report.end_allocated_bytes == 4 * MIB
    assert report.peak_reserved_bytes == 2 * 56 * MIB and report.nvml_used_bytes == 123
    assert current_memory("cuda") == {
        "allocated_bytes": 20 * MIB,
        "reserved_bytes": 40 * MIB,
        "peak_allocated_bytes": 20 * MIB,
    }


class _FakeNvml:
    """A pynvml stand-in with one GPU; `v2` says whether the driver has the v2 memory call."""

    class NVMLError(Exception):
        pass

    nvmlMemory_v2 = 0x02000028

    def __init__(self, v2: bool, supported: bool = True) -> None:
        self.v2, self.supported, self.open_sessions = v2, supported, 0

    def nvmlInit(self) -> None:
        self.open_sessions += 1

    def nvmlShutdown(self) -> None:
        self.open_sessions -= 1

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        if uuid != "GPU-1234abcd-0000-0000-0000-000000000000":
            raise self.NVMLError("not found")
        return "handle"

    def nvmlDeviceGetMemoryInfo(self, handle: str, version: int | None = None) -> object:
        if not self.supported or (version is not None and not self.v2):
            raise self.NVMLError("not supported")
        used_bytes = 700 * MIB if version is None else 600 * MIB  # v2 leaves out driver-reserved memory
        return type("Info", (), {"used": used_bytes})()


@pytest.mark.parametrize(
    ("v2", "supported", "expected"), [(True, True, 600 * MIB), (False, True, 700 * MIB), (True, False, None)]
)
def test_nvml_reading_matches_uuid_and_falls_back(monkeypatch, v2, supported, expected):
    fake = _FakeNvml(v2, supported)
    props = type("Props", (), {"uuid": "1234abcd-0000-0000-0000-000000000000"})()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    assert memory._nvml_used_bytes(0) == expected
    assert fake.open_sessions == 0


@pytest.mark.gpu
def test_cuda_known_allocations():
    resident = _floats(16 * MIB, "cuda")  # before the region: part of the baseline, not of the peak
    with MemoryProbe("cuda") as probe:
        a = _floats(40 * MIB, "cuda")
        b = _floats(20 * MIB, "cuda")
        del a
        c = _floats(10 * MIB, "cuda")
    report = probe.report
    assert report.source == "torch.cuda.max_memory_allocated"
    assert report.device == f"cuda:{torch.cuda.current_device()}"
    assert report.peak_allocated_bytes == pytest.approx(60 * MIB, rel=0.01)
    assert report.end_allocated_bytes == 30 * MIB
    assert report.baseline_allocated_bytes >= 16 * MIB
    assert report.peak_reserved_bytes >= report.baseline_allocated_bytes + report.peak_allocated_bytes
    if report.nvml_used_bytes is not None:  # None where NVML cannot say (unified-memory boards)
        assert report.nvml_used_bytes >= torch.cuda.memory_reserved()
    del resident, b, c


@pytest.mark.gpu
def test_cuda_nested_probe_keeps_outer_peak():
    with MemoryProbe("cuda:0") as outer:
        temp = _floats(40 * MIB, "cuda:0")
        del temp
        with MemoryProbe("cuda:0") as inner:
            small = _floats(4 * MIB, "cuda:0")
    assert inner.report.peak_allocated_bytes == 4 * MIB
    assert outer.report.peak_allocated_bytes == 40 * MIB
    del small


@pytest.mark.gpu
def test_current_memory_cuda():
    kept = _floats(8 * MIB, "cuda")
    stats = current_memory("cuda")
    assert set(stats) == {"allocated_bytes", "reserved_bytes", "peak_allocated_bytes"}
    assert stats["reserved_bytes"] >= stats["allocated_bytes"] >= 8 * MIB
    assert stats["peak_allocated_bytes"] >= stats["allocated_bytes"]
    del kept
