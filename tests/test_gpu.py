"""autofit.gpu: the catalog, spec parsing and detection, all on CPU (NVML and torch.cuda are faked where needed)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
from types import SimpleNamespace

import pytest

from autofit import gpu
from autofit.errors import AutofitError, ConfigError, GpuError
from autofit.gpu import CATALOG, GpuInfo, catalog, detect, resolve
from autofit.units import GiB, MiB

REQUIRED_KEYS = [
    "rtx2060", "rtx2060super", "rtx2070", "rtx2070super", "rtx2080", "rtx2080super", "rtx2080ti",
    "rtx3050", "rtx3060", "rtx3060ti", "rtx3070", "rtx3070ti", "rtx3080", "rtx3080-12gb", "rtx3080-20gb",
    "rtx3080ti", "rtx3090", "rtx3090ti",
    "rtx4060", "rtx4060ti", "rtx4060ti-16gb", "rtx4070", "rtx4070super", "rtx4070ti", "rtx4070tisuper",
    "rtx4080", "rtx4080super", "rtx4090",
    "rtx5060ti", "rtx5070", "rtx5070ti", "rtx5080", "rtx5090",
    "rtx3060-laptop", "rtx4060-laptop", "rtx4070-laptop", "rtx4090-laptop",
    "t4", "v100-16gb", "v100-32gb", "a10", "a10g", "l4", "l40s", "a100-40gb", "a100-80gb",
    "h100-sxm", "h100-pcie", "h200", "rtxa6000", "rtx6000ada",
]
NOMINAL_GIB = {
    "rtx3060": 12, "rtx4060-laptop": 8, "rtx3080": 10, "rtx3080-12gb": 12, "rtx3080-20gb": 20, "rtx3060-laptop": 6,
    "rtx4070-laptop": 8, "rtx4090-laptop": 16, "rtx4060ti": 8, "rtx4060ti-16gb": 16, "rtx5060ti": 16, "rtx5090": 32,
    "v100-16gb": 16, "v100-32gb": 32, "a100-40gb": 40, "a100-80gb": 80, "h100-sxm": 80, "h200": 141, "t4": 16,
}


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message
    return message


# --- catalog ---------------------------------------------------------------------------------------------------


def test_catalog_has_every_required_card_once():
    keys = [card.key for card in CATALOG]
    assert len(keys) >= 35
    assert len(set(keys)) == len(keys)
    assert set(REQUIRED_KEYS) <= set(keys)
    assert [info.key for info in catalog()] == keys


@pytest.mark.parametrize("key, gib", NOMINAL_GIB.items())
def test_nominal_memory_is_binary(key, gib):
    card = next(card for card in CATALOG if card.key == key)
    assert card.nominal_bytes == gib * GiB


@pytest.mark.parametrize("info", catalog(), ids=lambda info: info.key)
def test_catalog_figures_are_plausible(info):
    card = next(card for card in CATALOG if card.key == info.key)
    assert info.source == "catalog" and info.index is None
    # a desktop GeForce card drives a display; laptop and data-centre cards are planned with all memory free
    others = gpu.DISPLAY_ALLOWANCE if card.drives_display else 0
    assert info.used_by_others_bytes == others and info.free_bytes == info.total_bytes - others
    assert card.drives_display == ("GeForce" in info.name and "Laptop" not in info.name)
    # the driver keeps back a little (and ECC a sixteenth) but never more than 10 %, or 512 MiB of a small card
    assert card.nominal_bytes - max(card.nominal_bytes // 10, 512 * MiB) <= info.total_bytes < card.nominal_bytes
    assert info.bf16 == (info.compute_capability >= (8, 0))
    assert info.family != "unknown"
    assert info.peak_tflops_16 is None or 2 <= info.peak_tflops_16 <= 1000  # a GTX 1650's FP32 rate is 2.98
    assert info.bandwidth_gbs is None or 100 <= info.bandwidth_gbs <= 5000


def test_turing_and_volta_have_no_bf16():
    for key in ("rtx2060", "rtx2080ti", "t4", "v100-16gb", "v100-32gb", "gtx1080", "gtx1660ti", "p100"):
        assert resolve(key).bf16 is False
    assert resolve("rtx3060").bf16 is True


@pytest.mark.parametrize("spec, key, family, tflops", [
    # no tensor cores: CUDA cores x 2 x boost clock, the FP32 rate PyTorch's fp16 matmuls run at
    ("gtx1080", "gtx1080", "pascal", 8.87),            # 2560 x 2 x 1733 MHz
    ("GeForce GTX 1080 Ti", "gtx1080ti", "pascal", 11.34),  # 3584 x 2 x 1582 MHz
    ("1060", "gtx1060", "pascal", 4.37),
    ("Tesla P100-PCIE-16GB", "p100", "pascal", 9.53),
    ("gtx 1650", "gtx1650", "turing", 2.98),
    ("NVIDIA GeForce GTX 1660 SUPER", "gtx1660super", "turing", 5.03),
    ("1660ti", "gtx1660ti", "turing", 5.44),
    # laptop variants: the GeForce rule at the boost clock of their largest power design
    ("RTX 3050 Laptop", "rtx3050-laptop", "ampere", 14.3),
    ("rtx3070 laptop", "rtx3070-laptop", "ampere", 31.9),
    ("NVIDIA GeForce RTX 3080 Laptop GPU", "rtx3080-laptop", "ampere", 38.0),
    ("4050 laptop", "rtx4050-laptop", "ada", 24.3),
    ("rtx4080-laptop", "rtx4080-laptop", "ada", 49.4),
])
def test_pascal_gtx16_and_laptop_cards(spec, key, family, tflops):
    info = resolve(spec)
    assert (info.key, info.family, info.peak_tflops_16) == (key, family, tflops)
    assert info.bf16 is (family in ("ampere", "ada"))
    laptop = "Laptop" in info.name
    assert info.used_by_others_bytes == (0 if laptop or key == "p100" else gpu.DISPLAY_ALLOWANCE)


def test_display_allowance_can_be_overridden():
    card = resolve("rtx3060")
    assert card.used_by_others_bytes == 512 * MiB and card.free_bytes == card.total_bytes - 512 * MiB
    headless = gpu.with_reserved_by_others(card, 0)
    assert headless.free_bytes == headless.total_bytes and headless.used_by_others_bytes == 0
    busy = gpu.with_reserved_by_others(card, 2 * GiB)
    assert busy.free_bytes == card.total_bytes - 2 * GiB
    for bad in (-1, card.total_bytes, True):
        with pytest.raises(GpuError) as err:
            gpu.with_reserved_by_others(card, bad)
        one_line(err.value)
    assert resolve("a100-80gb").used_by_others_bytes == 0


@pytest.mark.parametrize("key, total", [
    ("rtx3090", 25_286_672_384),
    ("rtx4090", 25_386_352_640),
    ("a100-80gb", 85_100_068_864),
    ("h100-sxm", 85_045_477_376),
    ("t4", 15095 * MiB),
    ("rtx3060", (12 * 1024 - 512) * MiB),      # the rule: 12 GiB less 512 MiB
    ("h200", (141 * GiB - 141 * GiB // 100) // MiB * MiB),  # the rule: 1 % of a large card
    ("a10g", (24 * 1024 * 15 // 16 - 512) * MiB),  # the rule with ECC: 15/16 of 24 GiB less 512 MiB
])
def test_exact_totals(key, total):
    assert resolve(key).total_bytes == total


def test_rule_agrees_with_every_measured_card():
    """The reserve rule is fitted to the public deviceQuery figures; it stays within 256 MiB of each."""
    measured = [card for card in CATALOG if card.reported_bytes is not None]
    assert len(measured) >= 10
    for card in measured:
        rule = gpu._reported_total(card.nominal_bytes, card.ecc)
        assert abs(rule - card.reported_bytes) <= 256 * MiB, card.key


@pytest.mark.parametrize("sms, boost_mhz, whitepaper", [
    (68, 1545, 53.8),   # RTX 2080 Ti, Turing whitepaper
    (46, 1710, 40.3),   # RTX 2080
    (36, 1620, 29.9),   # RTX 2070
    (46, 1725, 40.6),   # RTX 3070, GA102 whitepaper
    (68, 1710, 59.5),   # RTX 3080
    (76, 2505, 97.5),   # RTX 4080, Ada whitepaper
    (128, 2520, 165.2),  # RTX 4090
    (170, 2407, 209.5),  # RTX 5090
])
def test_geforce_rate_reproduces_whitepapers(sms, boost_mhz, whitepaper):
    assert gpu._geforce_tflops(sms, boost_mhz) == pytest.approx(whitepaper, abs=0.25)


# --- the catalog file (autofit/catalog/gpus.json) --------------------------------------------------------------

FIGURES = ("reported_bytes", "peak_tflops_16", "bandwidth_gbs")


def catalog_data() -> dict:
    """A fresh parse of the catalog file, free to change."""
    return json.loads(gpu._CATALOG_FILE.read_text(encoding="utf-8"))


def card_entry(data: dict, key: str) -> dict:
    return next(entry for entry in data["cards"] if entry["key"] == key)


def test_catalog_file_builds_the_catalog_once():
    assert gpu._parse_catalog(catalog_data()) == CATALOG
    assert gpu._load_catalog() is CATALOG
    entry = card_entry(catalog_data(), "rtx3060")  # the GeForce rule is applied by the loader
    assert entry["peak_tflops_16"] == {"geforce_rule": {"sms": 28, "boost_mhz": 1777}}
    assert resolve("rtx3060").peak_tflops_16 == gpu._geforce_tflops(28, 1777) == 25.5


def test_every_figure_in_the_catalog_file_has_a_source():
    data = catalog_data()
    assert data["compute_capability_source"].strip()
    for entry in data["cards"]:
        for figure in FIGURES:
            source = entry.get(f"{figure}_source")
            if entry[figure] is None:
                assert source is None, f"{entry['key']}: {figure} is null but has a source"
                if figure != "reported_bytes":  # a null total means the rule applies; a null speed needs a reason
                    assert entry.get("note", "").strip(), f"{entry['key']}: unknown {figure} without a note"
            else:
                assert isinstance(source, str) and source.strip(), f"{entry['key']}: {figure} has no source"
    used = " ".join(entry.get(f"{figure}_source") or "" for entry in data["cards"] for figure in FIGURES)
    for abbreviation in data["sources"]:  # every legend entry is cited somewhere
        assert abbreviation in used, abbreviation


def _set(key: str, field: str, value):
    return lambda data: card_entry(data, key).__setitem__(field, value)


@pytest.mark.parametrize("change, words", [
    pytest.param(_set("rtx3060", "tdp_w", 170), ["card rtx3060", "unknown field 'tdp_w'"], id="unknown-field"),
    pytest.param(lambda data: card_entry(data, "rtx3060").pop("ecc"), ["card rtx3060", "missing field 'ecc'"],
                 id="missing-field"),
    pytest.param(lambda data: card_entry(data, "rtx3060").pop("bandwidth_gbs_source"),
                 ["card rtx3060", "bandwidth_gbs_source"], id="figure-without-source"),
    pytest.param(_set("rtx3080-20gb", "peak_tflops_16_source", "TPU"), ["card rtx3080-20gb", "peak_tflops_16_source"],
                 id="source-for-unknown-figure"),
    pytest.param(lambda data: data["cards"].append(dict(card_entry(data, "rtx3060"))),
                 ["card rtx3060", "key", "already a name of rtx3060"], id="duplicate-key"),
    pytest.param(_set("rtx3080-12gb", "aliases", ["RTX 3080 10GB"]),
                 ["card rtx3080-12gb", "aliases", "already a name of rtx3080"], id="duplicate-alias"),
    pytest.param(_set("rtx3060", "aliases", ["RTX 3060"]), ["card rtx3060", "aliases", "already a name of rtx3060"],
                 id="alias-of-its-own-key"),
    pytest.param(_set("rtx3060", "nominal_gib", "12"), ["card rtx3060", "nominal_gib"], id="size-as-text"),
    pytest.param(_set("rtx3060", "nominal_gib", True), ["card rtx3060", "nominal_gib"], id="size-as-bool"),
    pytest.param(_set("t4", "ecc", "yes"), ["card t4", "ecc"], id="ecc-as-text"),
    pytest.param(_set("rtx3060", "compute_capability", [8]), ["card rtx3060", "compute_capability"], id="cc"),
    pytest.param(_set("rtx3060", "aliases", "3060"), ["card rtx3060", "aliases"], id="aliases-as-text"),
    pytest.param(_set("rtx3060", "section", "ampere"), ["card rtx3060", "section"], id="unknown-section"),
    pytest.param(_set("rtx3060", "section", ["ampere-geforce"]), ["card rtx3060", "section"], id="section-as-list"),
    pytest.param(_set("rtx3090", "reported_bytes", 2.5e10), ["card rtx3090", "reported_bytes"], id="bytes-as-float"),
    pytest.param(_set("rtx3060", "peak_tflops_16", "25.5"), ["card rtx3060", "peak_tflops_16"], id="peak-as-text"),
    pytest.param(_set("rtx3060", "peak_tflops_16", {"geforce_rule": {"sms": 28}}), ["card rtx3060", "peak_tflops_16"],
                 id="geforce-rule-without-clock"),
    pytest.param(_set("rtx3060", "bandwidth_gbs", 0), ["card rtx3060", "bandwidth_gbs"], id="zero-bandwidth"),
    pytest.param(_set("rtx3060", "bandwidth_gbs", float("inf")), ["card rtx3060", "bandwidth_gbs"],
                 id="infinite-bandwidth"),
    pytest.param(_set("rtx3060", "key", 3060), ["card #16", "key"], id="key-as-number"),
    pytest.param(lambda data: data["cards"].__setitem__(0, "rtx2060"), ["card #1"], id="card-as-text"),
    pytest.param(lambda data: data.__setitem__("gpus", []), ["unknown field 'gpus'"], id="unknown-top-field"),
    pytest.param(lambda data: data.pop("sources"), ["missing field 'sources'"], id="missing-legend"),
])
def test_malformed_catalog_names_the_card_and_field(change, words):
    data = catalog_data()
    change(data)
    with pytest.raises(GpuError) as err:
        gpu._parse_catalog(data)
    message = one_line(err.value)
    assert message.startswith("gpus.json: ")
    for word in words:
        assert word in message


def test_unreadable_catalog_file_is_one_line(monkeypatch, tmp_path):
    broken = tmp_path / "gpus.json"
    broken.write_text('{"cards": [', encoding="utf-8")
    monkeypatch.setattr(gpu, "_CATALOG_FILE", broken)
    with pytest.raises(GpuError) as err:
        gpu._load_catalog.__wrapped__()  # past the cache, which holds the real file's cards
    assert one_line(err.value).startswith("cannot read the GPU catalog ")


def test_repeated_field_in_the_catalog_file_is_refused(monkeypatch, tmp_path):
    """json.loads would keep the second of two peak_tflops_16 lines silently; the loader names the card."""
    text = gpu._CATALOG_FILE.read_text(encoding="utf-8")
    first = '"peak_tflops_16": {"geforce_rule": {"sms": 28, "boost_mhz": 1777}},'
    assert text.count(first) == 1
    repeated = tmp_path / "gpus.json"
    repeated.write_text(text.replace(first, first + ' "peak_tflops_16": 30.0,'), encoding="utf-8")
    monkeypatch.setattr(gpu, "_CATALOG_FILE", repeated)
    with pytest.raises(GpuError) as err:
        gpu._load_catalog.__wrapped__()
    message = one_line(err.value)
    assert "card rtx3060" in message and "'peak_tflops_16' appears twice" in message


# --- resolve ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, key", [
    ("rtx3060", "rtx3060"), ("RTX 3060", "rtx3060"), ("3060", "rtx3060"), ("rtx_3060", "rtx3060"),
    ("NVIDIA GeForce RTX 3060", "rtx3060"), ("rtx3060 12gb", "rtx3060"), ("  rtx-3060  ", "rtx3060"),
    ("rtx4060-laptop", "rtx4060-laptop"), ("RTX 4060 Laptop", "rtx4060-laptop"),
    ("NVIDIA GeForce RTX 4060 Laptop GPU", "rtx4060-laptop"), ("4060 laptop", "rtx4060-laptop"),
    ("rtx 3080 20gb", "rtx3080-20gb"), ("RTX 3080 12GB", "rtx3080-12gb"), ("3080", "rtx3080"),
    ("rtx3080 10gb", "rtx3080"), ("4060ti", "rtx4060ti"), ("4060 Ti 16GB", "rtx4060ti-16gb"),
    ("a100-80gb", "a100-80gb"), ("A100 80GB", "a100-80gb"), ("a100", "a100-80gb"), ("A100 40GB", "a100-40gb"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("h100", "h100-sxm"), ("H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("v100", "v100-16gb"), ("V100 32GB", "v100-32gb"),
    ("Tesla T4", "t4"), ("t4", "t4"), ("L40S", "l40s"), ("A10G", "a10g"), ("a6000", "rtxa6000"),
    ("RTX 6000 Ada", "rtx6000ada"), ("NVIDIA RTX 6000 Ada Generation", "rtx6000ada"),
    ("RTX 4070 Ti SUPER", "rtx4070tisuper"), ("rtx5090", "rtx5090"), ("H200", "h200"),
])
def test_catalog_names_resolve(spec, key):
    info = resolve(spec)
    assert info.key == key
    assert info.source == "catalog"


@pytest.mark.parametrize("spec, total", [
    ("12GB", 12 * GiB), ("12GiB", 12 * GiB), ("8 GB", 8 * GiB), ("11264MiB", 11264 * MiB), ("24g", 24 * GiB),
    ("1.5GiB", 3 * GiB // 2),
])
def test_sizes_resolve_to_exact_bytes(spec, total):
    info = resolve(spec)
    assert info.total_bytes == info.free_bytes == total
    assert info.key is None and info.source == "size" and info.used_by_others_bytes == 0
    assert info.compute_capability is None and info.bf16 is False  # unless told: precision="bf16"
    assert info.peak_tflops_16 is None and info.bandwidth_gbs is None
    assert info.name.endswith(" card") and "GiB" in info.name


def test_gpuinfo_resolves_to_itself():
    info = resolve("rtx3060")
    assert resolve(info) is info


def test_unknown_name_lists_close_matches():
    with pytest.raises(GpuError) as err:
        resolve("rtx3070x")
    message = one_line(err.value)
    assert message.startswith("unknown GPU 'rtx3070x'; closest: rtx3070, rtx3070ti, rtx3060;")
    assert "autofit gpus" in message and "12GiB" in message


def test_bare_number_is_a_model_not_a_size():
    assert resolve("1080").key == "gtx1080"  # a GTX 1080, not 1080 GiB
    with pytest.raises(GpuError) as err:
        resolve("1090")
    message = one_line(err.value)
    assert "closest: gtx1060, gtx1080, 3090" not in message and "cuda:1090" in message
    assert message.startswith("unknown GPU '1090'; closest: gtx1080, gtx1060, rtx3090;")


@pytest.mark.parametrize("typed, closest", [
    ("rtx3600", "rtx3060, rtx4060, rtx3090"),  # two digits swapped: one edit from the 3060
    ("rtx4600", "rtx4060, rtx4090, rtx4080"),
    ("rtx3070x", "rtx3070, rtx3070ti, rtx3060"),
    ("gtx1008", "gtx1080, gtx1060"),
    ("gtx1606", "gtx1660, gtx1650, gtx1060"),  # 1606 is one swap from 1660
])
def test_typos_are_matched_by_edits_digits_included(typed, closest):
    with pytest.raises(GpuError) as err:
        resolve(typed)
    assert f"unknown GPU '{typed}'; closest: {closest};" in one_line(err.value)


@pytest.mark.parametrize("spec", ["cuda:x", "cuda:-1", "-3GB", "0GB", "", "   ", "12 parsecs", True, 3.5, [0], -1])
def test_malformed_specs_raise_one_line(spec, no_gpu):
    with pytest.raises((GpuError, ConfigError)) as err:
        resolve(spec)
    one_line(err.value)
    assert isinstance(err.value, AutofitError)


def test_no_gpu_means_name_a_card(no_gpu):
    for spec in (None, "cuda"):
        with pytest.raises(GpuError) as err:
            resolve(spec)
        assert one_line(err.value) == ("no CUDA GPU detected; name the card you plan for, "
                                       "e.g. gpu='rtx3060' or gpu='12GiB'")
    for spec in ("cuda:1", 1):
        with pytest.raises(GpuError) as err:
            resolve(spec)
        assert "found 0 devices" in one_line(err.value)


# --- GpuInfo ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("name", ""), ("key", ""), ("total_bytes", 0), ("total_bytes", -1), ("total_bytes", 1.5),
    ("free_bytes", -1), ("free_bytes", 13 * GiB), ("used_by_others_bytes", -5), ("compute_capability", (8,)),
    ("compute_capability", [8, 6]), ("bf16", 1), ("peak_tflops_16", 0), ("bandwidth_gbs", -360.0),
    ("index", -1), ("source", "guess"),
])
def test_gpuinfo_validation_names_the_field(field, value):
    good = resolve("rtx3060")
    with pytest.raises(GpuError) as err:
        dataclasses.replace(good, **{field: value})
    assert f"GpuInfo.{field}" in one_line(err.value)


@pytest.mark.parametrize("cc, family", [
    ((7, 0), "volta"), ((7, 5), "turing"), ((8, 0), "ampere"), ((8, 6), "ampere"), ((8, 7), "ampere"),
    ((8, 9), "ada"), ((9, 0), "hopper"), ((10, 0), "blackwell"), ((12, 0), "blackwell"), ((6, 1), "pascal"),
    ((5, 2), "unknown"),
    (None, "unknown"),
])
def test_family(cc, family):
    assert dataclasses.replace(resolve("12GiB"), compute_capability=cc).family == family


# --- detect ----------------------------------------------------------------------------------------------------


def test_detect_without_a_gpu_returns_empty():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert detect() == []


class FakeNVMLError(Exception):
    pass


def fake_device(name, uuid, *, total_gib, reserved_mib=0, used_mib=0, cc=(8, 6), compute=(), graphics=()):
    """One NVML device; ``compute``/``graphics`` are (pid, usedGpuMemory bytes or None) pairs."""
    total = total_gib * GiB
    used = used_mib * MiB
    reserved = reserved_mib * MiB
    return {"name": name, "uuid": uuid, "total": total, "reserved": reserved, "used": used,
            "free": total - reserved - used, "cc": cc,
            "compute": None if compute is None else list(compute),  # None: the list is not supported
            "graphics": None if graphics is None else list(graphics)}


def fake_nvml(devices, *, init_error=None, v2=True, broken=()):
    """A stand-in for nvidia-ml-py's ``pynvml`` module; records init/shutdown calls in ``.calls``."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = FakeNVMLError
    nvml.calls = []

    def init():
        nvml.calls.append("init")
        if init_error is not None:
            raise init_error

    def memory(handle, version=None):
        if handle["name"] in broken:
            raise FakeNVMLError("GPU is lost")
        if version is not None:
            if not v2:
                raise FakeNVMLError("Function Not Found")
            return SimpleNamespace(total=handle["total"], reserved=handle["reserved"], free=handle["free"],
                                   used=handle["used"])
        # v1: the reserve shows up as used memory
        return SimpleNamespace(total=handle["total"], free=handle["free"], used=handle["used"] + handle["reserved"])

    def processes(kind):
        def get(handle):
            if handle[kind] is None:
                raise FakeNVMLError("Not Supported")
            return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in handle[kind]]
        return get

    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: nvml.calls.append("shutdown")
    nvml.nvmlDeviceGetCount = lambda: len(devices)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: devices[i]
    nvml.nvmlDeviceGetName = lambda handle: handle["name"].encode()  # older bindings return bytes
    nvml.nvmlDeviceGetUUID = lambda handle: handle["uuid"]
    nvml.nvmlMemory_v2 = 0x02000028
    nvml.nvmlDeviceGetMemoryInfo = memory
    nvml.nvmlDeviceGetCudaComputeCapability = lambda handle: handle["cc"]
    nvml.nvmlDeviceGetComputeRunningProcesses = processes("compute")
    nvml.nvmlDeviceGetGraphicsRunningProcesses = processes("graphics")
    return nvml


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)


@pytest.fixture
def no_torch_gpu(monkeypatch):
    """A torch whose CUDA is unavailable, so the fallback is deterministic on any machine."""
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: False)))


@pytest.fixture
def no_gpu(monkeypatch, clean_env, no_torch_gpu):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([]))


OTHER = os.getpid() + 1


def two_cards():
    return [
        fake_device("NVIDIA GeForce RTX 3060", "GPU-aaaa1111-0000", total_gib=12, reserved_mib=300, used_mib=1800,
                    compute=[(os.getpid(), 512 * MiB), (OTHER, 1 * GiB)], graphics=[(OTHER + 1, 256 * MiB)]),
        fake_device("NVIDIA GeForce RTX 4090", "GPU-bbbb2222-0000", total_gib=24, reserved_mib=400, cc=(8, 9)),
    ]


def test_detect_reads_nvml(monkeypatch, clean_env):
    nvml = fake_nvml(two_cards())
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    first, second = detect()
    assert first == GpuInfo(name="NVIDIA GeForce RTX 3060", key="rtx3060", total_bytes=12 * GiB - 300 * MiB,
                            free_bytes=12 * GiB - 2100 * MiB, used_by_others_bytes=1 * GiB + 256 * MiB,
                            compute_capability=(8, 6), bf16=True, peak_tflops_16=25.5, bandwidth_gbs=360.0,
                            index=0, source="nvml")
    assert (second.key, second.index, second.used_by_others_bytes, second.family) == ("rtx4090", 1, 0, "ada")
    assert nvml.calls == ["init", "shutdown"]
    assert resolve(None) == first
    assert resolve("cuda:1") == resolve(1) == second


def test_own_process_is_not_counted_and_shared_pids_count_once(monkeypatch, clean_env):
    device = fake_device("NVIDIA GeForce RTX 3060", "GPU-a", total_gib=12, used_mib=3000,
                         compute=[(os.getpid(), 2 * GiB), (OTHER, 700 * MiB)], graphics=[(OTHER, 700 * MiB)])
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([device]))
    assert detect()[0].used_by_others_bytes == 700 * MiB


def test_unknown_process_usage_falls_back_to_used_memory(monkeypatch, clean_env):
    device = fake_device("NVIDIA GeForce RTX 3060", "GPU-a", total_gib=12, used_mib=3000,
                         compute=[(os.getpid(), 1 * GiB), (OTHER, None)], graphics=[(OTHER + 1, 2**64 - 1)])
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([device]))
    assert detect()[0].used_by_others_bytes == 3000 * MiB - 1 * GiB


def test_missing_process_lists_fall_back_to_used_memory(monkeypatch, clean_env):
    device = fake_device("NVIDIA GeForce RTX 3060", "GPU-a", total_gib=12, used_mib=900, compute=None, graphics=None)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([device]))
    assert detect()[0].used_by_others_bytes == 900 * MiB


def test_old_driver_without_memory_v2(monkeypatch, clean_env):
    device = fake_device("NVIDIA GeForce RTX 3060", "GPU-a", total_gib=12, reserved_mib=300, used_mib=100,
                         compute=None, graphics=None)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([device], v2=False))
    info = detect()[0]
    assert info.total_bytes == 12 * GiB
    assert info.used_by_others_bytes == 400 * MiB  # v1 used includes the reserve


def test_variants_are_told_apart_by_memory(monkeypatch, clean_env):
    devices = [fake_device("NVIDIA GeForce RTX 3080", "GPU-a", total_gib=12, reserved_mib=400),
               fake_device("NVIDIA GeForce RTX 3080", "GPU-b", total_gib=10, reserved_mib=400),
               fake_device("NVIDIA GeForce RTX 3080 Ti Laptop GPU", "GPU-c", total_gib=16)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices))
    assert [info.key for info in detect()] == ["rtx3080-12gb", "rtx3080", None]
    unknown = detect()[2]
    assert unknown.peak_tflops_16 is None and unknown.compute_capability == (8, 6) and unknown.bf16


@pytest.mark.parametrize("visible, expected", [
    ("1", [("rtx4090", 0)]),
    ("1,0", [("rtx4090", 0), ("rtx3060", 1)]),
    ("GPU-bbbb", [("rtx4090", 0)]),
    ("GPU-aaaa1111-0000,GPU-bbbb2222-0000", [("rtx3060", 0), ("rtx4090", 1)]),
    ("0,7,1", [("rtx3060", 0)]),   # CUDA stops at the first invalid entry
    ("0,0,1", [("rtx3060", 0)]),   # and at a repeated one
    ("GPU-", []),                   # an ambiguous UUID prefix is invalid
    ("", []),
    ("-1", []),
    ("MIG-5b1f3c2e-0000,1", [("rtx4090", 1)]),  # a MIG slice keeps its number but is not described
])
def test_cuda_visible_devices(monkeypatch, clean_env, visible, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(two_cards()))
    assert [(info.key, info.index) for info in detect()] == expected


def test_nvml_init_failure_gives_empty(monkeypatch, clean_env, no_torch_gpu):
    nvml = fake_nvml(two_cards(), init_error=FakeNVMLError("NVML Shared Library Not Found"))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert detect() == []
    assert nvml.calls == ["init"]


def test_missing_binding_gives_empty(monkeypatch, clean_env, no_torch_gpu):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert detect() == []


def test_broken_device_is_skipped_and_nvml_shut_down(monkeypatch, clean_env):
    nvml = fake_nvml(two_cards(), broken=("NVIDIA GeForce RTX 3060",))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert [(info.key, info.index) for info in detect()] == [("rtx4090", 1)]
    assert nvml.calls == ["init", "shutdown"]


def test_nvml_failure_mid_way_shuts_down_and_falls_back(monkeypatch, clean_env, no_torch_gpu):
    nvml = fake_nvml(two_cards())

    def count():
        raise FakeNVMLError("Unknown Error")

    nvml.nvmlDeviceGetCount = count
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert detect() == []
    assert nvml.calls == ["init", "shutdown"]


def test_torch_fallback(monkeypatch, clean_env):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([], init_error=FakeNVMLError("Driver Not Loaded")))
    total, free = 24 * GiB - 366 * MiB, 20 * GiB
    cuda = SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 1,
        get_device_properties=lambda i: SimpleNamespace(name="NVIDIA GeForce RTX 4090", major=8, minor=9),
        mem_get_info=lambda i: (free, total), memory_reserved=lambda i: 0)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    (info,) = detect()
    assert (info.source, info.key, info.index, info.total_bytes) == ("torch", "rtx4090", 0, total)
    assert info.used_by_others_bytes == total - free and info.peak_tflops_16 == 165.2


def test_torch_fallback_errors_give_empty(monkeypatch, clean_env):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([], init_error=FakeNVMLError("Driver Not Loaded")))

    def broken():
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=SimpleNamespace(is_available=broken)))
    assert detect() == []


def test_missing_device_lists_what_was_found(monkeypatch, clean_env):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(two_cards()))
    with pytest.raises(GpuError) as err:
        resolve("cuda:5")
    message = one_line(err.value)
    assert "found 2 device(s)" in message and "cuda:1 NVIDIA GeForce RTX 4090" in message


def test_process_memory_reads_our_own_process(monkeypatch, clean_env):
    mine = os.getpid()
    devices = [fake_device("NVIDIA GeForce RTX 3060", "GPU-aaaa", total_gib=12, compute=[(mine, 3 * GiB), (1, GiB)]),
               fake_device("NVIDIA A100-SXM4-80GB", "GPU-bbbb", total_gib=80, compute=[(1, GiB)])]
    nvml = fake_nvml(devices)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert gpu.process_memory(0) == 3 * GiB
    assert gpu.process_memory(1) is None  # not ours
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert gpu.process_memory(1) == 3 * GiB  # torch's device 1 is NVML's device 0
    assert nvml.calls.count("init") == nvml.calls.count("shutdown")
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices, init_error=FakeNVMLError("no driver")))
    assert gpu.process_memory(0) is None


def test_host_speed_is_measured_once_and_kept(monkeypatch, tmp_path):
    measured = []

    def fake():
        measured.append(1)
        return gpu.HostSpeed(matmul_tflops=0.05, bandwidth_gbs=20.0, threads=2, source="measured")

    monkeypatch.setattr(gpu, "measure_host_speed", fake)
    monkeypatch.setenv("AUTOFIT_CACHE", str(tmp_path))
    gpu.host_speed.cache_clear()
    try:
        first = gpu.host_speed()
        gpu.host_speed.cache_clear()  # a new process: the figure comes from the cache folder
        second = gpu.host_speed()
    finally:
        gpu.host_speed.cache_clear()
    assert measured == [1] and first.source == "measured" and second.source == "cached"
    assert (second.matmul_tflops, second.bandwidth_gbs) == (0.05, 20.0)
    assert (tmp_path / gpu.HOST_SPEED_FILE).exists()
