"""Read each visible device's memory without creating a CUDA context.

NVML answers for discrete GPUs: memory v2 first, whose `used` leaves out the driver's reserve, then v1 on
drivers older than ~515 that lack the v2 call. Unified-memory boards (Jetson) report no NVML memory, so their
budget is host RAM from psutil. With no NVIDIA driver the one device is the CPU. Background:
planner-model.md section 4.
"""

import dataclasses
import logging
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any, Literal

import psutil

from edgetune.errors import EdgetuneError
from edgetune.plan.tables import render_table

logger = logging.getLogger(__name__)

Source = Literal["nvml_v2", "nvml_v1", "psutil_unified", "psutil_cpu"]
_SOURCES = ("nvml_v2", "nvml_v1", "psutil_unified", "psutil_cpu")
_GIB = 1024**3


@dataclass(frozen=True)
class DeviceInfo:
    """Memory of one device as this process sees it.

    Attributes:
        index: CUDA index in this process (after CUDA_VISIBLE_DEVICES); -1 for the CPU.
        name: device name from NVML, or the CPU model.
        total_bytes: memory the device has (host RAM for unified boards and the CPU).
        free_bytes: memory free now (psutil `available` for unified boards and the CPU).
        used_bytes: memory in use now.
        unified: True when the GPU shares host RAM (Jetson), so offloading to the CPU frees nothing.
        source: which reader answered.
        uuid: NVML UUID ("GPU-..." or "MIG-..."), None for the CPU.
        compute_capability: (major, minor), None for the CPU or when NVML cannot say.
    """

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    unified: bool
    source: Source
    uuid: str | None = None
    compute_capability: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.index < -1:
            raise ValueError(f"DeviceInfo.index must be -1 (CPU) or a CUDA index >= 0, got {self.index}")
        for field in ("total_bytes", "free_bytes", "used_bytes"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"DeviceInfo.{field} must be a non-negative int of bytes, got {value!r}")
        if self.source not in _SOURCES:
            raise ValueError(f"DeviceInfo.source must be one of {_SOURCES}, got {self.source!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as JSON-ready values.

        Returns:
            A dict of the fields; compute_capability becomes a list or None.
        """
        data = dataclasses.asdict(self)
        data["compute_capability"] = list(self.compute_capability) if self.compute_capability else None
        return data


def parse_visible_devices(value: str | None) -> list[str] | None:
    """Split a CUDA_VISIBLE_DEVICES value into entries, the way the CUDA runtime reads it.

    Args:
        value: the variable's value, or None when it is unset.

    Returns:
        None when unset (every GPU visible). Otherwise the entries in CUDA order: integers normalised
        ("01" -> "1"), "GPU-"/"MIG-" ids kept as written. CUDA ignores everything from the first negative or
        malformed entry on, so the list is cut there and "" or "-1" give [].
    """
    if value is None:
        return None
    entries: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if entry.isascii() and entry.isdigit():
            entries.append(str(int(entry)))
        elif entry.startswith(("GPU-", "MIG-")) and len(entry) > 4:
            entries.append(entry)
        else:
            break
    return entries


def match_visible_devices(
    entries: list[str] | None, gpu_uuids: list[str], mig_uuids: list[str] | None = None
) -> list[str]:
    """Map visible-device entries to NVML UUIDs, in CUDA index order.

    Integers are NVML indices. That equals CUDA order only under CUDA_DEVICE_ORDER=PCI_BUS_ID; read_devices
    sidesteps the assumption with torch's UUIDs when torch has already initialised CUDA.

    Args:
        entries: output of parse_visible_devices, or UUIDs as torch reports them (with or without a
            "GPU-"/"MIG-" prefix; a prefix of a UUID is enough when it is unique). None means every GPU.
        gpu_uuids: NVML UUID of each GPU, by NVML index.
        mig_uuids: NVML UUIDs of the MIG instances, for "MIG-" entries.

    Returns:
        The UUID for CUDA index 0, 1, ... The list stops at the first entry that matches nothing, matches
        several devices or repeats an earlier device, because CUDA hides every device from there on.
    """
    if entries is None:
        return list(gpu_uuids)
    matched: list[str] = []
    for entry in entries:
        uuid = _match_entry(entry, gpu_uuids, mig_uuids or [])
        if uuid is None or uuid in matched:
            logger.debug("visible-device entry %r matches no single new device; ignoring it and the rest", entry)
            break
        matched.append(uuid)
    return matched


def _match_entry(entry: str, gpu_uuids: list[str], mig_uuids: list[str]) -> str | None:
    if entry.isascii() and entry.isdigit():
        index = int(entry)
        return gpu_uuids[index] if index < len(gpu_uuids) else None
    if entry.startswith("GPU-"):
        pool = gpu_uuids
    elif entry.startswith("MIG-"):
        pool = mig_uuids
    else:
        pool = gpu_uuids + mig_uuids
    wanted = _bare_uuid(entry)
    hits = [uuid for uuid in pool if _bare_uuid(uuid).startswith(wanted)]
    return hits[0] if wanted and len(hits) == 1 else None


def _bare_uuid(uuid: str) -> str:
    # torch prints UUIDs without NVML's "GPU-"/"MIG-" prefix, so compare the hex part only.
    if uuid.startswith(("GPU-", "MIG-")):
        uuid = uuid[4:]
    return uuid.lower()


def read_devices() -> list[DeviceInfo]:
    """Read every GPU this process can see, or the CPU when it sees none.

    Returns:
        One DeviceInfo per visible GPU in CUDA index order, or a single CPU entry (index -1).

    Raises:
        EdgetuneError: NVML started but could not read a GPU (lost GPU, driver trouble).
    """
    entries = _torch_visible_uuids()
    if entries is None:
        entries = parse_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))
    if entries == []:
        return [_cpu_device()]
    try:
        import pynvml
    except ImportError:
        logger.debug("pynvml is not importable; reporting the CPU")
        return [_cpu_device()]
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        logger.debug("NVML is unavailable (%s); reporting the CPU", error)
        return [_cpu_device()]
    try:
        devices = _read_nvml_devices(pynvml, entries)
    except pynvml.NVMLError as error:
        raise EdgetuneError(
            f"NVML started but could not read the GPUs: {error}",
            "check that `nvidia-smi` works; after a driver update, reboot",
        ) from error
    finally:
        _shutdown(pynvml)
    return devices or [_cpu_device()]


def _torch_visible_uuids() -> list[str] | None:
    # Without torch loaded this process has no CUDA context, and importing torch just to ask costs seconds.
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


def _read_nvml_devices(pynvml: Any, entries: list[str] | None) -> list[DeviceInfo]:
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    by_uuid = {pynvml.nvmlDeviceGetUUID(handle): handle for handle in handles}
    gpu_uuids = list(by_uuid)
    mig_uuids: list[str] = []
    if entries is not None and any(not (e.isdigit() or e.startswith("GPU-")) for e in entries):
        migs = _mig_handles(pynvml, handles)
        by_uuid.update(migs)
        mig_uuids = list(migs)
    if len(handles) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        if entries is None or any(e.isdigit() for e in entries):
            logger.debug("taking GPU indices as NVML (PCI bus) order; set CUDA_DEVICE_ORDER=PCI_BUS_ID to match")
    visible = match_visible_devices(entries, gpu_uuids, mig_uuids)
    return [_nvml_device(pynvml, index, uuid, by_uuid[uuid]) for index, uuid in enumerate(visible)]


def _mig_handles(pynvml: Any, handles: list[Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for parent in handles:
        try:
            slots = pynvml.nvmlDeviceGetMaxMigDeviceCount(parent)
        except pynvml.NVMLError:
            continue  # not MIG-capable
        for slot in range(slots):
            try:
                mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, slot)
            except pynvml.NVMLError:
                continue  # empty slot
            found[pynvml.nvmlDeviceGetUUID(mig)] = mig
    return found


def _nvml_device(pynvml: Any, index: int, uuid: str, handle: Any) -> DeviceInfo:
    name = pynvml.nvmlDeviceGetName(handle)
    try:
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        capability: tuple[int, int] | None = (int(major), int(minor))
    except pynvml.NVMLError:
        capability = None  # MIG handles may not answer; the figure is informational
    memory, source = _nvml_memory(pynvml, handle)
    if memory is None or memory.total == 0:
        host = psutil.virtual_memory()
        used_bytes = host.total - host.available
        return DeviceInfo(index, name, host.total, host.available, used_bytes, True, "psutil_unified", uuid, capability)
    total_bytes, free_bytes, used_bytes = int(memory.total), int(memory.free), int(memory.used)
    return DeviceInfo(index, name, total_bytes, free_bytes, used_bytes, False, source, uuid, capability)


def _nvml_memory(pynvml: Any, handle: Any) -> tuple[Any | None, Source]:
    try:
        return pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2), "nvml_v2"
    except (pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_NotSupported, pynvml.NVMLError_ArgumentVersionMismatch):
        pass  # drivers before ~515 lack the v2 call; unified boards refuse both versions
    try:
        return pynvml.nvmlDeviceGetMemoryInfo(handle), "nvml_v1"
    except pynvml.NVMLError_NotSupported:
        return None, "psutil_unified"


def _shutdown(pynvml: Any) -> None:
    try:
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as error:
        logger.debug("nvmlShutdown failed: %s", error)


def _cpu_device() -> DeviceInfo:
    host = psutil.virtual_memory()
    return DeviceInfo(-1, _cpu_name(), host.total, host.available, host.total - host.available, False, "psutil_cpu")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux, or /proc not mounted
    return platform.processor() or platform.machine() or "CPU"


def read_device(index: int = 0) -> DeviceInfo:
    """Read one device by its CUDA index.

    Args:
        index: CUDA index as this process sees it; -1 picks the CPU entry on a machine without GPUs.

    Returns:
        That device's DeviceInfo.

    Raises:
        EdgetuneError: no visible device has this index.
    """
    devices = read_devices()
    for device in devices:
        if device.index == index:
            return device
    visible = ", ".join(str(device.index) for device in devices)
    raise EdgetuneError(
        f"device index {index} is not visible (visible: {visible}; -1 is the CPU)",
        "pick a visible index, check CUDA_VISIBLE_DEVICES, or list devices with `edgetune devices`",
    )


def format_devices_table(devices: list[DeviceInfo]) -> str:
    """Render devices as a fixed-width text table for the CLI.

    Args:
        devices: the devices to show, e.g. from read_devices().

    Returns:
        The table, one line per device under a header line, sizes in GiB with two decimals.
    """
    header = ("index", "name", "total GiB", "free GiB", "used GiB", "unified", "source")
    rows = []
    for device in devices:
        sizes = [f"{size / _GIB:.2f}" for size in (device.total_bytes, device.free_bytes, device.used_bytes)]
        index = "cpu" if device.index < 0 else str(device.index)
        rows.append((index, device.name, *sizes, "yes" if device.unified else "no", device.source))
    return render_table(header, rows, numeric={2, 3, 4})
