"""Measure the peak memory of a code region on CUDA or CPU, in bytes: ``MemoryProbe``.

On CUDA the figures come from the caching allocator's statistics and NVML. On CPU a dispatch mode
counts the storages that ops create, the figure comparable with ``torch.cuda.max_memory_allocated``
(RSS also holds the Python heap, libraries and allocator caches). Peak RSS comes from the kernel's
high-water mark (VmHWM, reset via /proc/self/clear_refs), else from sampling RSS every 5 ms.
"""

import dataclasses
import logging
import threading
from typing import Any

import torch

from edgetune.errors import EdgetuneError
from edgetune.train.storage_tracker import StorageTracker

logger = logging.getLogger(__name__)

_CLEAR_REFS_PATH = "/proc/self/clear_refs"
_STATUS_PATH = "/proc/self/status"
_SAMPLE_INTERVAL_S = 0.005
# After a reset the high-water mark equals RSS; a larger gap means the kernel ignored the write.
_RESET_SLACK_BYTES = 4 * 1024 * 1024
# Peak counters are process-wide (VmHWM) or per device (CUDA), so a probe that resets them must
# first hand the peak so far to the probes already running, or nested probes would lose it.
_RESET_LOCK = threading.Lock()
_ACTIVE: list["MemoryProbe"] = []


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Memory used by one region, all figures in bytes.

    Args:
        device: the device measured, e.g. "cpu" or "cuda:0".
        peak_allocated_bytes: peak of tensor bytes allocated inside the region and live at once.
        end_allocated_bytes: tensor bytes allocated inside the region still live at its end (on CUDA
            negative when the region freed more than it kept).
        baseline_allocated_bytes: CUDA bytes allocated at entry; None on CPU, where tensors made before
            the region are invisible.
        peak_reserved_bytes: CUDA ``max_memory_reserved`` (absolute); None on CPU.
        nvml_used_bytes: device memory used according to NVML at the end; None on CPU or when NVML
            cannot say (e.g. unified memory on Jetson).
        peak_rss_bytes: peak resident set size of the whole process during the region.
        start_rss_bytes: resident set size at entry.
        source: how peak_allocated_bytes was measured.
        rss_source: how peak_rss_bytes was measured ("VmHWM" or "psutil-sampling").
    """

    device: str
    peak_allocated_bytes: int
    end_allocated_bytes: int
    baseline_allocated_bytes: int | None
    peak_reserved_bytes: int | None
    nvml_used_bytes: int | None
    peak_rss_bytes: int
    start_rss_bytes: int
    source: str
    rss_source: str

    def __post_init__(self) -> None:
        if self.peak_allocated_bytes < 0 or self.peak_rss_bytes < 0 or self.start_rss_bytes < 0:
            raise ValueError(f"negative memory figure in {self}; peaks and RSS must be >= 0 bytes")
        if self.end_allocated_bytes > self.peak_allocated_bytes:
            raise ValueError(
                f"end_allocated_bytes={self.end_allocated_bytes} exceeds peak_allocated_bytes="
                f"{self.peak_allocated_bytes}; the peak must include what is live at the end"
            )

    def to_dict(self) -> dict[str, Any]:
        """Returns the report as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)


class _RssWatch:
    """Peak RSS of the process since start(): kernel high-water mark, else a sampling thread."""

    def __init__(self) -> None:
        self.source = "VmHWM"
        self.start_bytes = 0
        self.floor_bytes = 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self) -> None:
        """Resets the high-water mark (or starts sampling) and records the RSS at entry."""
        try:
            with open(_CLEAR_REFS_PATH, "w") as handle:
                handle.write("5")  # 5 resets the peak RSS counter (Linux >= 4.0)
            hwm_bytes, rss_bytes = _read_status()
            if hwm_bytes - rss_bytes > _RESET_SLACK_BYTES:
                raise OSError(f"VmHWM {hwm_bytes} stayed above VmRSS {rss_bytes} after the reset")
            self.start_bytes = rss_bytes
        except (OSError, ValueError) as exc:
            logger.debug("peak RSS falls back to sampling: %s", exc)
            self.source = "psutil-sampling"
            self.start_bytes = self.floor_bytes = _rss_bytes()
            self._sampler = threading.Thread(target=self._sample, name="edgetune-rss", daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(_SAMPLE_INTERVAL_S):
            self.floor_bytes = max(self.floor_bytes, _rss_bytes())

    def peak_bytes(self) -> int:
        """Returns the peak RSS since start()."""
        reading = _read_status()[0] if self.source == "VmHWM" else _rss_bytes()
        return max(self.floor_bytes, reading)

    def stop(self) -> None:
        """Stops the sampling thread, if any."""
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None


def _read_status() -> tuple[int, int]:
    """Returns (VmHWM, VmRSS) in bytes from /proc/self/status."""
    fields: dict[str, int] = {}
    with open(_STATUS_PATH) as handle:
        for line in handle:
            if line.startswith(("VmHWM:", "VmRSS:")):
                fields[line[:6]] = int(line.split()[1]) * 1024
    if len(fields) != 2:
        raise OSError(f"{_STATUS_PATH} lacks VmHWM/VmRSS")
    return fields["VmHWM:"], fields["VmRSS:"]


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class MemoryProbe:
    """Measures the peak memory of the code run inside ``with MemoryProbe(device) as probe:``.

    On CPU only tensors created inside the region count: weights, optimizer state and anything else
    made before entry are invisible and must be added separately. Dispatch modes are thread-local,
    so the region's tensor work must run on the thread that entered the probe (CPU autograd runs
    backward on that thread, so backward allocations count); work on other threads is not counted.
    On CUDA the allocator statistics are per device and include work from every thread. Peak RSS
    is always process-wide. Probes may be nested and used on several threads at once.

    Args:
        device: "cpu", "cuda", "cuda:N" or a torch.device.

    Raises:
        EdgetuneError: the device is unknown, unsupported or not available.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = _resolve_device(device)
        self._tracker: StorageTracker | None = None
        self._rss = _RssWatch()
        self._owner: int | None = None
        self._baseline_bytes = 0
        self._floor_allocated_bytes = 0
        self._floor_reserved_bytes = 0
        self._report: MemoryReport | None = None

    def __enter__(self) -> "MemoryProbe":
        if self._owner is not None:
            raise EdgetuneError("this MemoryProbe is already active", "use a new MemoryProbe per region")
        self._report, self._rss = None, _RssWatch()
        self._floor_allocated_bytes = self._floor_reserved_bytes = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        with _RESET_LOCK:
            self._hand_over_peaks()
            self._rss.start()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
                self._baseline_bytes = torch.cuda.memory_allocated(self.device)
            _ACTIVE.append(self)
        self._owner = threading.get_ident()
        if self.device.type == "cpu":
            self._tracker = StorageTracker()
            self._tracker.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self._tracker is not None:
                self._tracker.__exit__(*exc_info)
            self._report = self._read()
        finally:
            self._rss.stop()
            with _RESET_LOCK:
                _ACTIVE.remove(self)
            if self._tracker is not None:
                self._tracker.detach()
                self._tracker = None
            self._owner = None

    @property
    def report(self) -> MemoryReport:
        """The figures for the whole region, available once the ``with`` block has exited.

        Raises:
            EdgetuneError: the region has not finished yet.
        """
        if self._report is None:
            raise EdgetuneError("the probe's region has not finished", "read probe.report after the with block")
        return self._report

    def sample(self) -> MemoryReport:
        """Returns the figures so far, from inside the region; "end" figures are the current ones.

        Raises:
            EdgetuneError: the probe is not active, or (CPU) called from another thread.
        """
        if self._owner is None:
            raise EdgetuneError("sample() called outside the probe's region", "call it inside the with block")
        if self._tracker is not None and self._owner != threading.get_ident():
            raise EdgetuneError("sample() called from another thread", "call it on the thread that entered the probe")
        return self._read()

    def _hand_over_peaks(self) -> None:
        """Gives running probes the peaks that this probe's resets are about to erase."""
        for probe in _ACTIVE:
            if self._rss.source == probe._rss.source == "VmHWM":
                probe._rss.floor_bytes = max(probe._rss.floor_bytes, _read_status()[0])
            if self.device.type == "cuda" and probe.device == self.device:
                allocated_bytes = torch.cuda.max_memory_allocated(self.device)
                reserved_bytes = torch.cuda.max_memory_reserved(self.device)
                probe._floor_allocated_bytes = max(probe._floor_allocated_bytes, allocated_bytes)
                probe._floor_reserved_bytes = max(probe._floor_reserved_bytes, reserved_bytes)

    def _read(self) -> MemoryReport:
        if self._tracker is not None:
            self._tracker.drain()
            figures = dict(
                peak_allocated_bytes=self._tracker.peak_bytes,
                end_allocated_bytes=self._tracker.live_bytes,
                baseline_allocated_bytes=None,
                peak_reserved_bytes=None,
                nvml_used_bytes=None,
                source="dispatch-storage-tracker",
            )
        else:
            figures = self._cuda_figures()
        with _RESET_LOCK:
            rss_peak_bytes = self._rss.peak_bytes()
        return MemoryReport(
            device=str(self.device),
            peak_rss_bytes=rss_peak_bytes,
            start_rss_bytes=self._rss.start_bytes,
            rss_source=self._rss.source,
            **figures,
        )

    def _cuda_figures(self) -> dict[str, Any]:
        torch.cuda.synchronize(self.device)
        with _RESET_LOCK:
            max_bytes = max(self._floor_allocated_bytes, torch.cuda.max_memory_allocated(self.device))
            reserved_bytes = max(self._floor_reserved_bytes, torch.cuda.max_memory_reserved(self.device))
        return dict(
            peak_allocated_bytes=max_bytes - self._baseline_bytes,
            end_allocated_bytes=torch.cuda.memory_allocated(self.device) - self._baseline_bytes,
            baseline_allocated_bytes=self._baseline_bytes,
            peak_reserved_bytes=reserved_bytes,
            nvml_used_bytes=_nvml_used_bytes(self.device.index),
            source="torch.cuda.max_memory_allocated",
        )


def current_memory(device: torch.device | str) -> dict[str, int]:
    """Returns cheap current readings for a per-step training log, in bytes.

    Args:
        device: "cpu", "cuda", "cuda:N" or a torch.device.

    Returns:
        CUDA: ``allocated_bytes``, ``reserved_bytes`` and ``peak_allocated_bytes`` (since the last
        peak reset; a MemoryProbe resets it). CPU: ``rss_bytes`` of the process.

    Raises:
        EdgetuneError: the device is unknown, unsupported or not available.
    """
    resolved = _resolve_device(device)
    if resolved.type == "cuda":
        return {
            "allocated_bytes": torch.cuda.memory_allocated(resolved),
            "reserved_bytes": torch.cuda.memory_reserved(resolved),
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(resolved),
        }
    return {"rss_bytes": _rss_bytes()}


def _resolve_device(device: torch.device | str) -> torch.device:
    fix = "pass 'cpu', 'cuda' or 'cuda:N'"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EdgetuneError(f"unknown device {device!r}", fix) from exc
    if resolved.type == "cpu":
        return torch.device("cpu")
    if resolved.type != "cuda":
        raise EdgetuneError(f"memory probing does not support device {str(resolved)!r}", fix)
    if not torch.cuda.is_available():
        raise EdgetuneError(f"device {str(resolved)!r} requested but CUDA is not available", "pass 'cpu'")
    index = torch.cuda.current_device() if resolved.index is None else resolved.index
    if index >= torch.cuda.device_count():
        raise EdgetuneError(f"device 'cuda:{index}' does not exist", f"{fix} with N < {torch.cuda.device_count()}")
    return torch.device("cuda", index)


def _nvml_used_bytes(index: int) -> int | None:
    """NVML's used bytes for a CUDA device, matched by UUID since CUDA_VISIBLE_DEVICES renumbers."""
    try:
        import pynvml
    except ImportError:
        return None
    uuid = str(torch.cuda.get_device_properties(index).uuid).removeprefix("GPU-").removeprefix("MIG-")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        logger.debug("NVML unavailable: %s", exc)
        return None
    try:
        for prefix in ("GPU-", "MIG-"):
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(prefix + uuid)
            except pynvml.NVMLError:
                continue
            try:
                info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
            except pynvml.NVMLError:  # drivers before the v2 call
                info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return int(info.used)
        logger.debug("no NVML device has UUID %s", uuid)
        return None
    except pynvml.NVMLError as exc:  # e.g. NotSupported on unified-memory boards
        logger.debug("NVML memory query failed: %s", exc)
        return None
    finally:
        pynvml.nvmlShutdown()


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the tensors that live across steps: parameters, buffers, quantization state, optimizer state and
    work buffers.

    Each storage is counted once, so tied weights and views are not double counted. Together with a
    ``MemoryProbe`` around a step (which sees only what the step allocates) this gives the step's total.
    """
    tensors = list(model.parameters()) + list(model.buffers())
    for parameter in model.parameters():
        tensors += _quant_state_tensors(getattr(parameter, "quant_state", None))
    if optimizer is not None:
        # Per-parameter entries are dicts of tensors; some optimizers (HiZOO) also keep plain counters there.
        for state in optimizer.state.values():
            values = state.values() if isinstance(state, dict) else [state]
            tensors += [value for value in values if isinstance(value, torch.Tensor)]
        # HiZOO's perturbation buffers outlive a step but are not optimizer state; the planner prices them apart.
        tensors += list(getattr(optimizer, "work_buffers", list)())
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _quant_state_tensors(state: object) -> list[torch.Tensor]:
    # bitsandbytes keeps NF4 block scales (and, with double quantization, their own scales) beside the
    # packed weight rather than as parameters or buffers.
    if state is None:
        return []
    found = []
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif hasattr(value, "absmax"):
            found += _quant_state_tensors(value)
    return found
