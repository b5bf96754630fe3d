import json
import sys
from types import SimpleNamespace

import psutil
import pynvml
import pytest
import torch

from edgetune.errors import EdgetuneError
from edgetune.plan.device import (
    DeviceInfo,
    format_devices_table,
    match_visible_devices,
    parse_visible_devices,
    read_device,
    read_devices,
)

GIB = 1024**3
HOST_TOTAL = 64 * GIB
HOST_AVAILABLE = 40 * GIB
UUID_A = "GPU-aaaa1111-0000-0000-0000-000000000000"
UUID_B = "GPU-bbbb2222-0000-0000-0000-000000000000"
UUID_MIG = "MIG-cccc3333-0000-0000-0000-000000000000"


def nvml_error(code):
    return pynvml.NVMLError(code)  # returns the code's subclass, e.g. NVMLError_NotSupported


def memory(total, free, used):
    return SimpleNamespace(total=total, free=free, used=used)


def gpu(name, uuid, v2, v1=None, cc=(8, 9)):
    """One fake GPU; v2/v1 are memory answers or NVMLError instances to raise."""
    return dict(name=name, uuid=uuid, v2=v2, v1=v1 if v1 is not None else v2, cc=cc)


@pytest.fixture
def fake_nvml(monkeypatch):
    """Install fake GPUs behind the real pynvml module's functions; returns the call log."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=HOST_TOTAL, available=HOST_AVAILABLE))
    calls = []

    def install(gpus, init_error=None, migs=None):
        by_handle = {("gpu", i): spec for i, spec in enumerate(gpus)}
        by_handle.update({("mig", i): spec for i, spec in enumerate(migs or [])})

        def init():
            calls.append("init")
            if init_error is not None:
                raise init_error

        def get_memory(handle, version=None):
            answer = by_handle[handle]["v1" if version is None else "v2"]
            assert version in (None, pynvml.nvmlMemory_v2)
            if isinstance(answer, Exception):
                raise answer
            return answer

        def mig_handle(parent, slot):
            # Slot 0 is empty on every GPU; the MIG instances sit from slot 1 on.
            if slot == 0 or slot > len(migs or []):
                raise nvml_error(pynvml.NVML_ERROR_NOT_FOUND)
            return ("mig", slot - 1)

        patches = dict(
            nvmlInit=init,
            nvmlShutdown=lambda: calls.append("shutdown"),
            nvmlDeviceGetCount=lambda: len(gpus),
            nvmlDeviceGetHandleByIndex=lambda i: ("gpu", i),
            nvmlDeviceGetName=lambda h: by_handle[h]["name"],
            nvmlDeviceGetUUID=lambda h: by_handle[h]["uuid"],
            nvmlDeviceGetCudaComputeCapability=lambda h: by_handle[h]["cc"],
            nvmlDeviceGetMemoryInfo=get_memory,
            nvmlDeviceGetMaxMigDeviceCount=lambda h: 1 + len(migs or []),
            nvmlDeviceGetMigDeviceHandleByIndex=mig_handle,
        )
        for name, function in patches.items():
            monkeypatch.setattr(pynvml, name, function)
        return calls

    return install


TWO_GPUS = [
    gpu("NVIDIA GeForce RTX 4090", UUID_A, memory(24 * GIB, 20 * GIB, 3 * GIB)),
    gpu("NVIDIA GeForce RTX 3060", UUID_B, memory(12 * GIB, 10 * GIB, 1 * GIB), cc=(8, 6)),
]


def test_normal_v2_reads_every_gpu(fake_nvml):
    calls = fake_nvml(TWO_GPUS)
    devices = read_devices()
    assert [d.to_dict() for d in devices] == [
        dict(
            index=0,
            name="NVIDIA GeForce RTX 4090",
            total_bytes=24 * GIB,
            free_bytes=20 * GIB,
            used_bytes=3 * GIB,
            unified=False,
            source="nvml_v2",
            uuid=UUID_A,
            compute_capability=[8, 9],
        ),
        dict(
            index=1,
            name="NVIDIA GeForce RTX 3060",
            total_bytes=12 * GIB,
            free_bytes=10 * GIB,
            used_bytes=1 * GIB,
            unified=False,
            source="nvml_v2",
            uuid=UUID_B,
            compute_capability=[8, 6],
        ),
    ]
    assert calls == ["init", "shutdown"]


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_FUNCTION_NOT_FOUND, pynvml.NVML_ERROR_NOT_SUPPORTED])
def test_missing_v2_falls_back_to_v1(fake_nvml, code):
    # v1's used includes the driver reserve, so it differs from what v2 would say; the numbers must be v1's.
    fake_nvml([gpu("old", UUID_A, nvml_error(code), v1=memory(8 * GIB, 7 * GIB, GIB // 2))])
    (device,) = read_devices()
    assert (device.source, device.total_bytes, device.free_bytes, device.used_bytes) == (
        "nvml_v1",
        8 * GIB,
        7 * GIB,
        GIB // 2,
    )


@pytest.mark.parametrize(
    "v2, v1",
    [
        (nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED), nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)),
        (memory(0, 0, 0), memory(0, 0, 0)),
        (nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND), memory(0, 0, 0)),
    ],
    ids=["not-supported", "total-zero", "v1-total-zero"],
)
def test_jetson_uses_host_memory(fake_nvml, v2, v1):
    fake_nvml([gpu("Orin", UUID_A, v2, v1=v1, cc=(8, 7))])
    (device,) = read_devices()
    assert device == DeviceInfo(
        0, "Orin", HOST_TOTAL, HOST_AVAILABLE, HOST_TOTAL - HOST_AVAILABLE, True, "psutil_unified", UUID_A, (8, 7)
    )


@pytest.mark.parametrize(
    "code",
    [
        pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
        pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    ],
)
def test_no_nvml_gives_cpu_entry(fake_nvml, code):
    calls = fake_nvml(TWO_GPUS, init_error=nvml_error(code))
    (device,) = read_devices()
    assert (device.index, device.source, device.unified, device.uuid, device.compute_capability) == (
        -1,
        "psutil_cpu",
        False,
        None,
        None,
    )
    assert (device.total_bytes, device.free_bytes, device.used_bytes) == (
        HOST_TOTAL,
        HOST_AVAILABLE,
        HOST_TOTAL - HOST_AVAILABLE,
    )
    assert device.name
    assert calls == ["init"]  # no shutdown after a failed init


def test_pynvml_not_importable_gives_cpu_entry(fake_nvml, monkeypatch):
    fake_nvml(TWO_GPUS)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert [d.source for d in read_devices()] == ["psutil_cpu"]


@pytest.mark.parametrize(
    "visible, uuids",
    [
        ("1", [UUID_B]),
        ("1,0", [UUID_B, UUID_A]),
        ("GPU-bbbb", [UUID_B]),
        ("GPU-BBBB2222,0", [UUID_B, UUID_A]),
        ("0,7,1", [UUID_A]),
    ],
)
def test_visible_devices_pick_and_order(fake_nvml, monkeypatch, visible, uuids):
    fake_nvml(TWO_GPUS)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    devices = read_devices()
    assert [d.uuid for d in devices] == uuids
    assert [d.index for d in devices] == list(range(len(uuids)))
    totals = {UUID_A: 24 * GIB, UUID_B: 12 * GIB}
    assert [d.total_bytes for d in devices] == [totals[u] for u in uuids]


@pytest.mark.parametrize("visible", ["", "-1", " -1 "])
def test_no_visible_gpu_gives_cpu_without_nvml(fake_nvml, monkeypatch, visible):
    calls = fake_nvml(TWO_GPUS)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert [d.source for d in read_devices()] == ["psutil_cpu"]
    assert calls == []


def test_mig_entry_reads_the_instance(fake_nvml, monkeypatch):
    fake_nvml(TWO_GPUS, migs=[gpu("A100 MIG 1g.5gb", UUID_MIG, memory(5 * GIB, 4 * GIB, GIB))])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-cccc3333")
    (device,) = read_devices()
    assert (device.name, device.uuid, device.total_bytes) == ("A100 MIG 1g.5gb", UUID_MIG, 5 * GIB)


def test_initialized_torch_orders_by_uuid(fake_nvml, monkeypatch):
    fake_nvml(TWO_GPUS)
    # Contradicts torch on purpose: the UUIDs torch reports must win over the environment variable.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    torch_uuids = [UUID_B[4:], UUID_A[4:]]  # torch prints them without the "GPU-" prefix
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=torch_uuids[i]))
    assert [d.uuid for d in read_devices()] == [UUID_B, UUID_A]


def test_never_creates_a_cuda_context(fake_nvml, monkeypatch):
    fake_nvml(TWO_GPUS)

    def forbidden(*args, **kwargs):
        raise AssertionError("read_devices touched torch.cuda")

    for name in ("mem_get_info", "get_device_properties", "init", "_lazy_init", "device_count"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    assert len(read_devices()) == 2
    read_device(1)
    assert not torch.cuda.is_initialized()


def test_lost_gpu_raises_edgetune_error_and_shuts_down(fake_nvml):
    calls = fake_nvml([gpu("broken", UUID_A, nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST))])
    with pytest.raises(EdgetuneError, match="nvidia-smi"):
        read_devices()
    assert calls == ["init", "shutdown"]


def test_read_device_by_index(fake_nvml):
    fake_nvml(TWO_GPUS)
    assert read_device(1).uuid == UUID_B
    assert read_device().uuid == UUID_A
    with pytest.raises(EdgetuneError, match=r"device index 5 is not visible \(visible: 0, 1"):
        read_device(5)


def _nvml_loads():
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def test_real_machine():
    devices = read_devices()
    for device in devices:
        assert device.total_bytes > 0 and 0 < device.free_bytes <= device.total_bytes
    if not _nvml_loads():
        (device,) = devices
        assert (device.index, device.source) == (-1, "psutil_cpu")
        assert device.total_bytes == psutil.virtual_memory().total
    json.dumps([d.to_dict() for d in devices])


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("", []),
        ("-1", []),
        ("0,1", ["0", "1"]),
        (" 1 , 0 ", ["1", "0"]),
        ("01", ["1"]),
        ("0,-1,1", ["0"]),
        ("0,foo,1", ["0"]),
        ("0,,1", ["0"]),
        ("GPU-abc,1", ["GPU-abc", "1"]),
        ("MIG-abc", ["MIG-abc"]),
        ("GPU-", []),
    ],
)
def test_parse_visible_devices(value, expected):
    assert parse_visible_devices(value) == expected


GPUS = ["GPU-aa11", "GPU-ab22", "GPU-cc33"]
MIGS = ["MIG-dd44"]


@pytest.mark.parametrize(
    "entries, expected",
    [
        (None, GPUS),
        (["2", "0"], ["GPU-cc33", "GPU-aa11"]),
        (["0", "3", "1"], ["GPU-aa11"]),  # CUDA stops at the first invalid index
        (["GPU-ab"], ["GPU-ab22"]),
        (["GPU-a"], []),  # ambiguous prefix
        (["GPU-AA11"], ["GPU-aa11"]),
        (["0", "GPU-aa"], ["GPU-aa11"]),  # the same device twice
        (["MIG-dd"], ["MIG-dd44"]),
        (["GPU-dd"], []),  # a GPU- entry does not match a MIG instance
        (["cc33", "DD44"], ["GPU-cc33", "MIG-dd44"]),  # torch's bare UUIDs
    ],
)
def test_match_visible_devices(entries, expected):
    assert match_visible_devices(entries, GPUS, MIGS) == expected


@pytest.mark.parametrize(
    "field, value", [("total_bytes", -1), ("free_bytes", 1.5), ("used_bytes", True), ("index", -2), ("source", "x")]
)
def test_device_info_rejects_bad_values(field, value):
    fields = dict(index=0, name="g", total_bytes=1, free_bytes=1, used_bytes=0, unified=False, source="nvml_v2")
    with pytest.raises(ValueError, match=field):
        DeviceInfo(**{**fields, field: value})


def test_format_devices_table():
    devices = [
        DeviceInfo(0, "NVIDIA RTX 4090", 24 * GIB, 20 * GIB + GIB // 4, 3 * GIB, False, "nvml_v2", UUID_A, (8, 9)),
        DeviceInfo(-1, "CPU", 64 * GIB, 40 * GIB, 24 * GIB, False, "psutil_cpu"),
    ]
    header, first, second = format_devices_table(devices).splitlines()
    assert header.split() == ["index", "name", "total", "GiB", "free", "GiB", "used", "GiB", "unified", "source"]
    assert first.split()[-5:] == ["24.00", "20.25", "3.00", "no", "nvml_v2"]
    assert second.split() == ["cpu", "CPU", "64.00", "40.00", "24.00", "no", "psutil_cpu"]
    assert header.index("source") == first.index("nvml_v2") == second.index("psutil_cpu")
