import json
import re
from pathlib import Path

import pytest
import yaml

from edgetune.errors import EdgetuneError
from edgetune.plan.profiles import (
    DeviceProfile,
    format_profiles_table,
    list_profiles,
    load_profile,
    load_profile_file,
    profiles_dir,
)

GIB = 1024**3
KEYS = [
    "jetson-agx-orin-32gb",
    "jetson-agx-orin-64gb",
    "jetson-orin-nano-8gb",
    "rtx-3050-8gb",
    "rtx-3060-12gb",
    "rtx-3070-8gb",
    "rtx-3080-10gb",
    "rtx-3090-24gb",
    "rtx-4060-8gb",
    "rtx-4060-ti-16gb",
    "rtx-4070-12gb",
    "rtx-4080-16gb",
    "rtx-4090-24gb",
    "rtx-5090-32gb",
]


def test_every_shipped_profile_loads():
    profiles = list_profiles()
    assert [p.key for p in profiles] == KEYS
    assert sorted(path.name for path in profiles_dir().iterdir()) == [f"{key}.yaml" for key in KEYS]
    assert profiles_dir() == Path(__file__).resolve().parents[2] / "profiles"


@pytest.mark.parametrize("key", KEYS)
def test_profile_facts_are_consistent(key):
    profile = load_profile(key)
    path = profiles_dir() / f"{key}.yaml"
    assert path.read_text().startswith("# "), "each file opens with a comment naming its sources"
    assert profile.memory_bytes == int(re.search(r"(\d+)gb$", key).group(1)) * GIB
    assert profile.unified == key.startswith("jetson")
    assert profile.ctx_overhead_bytes is None
    # planner-model.md section 5: peak = SMs x boost clock x per-SM rate. GeForce tensor cores do 512 FLOP/clk
    # with FP32 accumulate (bf16) and twice that with FP16 accumulate; Orin does 2048 at full rate for both.
    sm_ghz = profile.sm_count * profile.boost_clock_ghz
    bf16_rate, fp16_rate = (2048, 2048) if profile.unified else (512, 1024)
    assert profile.bf16_tensor_tflops == pytest.approx(sm_ghz * bf16_rate / 1000, rel=0.01)
    assert profile.fp16_tensor_tflops == pytest.approx(sm_ghz * fp16_rate / 1000, rel=0.01)
    assert profile.fp32_tflops == pytest.approx(sm_ghz * 256 / 1000, rel=0.015)
    assert DeviceProfile(**profile.to_dict()) == profile
    json.dumps(profile.to_dict())


def test_spot_check_against_the_table():
    rtx4090 = load_profile("rtx-4090-24gb")
    assert (rtx4090.memory_bytes, rtx4090.bandwidth_gb_s, rtx4090.sm_count) == (24 * GIB, 1008.0, 128)
    assert (rtx4090.compute_capability, rtx4090.compute_capability_tuple) == ("8.9", (8, 9))
    assert (rtx4090.fp16_tensor_tflops, rtx4090.bf16_tensor_tflops, rtx4090.memory_type) == (330.3, 165.2, "GDDR6X")
    assert isinstance(rtx4090.bandwidth_gb_s, float)
    nano = load_profile("jetson-orin-nano-8gb")
    assert (nano.unified, nano.memory_bytes, nano.compute_capability, nano.bandwidth_gb_s) == (True, 8 * GIB, "8.7", 68)
    assert "Super" in nano.notes and "102 GB/s" in nano.notes
    rtx3080 = load_profile("rtx-3080-10gb")
    assert (rtx3080.memory_bytes, rtx3080.bandwidth_gb_s, rtx3080.sm_count) == (10 * GIB, 760.0, 68)
    rtx5090 = load_profile("rtx-5090-32gb")
    assert (rtx5090.compute_capability_tuple, rtx5090.bf16_tensor_tflops) == ((12, 0), 210.0)
    assert "verify" in rtx5090.notes
    assert load_profile("jetson-agx-orin-64gb").bandwidth_gb_s == 204.8


def test_key_lookup_ignores_case():
    assert load_profile("RTX-4090-24GB").key == "rtx-4090-24gb"


def test_unknown_key_suggests_close_ones():
    with pytest.raises(EdgetuneError) as caught:
        load_profile("rtx4090")
    message = str(caught.value)
    assert "unknown device profile 'rtx4090'" in message
    assert "did you mean 'rtx-4090-24gb'" in message
    assert "edgetune devices --profiles" in message
    with pytest.raises(EdgetuneError) as caught:
        load_profile("zzzz")
    assert "did you mean" not in str(caught.value) and "edgetune devices --profiles" in str(caught.value)


def _good_fields():
    return yaml.safe_load((profiles_dir() / "rtx-4090-24gb.yaml").read_text())


def _write(tmp_path, fields, name="my-gpu.yaml"):
    path = tmp_path / name
    path.write_text(fields if isinstance(fields, str) else yaml.safe_dump(fields))
    return path


def test_copied_profile_loads_from_any_path(tmp_path):
    profile = load_profile_file(_write(tmp_path, _good_fields()))
    assert (profile.key, profile.sm_count) == ("my-gpu", 128)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"sm_count": "many"}, "sm_count"),
        ({"memory_bytes": True}, "memory_bytes"),
        ({"memory_bytes": 24.5}, "memory_bytes"),
        ({"unified": "yes please"}, "unified"),
        ({"bandwidth_gb_s": -1}, "bandwidth_gb_s"),
        ({"boost_clock_ghz": 0}, "boost_clock_ghz"),
        ({"ctx_overhead_bytes": -5}, "ctx_overhead_bytes"),
        ({"compute_capability": 8.6}, "compute_capability"),
        ({"compute_capability": "8"}, "compute_capability"),
        ({"name": " "}, "name"),
        ({"notes": None}, "notes"),
    ],
)
def test_invalid_field_is_named(tmp_path, change, field):
    path = _write(tmp_path, {**_good_fields(), **change})
    with pytest.raises(EdgetuneError, match=rf"{re.escape(str(path))}.*'{field}'"):
        load_profile_file(path)


def test_missing_and_extra_fields_are_named(tmp_path):
    fields = _good_fields()
    del fields["sm_count"]
    path = _write(tmp_path, fields)
    with pytest.raises(EdgetuneError, match=rf"{re.escape(str(path))} lacks field\(s\) sm_count"):
        load_profile_file(path)
    path = _write(tmp_path, {**_good_fields(), "tensor_cores": 512, "key": "x"})
    with pytest.raises(EdgetuneError, match=r"unknown field\(s\) key, tensor_cores"):
        load_profile_file(path)


@pytest.mark.parametrize("text", ["- just\n- a list\n", "name: [unclosed\n", ""])
def test_unparsable_file_is_rejected(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(EdgetuneError, match=re.escape(str(path))):
        load_profile_file(path)


def test_bad_file_name_is_rejected(tmp_path):
    with pytest.raises(EdgetuneError, match="'key'"):
        load_profile_file(_write(tmp_path, _good_fields(), name="My GPU.yaml"))


def test_format_profiles_table():
    profiles = [load_profile("rtx-4090-24gb"), load_profile("jetson-orin-nano-8gb")]
    header, first, second = format_profiles_table(profiles).splitlines()
    assert header.split()[:3] == ["key", "name", "memory"]
    assert first.split()[0] == "rtx-4090-24gb"
    assert first.split()[-6:] == ["24", "no", "1008", "165.2", "8.9", "128"]
    assert second.split()[-6:] == ["8", "yes", "68", "10.2", "8.7", "8"]
    assert header.index("CC") == first.index("8.9") == second.index("8.7")
