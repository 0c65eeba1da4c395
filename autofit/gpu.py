"""Know the card: which GPU a plan is for, how much memory it has, and how fast it computes and moves data.

A card comes from one of three places: a detected device (NVML through the official ``nvidia-ml-py`` binding,
falling back to ``torch.cuda``), the built-in catalog below (``rtx3060``, ``A100 80GB``, ...), or a bare memory
size (``12GiB``). Every quirk of NVML lives in this module. Bytes are ints; GiB appears only when printing.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from autofit.errors import GpuError
from autofit.units import GiB, MiB, fmt_bytes, parse_size

log = logging.getLogger(__name__)

_SOURCES = ("catalog", "size", "nvml", "torch", "host")


@dataclass(frozen=True, kw_only=True, slots=True)
class GpuInfo:
    """One card as the planner sees it. Memory in bytes, compute in TFLOPS, bandwidth in GB/s (10**9 B/s).

    ``total_bytes`` is what the driver reports as total (``torch.cuda.mem_get_info()[1]``), not the size on the box.
    ``peak_tflops_16`` is the dense FP16/BF16 tensor-core rate with FP32 accumulate, the rate a bf16 matmul in
    PyTorch can reach. ``index`` is the CUDA device index as torch numbers devices (after CUDA_VISIBLE_DEVICES).
    Raises ``GpuError`` naming the field when a value is out of range.
    """

    name: str
    key: str | None
    total_bytes: int
    free_bytes: int
    used_by_others_bytes: int
    compute_capability: tuple[int, int] | None
    bf16: bool
    peak_tflops_16: float | None
    bandwidth_gbs: float | None
    index: int | None = None
    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise GpuError(f"GpuInfo.name must be a non-empty string, got {self.name!r}")
        if self.key is not None and (not isinstance(self.key, str) or not self.key):
            raise GpuError(f"GpuInfo.key must be a catalog key or None, got {self.key!r}")
        if not _is_int(self.total_bytes) or self.total_bytes <= 0:
            raise GpuError(f"GpuInfo.total_bytes must be a positive number of bytes, got {self.total_bytes!r}")
        if not _is_int(self.free_bytes) or not 0 <= self.free_bytes <= self.total_bytes:
            raise GpuError(f"GpuInfo.free_bytes must be between 0 and total_bytes ({self.total_bytes}), "
                           f"got {self.free_bytes!r}")
        if not _is_int(self.used_by_others_bytes) or self.used_by_others_bytes < 0:
            raise GpuError(f"GpuInfo.used_by_others_bytes must be a byte count >= 0, "
                           f"got {self.used_by_others_bytes!r}")
        cc = self.compute_capability
        if cc is not None and not (isinstance(cc, tuple) and len(cc) == 2 and all(_is_int(v) and v >= 0 for v in cc)):
            raise GpuError(f"GpuInfo.compute_capability must be a (major, minor) tuple of ints or None, got {cc!r}")
        if not isinstance(self.bf16, bool):
            raise GpuError(f"GpuInfo.bf16 must be True or False, got {self.bf16!r}")
        for field in ("peak_tflops_16", "bandwidth_gbs"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
                raise GpuError(f"GpuInfo.{field} must be a positive number or None, got {value!r}")
        if self.index is not None and (not _is_int(self.index) or self.index < 0):
            raise GpuError(f"GpuInfo.index must be a device index >= 0 or None, got {self.index!r}")
        if self.source not in _SOURCES:
            raise GpuError(f"GpuInfo.source must be one of {', '.join(_SOURCES)}, got {self.source!r}")

    @property
    def family(self) -> str:
        """Architecture family from the compute capability: volta, turing, ampere, ada, hopper, blackwell, unknown."""
        cc = self.compute_capability
        if cc is None:
            return "unknown"
        if cc[0] in (10, 12):  # data-centre Blackwell is sm_100/103, GeForce and RTX PRO Blackwell sm_120/121
            return "blackwell"
        return {(7, 0): "volta", (7, 5): "turing", (8, 0): "ampere", (8, 6): "ampere", (8, 7): "ampere",
                (8, 9): "ada", (9, 0): "hopper"}.get(cc, "unknown")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------------------
# What the driver reports as total memory.
#
# cudaMemGetInfo's total (torch.cuda.mem_get_info, get_device_properties().total_memory) is the card's memory less
# what the driver keeps back for itself. Public deviceQuery outputs on Linux, cited at each card below, show it
# keeping back 265-871 MiB on drivers 535-575: 512 MiB of a 48 GiB RTX 6000 Ada, 491 of a 45 GiB L40S, 762-871 MiB
# of the 80 GiB A100s and H100, 366-461 of a 24 GiB 4090/3090, 536 of a 16 GiB 5060 Ti, 265 of a T4's 15 GiB.
# Newer drivers keep more than older ones (uncited RTX 3060 outputs, see its entry: 244 MiB with driver 535, 387 MiB
# with 580). The rule for cards with no public figure fits all the cited ones within 256 MiB, erring small: keep
# back max(512 MiB, 1%). tests/test_gpu.py checks the rule against every measured card.
_DRIVER_RESERVE_MIN = 512 * MiB
_DRIVER_RESERVE_FRACTION = 100  # 1 %
# Data-centre GDDR cards ship with ECC on, which stores check bits in 1/16 of the memory (a 16 GB T4 shows 15360 MiB
# in nvidia-smi; https://exafunction.com/blog/ecc-gpu). GeForce and RTX workstation cards ship with ECC off
# (https://support.chaos.com/hc/en-us/articles/24886637113617); HBM keeps its check bits outside the capacity.
_ECC_SHARE = 16


def _reported_total(nominal_bytes: int, ecc: bool) -> int:
    """Bytes the driver will report as total for a card with ``nominal_bytes`` on the box (the rule above)."""
    usable = nominal_bytes - nominal_bytes // _ECC_SHARE if ecc else nominal_bytes
    reserve = max(_DRIVER_RESERVE_MIN, usable // _DRIVER_RESERVE_FRACTION)
    return (usable - reserve) // MiB * MiB


# GeForce tensor cores run FP16 with FP32 accumulate at half their FP16-accumulate rate (the rate NVIDIA headlines):
# 512 dense FLOP per clock per SM on Turing, Ampere GA10x, Ada and GeForce Blackwell. It reproduces the whitepapers:
# 68 SMs x 512 x 1.545 GHz = 53.8 TFLOPS for the 2080 Ti (Turing whitepaper: 53.8), 82 x 512 x 1.695 =
# 71.2 for the 3090 (GA102 whitepaper: 71), 128 x 512 x 2.52 = 165.2 for the 4090 (Ada whitepaper:
# 165.2), 170 x 512 x 2.407 = 209.5 for the 5090 (NVIDIA's figure, https://www.codesota.com/hardware/rtx-5090), and
# hmc-tech.com's per-TGP laptop pages. Cards without a whitepaper row use it with TechPowerUp's SM count and boost
# clock (https://www.techpowerup.com/gpu-specs/), confirmed against review spec tables noted at each card.
def _geforce_tflops(sms: int, boost_mhz: int) -> float:
    return round(sms * 512 * boost_mhz * 1e6 / 1e12, 1)


@dataclass(frozen=True, kw_only=True, slots=True)
class CatalogCard:
    """A card in the built-in catalog. ``nominal_bytes`` is the size on the box, in binary units (12 GB = 12 GiB).

    ``reported_bytes`` is the total the driver reports where a public source shows it; otherwise ``total_bytes``
    applies the documented rule. ``name`` is the name NVML and torch report, so detected cards find their entry.
    """

    key: str
    name: str
    aliases: tuple[str, ...] = ()
    nominal_bytes: int
    reported_bytes: int | None = None
    ecc: bool = False
    compute_capability: tuple[int, int]
    peak_tflops_16: float | None
    bandwidth_gbs: float | None

    @property
    def total_bytes(self) -> int:
        """Driver-reported total in bytes: the measured figure where known, else the rule."""
        return self.reported_bytes if self.reported_bytes is not None else _reported_total(self.nominal_bytes, self.ecc)

    def info(self) -> GpuInfo:
        """This card as a ``GpuInfo`` with all its memory free (nothing else is known to be running on it)."""
        total = self.total_bytes
        return GpuInfo(name=self.name, key=self.key, total_bytes=total, free_bytes=total, used_by_others_bytes=0,
                       compute_capability=self.compute_capability, bf16=self.compute_capability >= (8, 0),
                       peak_tflops_16=self.peak_tflops_16, bandwidth_gbs=self.bandwidth_gbs, source="catalog")


# Sources named in the comments below:
#   TPU          TechPowerUp GPU database, https://www.techpowerup.com/gpu-specs/ (SMs, boost clock, memory, bandwidth)
#   Turing WP    NVIDIA Turing GPU Architecture whitepaper, GeForce spec tables
#                ("Peak FP16 Tensor TFLOPS with FP32 Accumulate", reference clocks)
#   GA102 WP     NVIDIA Ampere GA102 GPU Architecture whitepaper v2, GeForce spec tables and Appendix C (RTX A6000)
#   Ada WP       NVIDIA Ada GPU Architecture whitepaper v2.01, GeForce spec tables
#   hexus        hexus.net RTX 3060 Ti review, "Ampere and Turing Compared" table (boost clocks, shader counts)
#   sveth        svethardware.cz RTX 40 Super launch table (CUDA cores, boost clocks, bandwidth of 4070-4090)
#   hmc          hmc-tech.com per-TGP laptop pages (boost clock and "Tensor (FP32 Accumulate)" at each TGP)
#   deviceQuery  "Total amount of global memory" printed by CUDA's deviceQuery sample (= cudaMemGetInfo total)
# Compute capabilities: CUDA GPUs list, https://developer.nvidia.com/cuda-gpus (7.0 Volta, 7.5 Turing, 8.0 GA100,
# 8.6 GA10x, 8.9 Ada, 9.0 Hopper, 12.0 GeForce Blackwell). Cards sharing an NVML name (3080 10/12/20 GB, 4060 Ti
# 8/16 GB) are told apart by memory size; the most common variant comes first and owns the bare name.
_TURING, _GA100, _GA10X, _ADA, _HOPPER, _BLACKWELL = (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (12, 0)

CATALOG: tuple[CatalogCard, ...] = (
    # --- Turing GeForce: FP16 tensor rate (no bf16) ----------------------------------------------------------
    CatalogCard(key="rtx2060", name="NVIDIA GeForce RTX 2060", nominal_bytes=6 * GiB, compute_capability=_TURING,
                peak_tflops_16=_geforce_tflops(30, 1680),  # TPU / hexus: 30 SMs (1920 cores), 1680 MHz
                bandwidth_gbs=336.0),  # TPU: 14 Gbps x 192 bit
    CatalogCard(key="rtx2060super", name="NVIDIA GeForce RTX 2060 SUPER", nominal_bytes=8 * GiB,
                compute_capability=_TURING,
                peak_tflops_16=_geforce_tflops(34, 1650),  # TPU review: 2176 cores = 34 SMs, 1650 MHz boost
                bandwidth_gbs=448.0),  # TPU review: 14 Gbps x 256 bit
    CatalogCard(key="rtx2070", name="NVIDIA GeForce RTX 2070", nominal_bytes=8 * GiB, compute_capability=_TURING,
                peak_tflops_16=29.9,  # Turing WP (reference clocks; 31.5 for the Founders Edition)
                bandwidth_gbs=448.0),  # Turing WP
    CatalogCard(key="rtx2070super", name="NVIDIA GeForce RTX 2070 SUPER", nominal_bytes=8 * GiB,
                compute_capability=_TURING,
                peak_tflops_16=_geforce_tflops(40, 1770),  # hexus: 2560 cores = 40 SMs, 1770 MHz
                bandwidth_gbs=448.0),  # TPU
    CatalogCard(key="rtx2080", name="NVIDIA GeForce RTX 2080", nominal_bytes=8 * GiB, compute_capability=_TURING,
                peak_tflops_16=40.3,  # Turing WP (reference clocks)
                bandwidth_gbs=448.0),  # Turing WP
    CatalogCard(key="rtx2080super", name="NVIDIA GeForce RTX 2080 SUPER", nominal_bytes=8 * GiB,
                compute_capability=_TURING,
                peak_tflops_16=_geforce_tflops(48, 1815),  # hexus: 3072 cores = 48 SMs, 1815 MHz
                bandwidth_gbs=496.0),  # TPU: 15.5 Gbps x 256 bit
    CatalogCard(key="rtx2080ti", name="NVIDIA GeForce RTX 2080 Ti", nominal_bytes=11 * GiB,
                compute_capability=_TURING,
                peak_tflops_16=53.8,  # Turing WP (reference clocks)
                bandwidth_gbs=616.0),  # Turing WP
    # --- Ampere GeForce ---------------------------------------------------------------------------------------
    CatalogCard(key="rtx3050", name="NVIDIA GeForce RTX 3050", nominal_bytes=8 * GiB, compute_capability=_GA10X,
                peak_tflops_16=_geforce_tflops(20, 1777),  # Tom's Hardware RTX 3050 review table: 20 SMs, 1777 MHz
                bandwidth_gbs=224.0),  # same table
    CatalogCard(key="rtx3060", name="NVIDIA GeForce RTX 3060", nominal_bytes=12 * GiB, compute_capability=_GA10X,
                # Rule: 11776 MiB. deviceQuery outputs found by full-text search of public GitHub files (repositories
                # not identified) show 11901-12044 MiB on Linux drivers 535-580, so the rule errs small here.
                peak_tflops_16=_geforce_tflops(28, 1777),  # TPU: 28 SMs, 1777 MHz
                bandwidth_gbs=360.0),  # TPU: 15 Gbps x 192 bit
    CatalogCard(key="rtx3060ti", name="NVIDIA GeForce RTX 3060 Ti", nominal_bytes=8 * GiB, compute_capability=_GA10X,
                peak_tflops_16=_geforce_tflops(38, 1665),  # hexus: 4864 cores = 38 SMs, 1665 MHz
                bandwidth_gbs=448.0),  # TPU
    CatalogCard(key="rtx3070", name="NVIDIA GeForce RTX 3070", nominal_bytes=8 * GiB, compute_capability=_GA10X,
                peak_tflops_16=40.6,  # GA102 WP (RTX 3070)
                bandwidth_gbs=448.0),  # GA102 WP
    CatalogCard(key="rtx3070ti", name="NVIDIA GeForce RTX 3070 Ti", nominal_bytes=8 * GiB, compute_capability=_GA10X,
                peak_tflops_16=_geforce_tflops(48, 1770),  # TPU: full GA104, 48 SMs, 1770 MHz
                bandwidth_gbs=608.0),  # TPU: 19 Gbps GDDR6X x 256 bit
    CatalogCard(key="rtx3080", name="NVIDIA GeForce RTX 3080", aliases=("rtx3080-10gb",), nominal_bytes=10 * GiB,
                compute_capability=_GA10X,
                peak_tflops_16=59.5,  # GA102 WP
                bandwidth_gbs=760.0),  # GA102 WP
    CatalogCard(key="rtx3080-12gb", name="NVIDIA GeForce RTX 3080", nominal_bytes=12 * GiB, compute_capability=_GA10X,
                peak_tflops_16=_geforce_tflops(70, 1710),  # wccftech/Videocardz: 8960 cores = 70 SMs; TPU: 1710 MHz
                bandwidth_gbs=912.0),  # wccftech: 19 Gbps x 384 bit
    CatalogCard(key="rtx3080-20gb", name="NVIDIA GeForce RTX 3080", nominal_bytes=20 * GiB, compute_capability=_GA10X,
                # A 20 GB board NVIDIA never listed (sold in small numbers, mostly in China): its SM count, clocks and
                # memory bus could not be confirmed, so its speed is unknown.
                peak_tflops_16=None, bandwidth_gbs=None),
    CatalogCard(key="rtx3080ti", name="NVIDIA GeForce RTX 3080 Ti", nominal_bytes=12 * GiB, compute_capability=_GA10X,
                peak_tflops_16=_geforce_tflops(80, 1665),  # TPU: 80 SMs, 1665 MHz
                bandwidth_gbs=912.0),  # TPU: 19 Gbps x 384 bit
    CatalogCard(key="rtx3090", name="NVIDIA GeForce RTX 3090", nominal_bytes=24 * GiB, compute_capability=_GA10X,
                # deviceQuery, github.com/Jumperkables/cuda-benchmarking 00_deviceQuery/README.md (a driver recent
                # enough for an RTX 5060 Ti in the same box)
                reported_bytes=25_286_672_384,
                peak_tflops_16=71.0,  # GA102 WP
                bandwidth_gbs=936.0),  # GA102 WP
    CatalogCard(key="rtx3090ti", name="NVIDIA GeForce RTX 3090 Ti", nominal_bytes=24 * GiB, compute_capability=_GA10X,
                peak_tflops_16=_geforce_tflops(84, 1860),  # TweakTown: 84 SMs, 1860 MHz boost
                bandwidth_gbs=1008.0),  # TweakTown: 21 Gbps x 384 bit
    CatalogCard(key="rtx3060-laptop", name="NVIDIA GeForce RTX 3060 Laptop GPU", nominal_bytes=6 * GiB,
                compute_capability=_GA10X,
                # hmc: 30 SMs at 1567 MHz in a 95 W design (24.07 TFLOPS); low-TGP laptops are slower
                peak_tflops_16=_geforce_tflops(30, 1567),
                bandwidth_gbs=336.0),  # TPU: 14 Gbps x 192 bit
    # --- Ada GeForce --------------------------------------------------------------------------------------------
    CatalogCard(key="rtx4060", name="NVIDIA GeForce RTX 4060", nominal_bytes=8 * GiB, compute_capability=_ADA,
                peak_tflops_16=_geforce_tflops(24, 2460),  # TPU (fpsbench.com copy): 24 SMs, 2460 MHz
                bandwidth_gbs=272.0),  # same
    CatalogCard(key="rtx4060ti", name="NVIDIA GeForce RTX 4060 Ti", aliases=("rtx4060ti-8gb",), nominal_bytes=8 * GiB,
                compute_capability=_ADA,
                peak_tflops_16=_geforce_tflops(34, 2535),  # TPU: 4352 cores = 34 SMs, 2535 MHz
                bandwidth_gbs=288.0),  # TPU: 18 Gbps x 128 bit
    CatalogCard(key="rtx4060ti-16gb", name="NVIDIA GeForce RTX 4060 Ti", nominal_bytes=16 * GiB,
                compute_capability=_ADA,
                # deviceQuery, github.com/thamada/nvidia-smi package/RTX4060Ti_deviceQuery.py (driver CUDA 12.4)
                reported_bytes=16_857_038_848,
                peak_tflops_16=_geforce_tflops(34, 2535),  # same chip and clocks as the 8 GB card
                bandwidth_gbs=288.0),
    CatalogCard(key="rtx4070", name="NVIDIA GeForce RTX 4070", nominal_bytes=12 * GiB, compute_capability=_ADA,
                peak_tflops_16=_geforce_tflops(46, 2475),  # thefpsreview: 46 SMs, 2475 MHz
                bandwidth_gbs=504.0),  # same
    CatalogCard(key="rtx4070super", name="NVIDIA GeForce RTX 4070 SUPER", nominal_bytes=12 * GiB,
                compute_capability=_ADA,
                peak_tflops_16=_geforce_tflops(56, 2475),  # sveth: 7168 cores = 56 SMs, 2475 MHz
                bandwidth_gbs=504.0),  # sveth
    CatalogCard(key="rtx4070ti", name="NVIDIA GeForce RTX 4070 Ti", nominal_bytes=12 * GiB, compute_capability=_ADA,
                peak_tflops_16=_geforce_tflops(60, 2610),  # sveth / TPU: 60 SMs, 2610 MHz
                bandwidth_gbs=504.0),  # sveth
    CatalogCard(key="rtx4070tisuper", name="NVIDIA GeForce RTX 4070 Ti SUPER", nominal_bytes=16 * GiB,
                compute_capability=_ADA,
                peak_tflops_16=_geforce_tflops(66, 2610),  # sveth: 8448 cores = 66 SMs, 2610 MHz
                bandwidth_gbs=672.0),  # sveth
    CatalogCard(key="rtx4080", name="NVIDIA GeForce RTX 4080", nominal_bytes=16 * GiB, compute_capability=_ADA,
                peak_tflops_16=97.5,  # Ada WP (RTX 4080 16 GB)
                bandwidth_gbs=716.8),  # Ada WP: 22.4 Gbps x 256 bit
    CatalogCard(key="rtx4080super", name="NVIDIA GeForce RTX 4080 SUPER", nominal_bytes=16 * GiB,
                compute_capability=_ADA,
                peak_tflops_16=_geforce_tflops(80, 2550),  # sveth: 10240 cores = 80 SMs, 2550 MHz
                bandwidth_gbs=736.0),  # sveth: 23 Gbps x 256 bit
    CatalogCard(key="rtx4090", name="NVIDIA GeForce RTX 4090", nominal_bytes=24 * GiB, compute_capability=_ADA,
                # deviceQuery, github.com/thamada/nvidia-smi gls/RTX4090_deviceQuery.py (driver CUDA 12.4)
                reported_bytes=25_386_352_640,
                peak_tflops_16=165.2,  # Ada WP
                bandwidth_gbs=1008.0),  # Ada WP
    CatalogCard(key="rtx4060-laptop", name="NVIDIA GeForce RTX 4060 Laptop GPU", nominal_bytes=8 * GiB,
                compute_capability=_ADA,
                peak_tflops_16=_geforce_tflops(24, 2370),  # hmc: 24 SMs at 2370 MHz in a 115 W design (29.12)
                bandwidth_gbs=256.0),  # TPU: 16 Gbps x 128 bit
    CatalogCard(key="rtx4070-laptop", name="NVIDIA GeForce RTX 4070 Laptop GPU", nominal_bytes=8 * GiB,
                compute_capability=_ADA,
                # notebookcheck/oemdrivers: 4608 cores = 36 SMs, boost 1230 MHz (35 W) to 2175 MHz (115 W)
                peak_tflops_16=_geforce_tflops(36, 2175),
                bandwidth_gbs=256.0),  # same: 16 Gbps x 128 bit
    CatalogCard(key="rtx4090-laptop", name="NVIDIA GeForce RTX 4090 Laptop GPU", nominal_bytes=16 * GiB,
                compute_capability=_ADA,
                peak_tflops_16=_geforce_tflops(76, 2040),  # hmc: 76 SMs at 2040 MHz in a 150 W design (79.38)
                bandwidth_gbs=576.0),  # hmc: 18 Gbps x 256 bit
    # --- Blackwell GeForce --------------------------------------------------------------------------------------
    CatalogCard(key="rtx5060ti", name="NVIDIA GeForce RTX 5060 Ti", aliases=("rtx5060ti-16gb",),
                nominal_bytes=16 * GiB, compute_capability=_BLACKWELL,
                # deviceQuery-style dump, github.com/Jumperkables/cuda-benchmarking 00_deviceQuery/README.md
                reported_bytes=16_617_897_984,
                peak_tflops_16=_geforce_tflops(36, 2572),  # Hardware Unboxed / TPU: 36 SMs, 2572 MHz
                bandwidth_gbs=448.0),  # same: 28 Gbps x 128 bit
    CatalogCard(key="rtx5070", name="NVIDIA GeForce RTX 5070", nominal_bytes=12 * GiB, compute_capability=_BLACKWELL,
                peak_tflops_16=_geforce_tflops(48, 2512),  # NVIDIA CES 2025 table (TweakTown): 48 SMs, 2.51 GHz
                bandwidth_gbs=672.0),  # same
    CatalogCard(key="rtx5070ti", name="NVIDIA GeForce RTX 5070 Ti", nominal_bytes=16 * GiB,
                compute_capability=_BLACKWELL,
                peak_tflops_16=_geforce_tflops(70, 2452),  # same table: 70 SMs, 2.45 GHz (TPU: 2452 MHz)
                bandwidth_gbs=896.0),  # same
    CatalogCard(key="rtx5080", name="NVIDIA GeForce RTX 5080", nominal_bytes=16 * GiB, compute_capability=_BLACKWELL,
                peak_tflops_16=_geforce_tflops(84, 2617),  # same table: 84 SMs, 2.62 GHz (TPU: 2617 MHz)
                bandwidth_gbs=960.0),  # same
    CatalogCard(key="rtx5090", name="NVIDIA GeForce RTX 5090", nominal_bytes=32 * GiB, compute_capability=_BLACKWELL,
                peak_tflops_16=209.5,  # NVIDIA RTX Blackwell whitepaper figure (codesota.com: "FP16 dense 209.5")
                bandwidth_gbs=1792.0),  # NVIDIA: 28 Gbps x 512 bit
    # --- Data centre and workstation: full-rate FP32 accumulate, so the datasheet's dense figure applies --------
    CatalogCard(key="t4", name="Tesla T4", nominal_bytes=16 * GiB, ecc=True, compute_capability=_TURING,
                # deviceQuery on Colab (driver CUDA 12.4): 15095 MiB,
                # github.com/sylvia-ymlin/cuda-kernels-from-scratch README.md (printed in whole MiB)
                reported_bytes=15095 * MiB,
                peak_tflops_16=65.0,  # T4 datasheet: "Mixed Precision (FP16/FP32) 65 TFLOPS"
                bandwidth_gbs=320.0),  # T4 datasheet
    CatalogCard(key="v100-16gb", name="Tesla V100-SXM2-16GB", aliases=("v100", "v100-sxm2-16gb"),
                nominal_bytes=16 * GiB, compute_capability=(7, 0),
                peak_tflops_16=125.0,  # V100 datasheet, SXM2: "Tensor Performance 125 TFLOPS" (PCIe: 112)
                bandwidth_gbs=900.0),  # V100 datasheet
    CatalogCard(key="v100-32gb", name="Tesla V100-SXM2-32GB", aliases=("v100-sxm2-32gb",), nominal_bytes=32 * GiB,
                compute_capability=(7, 0),
                peak_tflops_16=125.0,  # V100 datasheet, SXM2
                bandwidth_gbs=900.0),  # V100 datasheet
    CatalogCard(key="a10", name="NVIDIA A10", nominal_bytes=24 * GiB, ecc=True, compute_capability=_GA10X,
                # deviceQuery-style dump (driver CUDA 12.2), github.com/aalanwyr/face2cuda step2cuda/README.md
                reported_bytes=23_609_475_072,
                peak_tflops_16=125.0,  # A10 datasheet: "BF16 Tensor Core 125 TF | 250 TF*" (* sparse)
                bandwidth_gbs=600.0),  # A10 datasheet
    CatalogCard(key="a10g", name="NVIDIA A10G", nominal_bytes=24 * GiB, ecc=True, compute_capability=_GA10X,
                # AWS-only part with no NVIDIA datasheet; baseten.co says its tensor rate is below the A10's but no
                # source gives the figure, so it is unknown.
                peak_tflops_16=None,
                bandwidth_gbs=600.0),  # https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/
    CatalogCard(key="l4", name="NVIDIA L4", nominal_bytes=24 * GiB, ecc=True, compute_capability=_ADA,
                # deviceQuery (driver CUDA 12.4), github.com/thamada/nvidia-smi gls/L4_deviceQuery.py
                reported_bytes=23_570_219_008,
                peak_tflops_16=121.0,  # L4 datasheet: "FP16 Tensor Core 242 TFLOPS*" (* sparse)
                bandwidth_gbs=300.0),  # L4 datasheet
    CatalogCard(key="l40s", name="NVIDIA L40S", nominal_bytes=48 * GiB, ecc=True, compute_capability=_ADA,
                # deviceQuery (driver CUDA 12.4), github.com/thamada/nvidia-smi nvsim/L40S_deviceQuery.py
                reported_bytes=47_803_596_800,
                peak_tflops_16=362.05,  # L40S datasheet: "BFLOAT16 Tensor Core 362.05 | 733*" (* sparse)
                bandwidth_gbs=864.0),  # L40S datasheet
    CatalogCard(key="a100-40gb", name="NVIDIA A100-SXM4-40GB", aliases=("a100-sxm4-40gb",), nominal_bytes=40 * GiB,
                compute_capability=_GA100,
                # deviceQuery (driver CUDA 12.2), github.com/bottlerocket-os/bottlerocket pull request #3873
                reported_bytes=42_298_834_944,
                peak_tflops_16=312.0,  # A100 datasheet / Hopper blog Table 3: "BF16 312/624" (dense/sparse)
                bandwidth_gbs=1555.0),  # A100 datasheet, 40 GB SXM
    CatalogCard(key="a100-80gb", name="NVIDIA A100-SXM4-80GB", aliases=("a100", "a100-sxm4-80gb", "a100-sxm"),
                nominal_bytes=80 * GiB, compute_capability=_GA100,
                # deviceQuery (driver CUDA 12.5), github.com/thamada/nvidia-smi gls/A100SXMx4_deviceQuery.py
                reported_bytes=85_100_068_864,
                peak_tflops_16=312.0,  # A100 datasheet
                bandwidth_gbs=2039.0),  # A100 datasheet, 80 GB SXM
    CatalogCard(key="a100-80gb-pcie", name="NVIDIA A100 80GB PCIe", aliases=("a100-pcie",), nominal_bytes=80 * GiB,
                compute_capability=_GA100,
                # mixbench-cuda "Total global mem: 81049 MB" (driver CUDA 12.3), github.com/ekondis/mixbench issue #47
                reported_bytes=81049 * MiB,
                peak_tflops_16=312.0,  # A100 datasheet
                bandwidth_gbs=1935.0),  # A100 datasheet, 80 GB PCIe
    CatalogCard(key="h100-sxm", name="NVIDIA H100 80GB HBM3", aliases=("h100", "h100-80gb", "h100-sxm5"),
                nominal_bytes=80 * GiB, compute_capability=_HOPPER,
                # deviceQuery (driver CUDA 12.7), github.com/thamada/nvidia-smi nvsim/H100SXMx8_deviceQuery.py
                reported_bytes=85_045_477_376,
                peak_tflops_16=989.4,  # H100 datasheet: "BF16 Tensor Core 1,979 TFLOPS*" (* sparse) / 2
                bandwidth_gbs=3350.0),  # H100 datasheet, SXM: 3.35 TB/s
    CatalogCard(key="h100-pcie", name="NVIDIA H100 PCIe", nominal_bytes=80 * GiB, compute_capability=_HOPPER,
                peak_tflops_16=756.5,  # H100 datasheet, PCIe: "BF16 Tensor Core 1,513 TFLOPS*" (* sparse) / 2
                bandwidth_gbs=2000.0),  # H100 datasheet, PCIe: 2 TB/s
    CatalogCard(key="h200", name="NVIDIA H200", aliases=("h200-sxm",), nominal_bytes=141 * GiB,
                compute_capability=_HOPPER,
                # Rule: 142940 MiB. A public GitHub file found by full-text search (repository not identified)
                # prints total_memory=143156MB for an H200.
                peak_tflops_16=989.4,  # H200 datasheet: "BF16 Tensor Core 1,979 TFLOPS*" (* sparse) / 2
                bandwidth_gbs=4800.0),  # H200 datasheet: 4.8 TB/s
    CatalogCard(key="rtxa6000", name="NVIDIA RTX A6000", aliases=("a6000",), nominal_bytes=48 * GiB,
                compute_capability=_GA10X,
                peak_tflops_16=154.8,  # GA102 WP, Appendix C: "Peak FP16 Tensor TFLOPS with FP32 Accumulate 154.8"
                bandwidth_gbs=768.0),  # GA102 WP / TPU: 16 Gbps x 384 bit
    CatalogCard(key="rtx6000ada", name="NVIDIA RTX 6000 Ada Generation", aliases=("6000ada",),
                nominal_bytes=48 * GiB, compute_capability=_ADA,
                # deviceQuery (driver CUDA 12.4, ECC off),
                # github.com/thamada/nvidia-smi gls/RTX6000Ada_x8_deviceQuery.py
                reported_bytes=51_002_867_712,
                # 142 SMs x 1024 (workstation cards run FP32 accumulate at full rate, as the A6000's 84 x 1024 x
                # 1.8 GHz = 154.8 shows) x 2.505 GHz boost (TPU, via cputronic.com)
                peak_tflops_16=364.2,
                bandwidth_gbs=960.0),  # NVIDIA launch specs (grafikkarten.com): 20 Gbps x 384 bit
)


# ---------------------------------------------------------------------------------------------------------------
# Names: everything a user might type for a card, folded to one form.

_SEPARATORS = re.compile(r"[\s_\-]+")
_VENDOR_WORDS = re.compile(r"\b(?:nvidia|geforce|tesla|gpu)\b")
_NOT_ALNUM = re.compile(r"[^a-z0-9]")


def _norm(text: str) -> str:
    """``'NVIDIA GeForce RTX 4060 Laptop GPU'`` -> ``'rtx4060laptop'``: case, separators and vendor words dropped."""
    text = _SEPARATORS.sub(" ", text.lower())
    return _NOT_ALNUM.sub("", _VENDOR_WORDS.sub(" ", text))


def _derived_names(card: CatalogCard) -> list[str]:
    """Names implied by a card's key and NVML name: ``3060``, ``rtx3060 12gb``, ``4060 laptop``, ..."""
    size = f"{card.nominal_bytes // GiB}gb"
    names = []
    for base in (_norm(card.name), _norm(card.key)):
        short = base[3:] if base.startswith("rtx") and base[3:4].isdigit() else None
        for stem in (base, short):
            if stem:
                names += [stem, stem + size]
    return names


def _build_index() -> dict[str, CatalogCard]:
    index: dict[str, CatalogCard] = {}
    for card in CATALOG:  # keys and explicit aliases must be unambiguous: a clash is a catalog bug
        for alias in (card.key, *card.aliases):
            norm = _norm(alias)
            if index.get(norm, card) is not card:
                raise AssertionError(f"catalog name {alias!r} is claimed by {index[norm].key} and {card.key}")
            index[norm] = card
    for card in CATALOG:  # variants share NVML names; the first (most common) variant keeps the bare name
        for name in _derived_names(card):
            index.setdefault(name, card)
    return index


_INDEX = _build_index()
_POSITION = {card.key: i for i, card in enumerate(CATALOG)}


def catalog() -> list[GpuInfo]:
    """Every catalog card as a ``GpuInfo`` (source ``"catalog"``), in catalog order."""
    return [card.info() for card in CATALOG]


def _match_card(name: str, total_bytes: int) -> CatalogCard | None:
    """The catalog entry for a detected card: by NVML name, the variant closest in memory, else by any alias."""
    norm = _norm(name)
    same_name = [card for card in CATALOG if _norm(card.name) == norm]
    if same_name:
        return min(same_name, key=lambda card: abs(card.total_bytes - total_bytes))
    return _INDEX.get(norm)


_MODEL_NUMBER = re.compile(r"\d+")


def _closest_keys(text: str, n: int = 3) -> list[str]:
    """Up to ``n`` catalog keys that look most like ``text``, best first.

    Ranked by difflib's ratio against every name of a card, then by shared prefix, then by how far model numbers
    of the same length are apart (``rtx3070x`` suggests the 3060 before the 3050), then by catalog order.
    """
    norm = _norm(text)
    number = _MODEL_NUMBER.search(norm)
    best: dict[str, tuple[float, int, float]] = {}
    for alias, card in _INDEX.items():
        ratio = difflib.SequenceMatcher(None, norm, alias).ratio()
        prefix = len(os.path.commonprefix([norm, alias]))
        other = _MODEL_NUMBER.search(alias)
        comparable = number and other and len(number.group()) == len(other.group())
        distance = abs(int(number.group()) - int(other.group())) if comparable else float("inf")
        best[card.key] = max(best.get(card.key, (0.0, 0, -float("inf"))), (ratio, prefix, -distance))
    ranked = sorted((key for key, (ratio, _, _) in best.items() if ratio >= 0.6),
                    key=lambda key: (-best[key][0], -best[key][1], -best[key][2], _POSITION[key]))
    return ranked[:n]


# ---------------------------------------------------------------------------------------------------------------
# Specs: what resolve() accepts.

_CUDA_DEVICE = re.compile(r"cuda(?::(.*))?", re.IGNORECASE)
_SIZE_SPEC = re.compile(r"-?\d+(?:\.\d+)?\s*(?:[kmgt]i?b?|b)", re.IGNORECASE)  # a unit is required, see resolve()
_NO_GPU = "no CUDA GPU detected; name the card you plan for, e.g. --gpu rtx3060 or --gpu 12GiB"


def resolve(spec: str | int | GpuInfo | None) -> GpuInfo:
    """The card a spec names. Raises ``GpuError`` (or ``ConfigError`` for an unreadable size) with one line.

    - ``GpuInfo``: itself. ``None`` or ``"cuda"``: the first detected card.
    - ``int`` N or ``"cuda:N"``: the detected card torch numbers N.
    - a catalog name, insensitive to case, spaces, dashes and underscores: ``rtx3060``, ``RTX 4060 Laptop``,
      ``3060``, ``rtx 3080 20gb``, ``A100 80GB``, ``NVIDIA GeForce RTX 3060``. A bare model with several memory
      variants means the most common one: ``3080`` 10 GB, ``4060ti`` 8 GB, ``a100`` 80 GB SXM, ``v100`` 16 GB SXM2,
      ``h100`` 80 GB SXM.
    - a memory size with a unit: ``12GB``, ``12GiB``, ``8 GB``, ``11264MiB`` (GB means GiB, as on GPU boxes). The size
      is taken as the driver-reported total. A bare number is not a size here: ``1080`` is a GTX 1080, not 1080 GiB.
    - ``cpu``: the host's memory, for runs without a GPU (``host_memory()``).
    """
    if isinstance(spec, GpuInfo):
        return spec
    if spec is None:
        return _detected(None)
    if isinstance(spec, bool) or not isinstance(spec, int | str):
        raise GpuError(f"cannot read a GPU from {spec!r}; give a card name like rtx3060, a size like 12GiB or cuda:0")
    if isinstance(spec, int):
        return _detected(spec)
    text = spec.strip()
    if not text:
        raise GpuError("empty GPU spec; name the card you plan for, e.g. --gpu rtx3060 or --gpu 12GiB")
    if text.lower() == "cpu":
        return host_memory()
    device = _CUDA_DEVICE.fullmatch(text)
    if device:
        number = device.group(1)
        if number is None:
            return _detected(None)
        if not number.strip().isdigit():
            raise GpuError(f"cannot read {spec!r} as a CUDA device; write cuda:0, cuda:1, ...")
        return _detected(int(number))
    card = _INDEX.get(_norm(text))
    if card is not None:
        return card.info()
    if _SIZE_SPEC.fullmatch(text):
        return _sized(text)
    closest = _closest_keys(text)
    hint = f"; closest: {', '.join(closest)}" if closest else ""
    device_hint = f", cuda:{text} for a device" if text.isdigit() else ""
    raise GpuError(f"unknown GPU {spec!r}{hint}; run 'autofit gpus' for the list{device_hint} "
                   f"or give a size like 12GiB")


def host_memory() -> GpuInfo:
    """The host as a device: total and available RAM from ``/proc/meminfo`` (``os.sysconf`` elsewhere)."""
    total = available = None
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if line.split()[1:]}
        total, available = info.get("MemTotal"), info.get("MemAvailable")
    except OSError:
        pass
    if total is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    available = min(available, total)
    return GpuInfo(name="CPU (host memory)", key="cpu", total_bytes=total, free_bytes=available,
                   used_by_others_bytes=total - available, compute_capability=None, bf16=False,
                   peak_tflops_16=None, bandwidth_gbs=None, source="host")


def _sized(text: str) -> GpuInfo:
    """A generic card with ``text`` of memory (``12GiB``): no catalog figures.

    bf16 is assumed: most cards people fine-tune on today are Ampere or newer, and a wrong guess costs little
    because the probe and the trainer check ``torch.cuda.is_bf16_supported()`` on the real card.
    """
    if text.startswith("-"):
        raise GpuError(f"GPU memory size {text!r} is negative; give a positive size like 12GiB")
    total = parse_size(text)
    if total <= 0:
        raise GpuError(f"GPU memory size {text!r} is zero; give a positive size like 12GiB")
    return GpuInfo(name=f"{fmt_bytes(total)} card", key=None, total_bytes=total, free_bytes=total,
                   used_by_others_bytes=0, compute_capability=None, bf16=True, peak_tflops_16=None,
                   bandwidth_gbs=None, source="size")


def _detected(index: int | None) -> GpuInfo:
    devices = detect()
    if index is None:
        if not devices:
            raise GpuError(_NO_GPU)
        return devices[0]
    if index < 0:
        raise GpuError(f"CUDA device index {index} is negative; write cuda:0, cuda:1, ...")
    for device in devices:
        if device.index == index:
            return device
    if not devices:
        raise GpuError(f"no CUDA device {index}: found 0 devices; name the card you plan for, "
                       f"e.g. --gpu rtx3060 or --gpu 12GiB")
    found = ", ".join(f"cuda:{d.index} {d.name}" for d in devices)
    raise GpuError(f"no CUDA device {index}: found {len(devices)} device(s) ({found}); pick one of those")


# ---------------------------------------------------------------------------------------------------------------
# Detection. All NVML quirks live below.


def detect() -> list[GpuInfo]:
    """Every CUDA device this process can see, numbered as torch numbers them. Never raises.

    Reads NVML (``pynvml`` from nvidia-ml-py, imported here so the package imports without it) and falls back to
    ``torch.cuda`` when NVML is missing or fails. No driver, no library or no GPU gives ``[]``.
    """
    devices = _detect_nvml()
    if devices is None:
        devices = _detect_torch()
    return devices


def _detect_nvml() -> list[GpuInfo] | None:
    """Devices from NVML, or None when NVML cannot be used at all (then torch.cuda is asked instead)."""
    try:
        import pynvml
    except ImportError:
        log.debug("nvidia-ml-py is not installed; asking torch.cuda instead")
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded / NoPermission ...
        log.debug("NVML unavailable (%s); asking torch.cuda instead", exc)
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        order = _visible_order(os.environ.get("CUDA_VISIBLE_DEVICES"), count,
                               lambda i: _text(pynvml.nvmlDeviceGetUUID(handles[i])))
        _warn_if_order_may_differ(pynvml, handles, order)
        devices = []
        for torch_index, nvml_index in enumerate(order):
            if nvml_index is None:
                log.warning("CUDA device %d is a MIG slice; autofit cannot describe MIG devices, skipping it",
                            torch_index)
                continue
            try:
                devices.append(_nvml_device(pynvml, handles[nvml_index], torch_index))
            except Exception as exc:  # one broken device (fallen off the bus, say) should not hide the others
                log.warning("could not read GPU %d through NVML (%s); skipping it", nvml_index, exc)
        return devices
    except Exception as exc:
        log.warning("reading GPUs through NVML failed (%s); asking torch.cuda instead", exc)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvmlShutdown failed: %s", exc)


def _visible_order(env: str | None, count: int, uuid_of: Callable[[int], str]) -> list[int | None]:
    """NVML index of each device torch sees, in torch's order; None marks a MIG slice we cannot describe.

    Follows CUDA's reading of CUDA_VISIBLE_DEVICES: unset shows every device; entries are indices or GPU UUIDs
    (a unique prefix of ``GPU-...`` is enough); the list ends at the first entry that is empty, unknown, out of
    range or repeated, so an empty value (or ``-1``) hides every device.
    """
    if env is None:
        return list(range(count))
    order: list[int | None] = []
    for entry in (part.strip() for part in env.split(",")):
        if entry.upper().startswith("MIG-"):
            order.append(None)
            continue
        if entry.upper().startswith("GPU-"):
            matches = [i for i in range(count) if uuid_of(i).lower().startswith(entry.lower())]
            if len(matches) != 1:
                break
            index = matches[0]
        elif entry.isdigit() and int(entry) < count:
            index = int(entry)
        else:
            break
        if index in order:
            break
        order.append(index)
    return order


def _warn_if_order_may_differ(nvml, handles: list, order: list[int | None]) -> None:
    """CUDA numbers devices fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID; NVML numbers them by PCI bus.

    The two agree when all visible cards are the same model, which is the common case; otherwise say so.
    """
    if os.environ.get("CUDA_DEVICE_ORDER", "").upper() == "PCI_BUS_ID":
        return
    try:
        names = {_text(nvml.nvmlDeviceGetName(handles[i])) for i in order if i is not None}
    except Exception:
        return
    if len(names) > 1:
        log.warning("mixed GPU models (%s) without CUDA_DEVICE_ORDER=PCI_BUS_ID: torch may number them differently "
                    "from NVML; set CUDA_DEVICE_ORDER=PCI_BUS_ID to be sure", ", ".join(sorted(names)))


def _nvml_device(nvml, handle, index: int) -> GpuInfo:
    name = _text(nvml.nvmlDeviceGetName(handle))
    total, free, used = _nvml_memory(nvml, handle)
    others = _nvml_used_by_others(nvml, handle, used)
    try:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        cc: tuple[int, int] | None = (int(major), int(minor))
    except Exception as exc:
        log.debug("no compute capability from NVML for %s (%s)", name, exc)
        cc = None
    card = _match_card(name, total)
    if cc is None and card is not None:
        cc = card.compute_capability
    return GpuInfo(name=name, key=card.key if card else None, total_bytes=total, free_bytes=free,
                   used_by_others_bytes=others, compute_capability=cc, bf16=cc is not None and cc >= (8, 0),
                   peak_tflops_16=card.peak_tflops_16 if card else None,
                   bandwidth_gbs=card.bandwidth_gbs if card else None, index=index, source="nvml")


def _nvml_memory(nvml, handle) -> tuple[int, int, int]:
    """(total, free, used) bytes, with total as close as NVML gets to what CUDA reports.

    NVML's v1 total is the whole framebuffer and its used includes what the driver reserves; the v2 struct of
    newer drivers reports that reserve separately, and total less reserve is the nearest NVML figure to CUDA's
    total (the probe measures the real one). Old bindings or drivers without v2 fall back to v1.
    """
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            mem = nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
            total = int(mem.total) - int(mem.reserved)
            return total, min(int(mem.free), total), int(mem.used)
        except Exception as exc:  # NVMLError_FunctionNotFound on old drivers, TypeError on old bindings
            log.debug("NVML memory info v2 unavailable (%s); using v1", exc)
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    total = int(mem.total)
    return total, min(int(mem.free), total), int(mem.used)


_NOT_AVAILABLE = 2**63  # NVML's "value not available" is 2**64 - 1; recent bindings turn it into None


def _nvml_used_by_others(nvml, handle, device_used: int) -> int:
    """Bytes held on this device by processes other than this one.

    Sums ``usedGpuMemory`` over the compute and graphics process lists, skipping our pid (a process in both lists
    counts once). Where a process's usage is unknown (Windows WDDM reports None) the device's used memory less our
    own is taken instead; where the lists themselves are unavailable, all used memory, ours included. Inside a
    container NVML reports host pids, so our own process is not recognised and its memory counts as others'.
    """
    usage: dict[int, int | None] = {}
    listed = False
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            processes = getattr(nvml, getter)(handle)
        except Exception as exc:  # NotSupported (some vGPUs), ArgumentVersionMismatch (binding newer than driver)
            log.debug("%s unavailable (%s)", getter, exc)
            continue
        listed = True
        for process in processes:
            pid, memory = int(process.pid), getattr(process, "usedGpuMemory", None)
            if memory is None or memory >= _NOT_AVAILABLE:
                usage.setdefault(pid, None)
            else:
                usage[pid] = max(usage.get(pid) or 0, int(memory))
    if not listed:
        return device_used
    own_pid = os.getpid()
    others = {pid: memory for pid, memory in usage.items() if pid != own_pid}
    if any(memory is None for memory in others.values()):
        return max(0, device_used - (usage.get(own_pid) or 0))
    return sum(others.values())  # type: ignore[arg-type]


def _text(value: bytes | str) -> str:
    """NVML strings come back as bytes from some nvidia-ml-py versions and as str from others."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _detect_torch() -> list[GpuInfo]:
    """Devices from torch.cuda when NVML is unavailable. Never raises.

    ``mem_get_info`` creates a CUDA context on each device (a few hundred MiB, and a CPU-GPU sync point). Without
    NVML the memory of other processes cannot be told from ours, so used-by-others is everything in use less
    what torch's allocator holds: our CUDA context counts as someone else's, which errs on the safe side.
    """
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        devices = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            free, total = (int(v) for v in torch.cuda.mem_get_info(index))
            others = max(0, total - free - int(torch.cuda.memory_reserved(index)))
            cc = (int(props.major), int(props.minor))
            card = _match_card(props.name, total)
            devices.append(GpuInfo(name=props.name, key=card.key if card else None, total_bytes=total,
                                   free_bytes=min(free, total), used_by_others_bytes=others, compute_capability=cc,
                                   bf16=cc >= (8, 0), peak_tflops_16=card.peak_tflops_16 if card else None,
                                   bandwidth_gbs=card.bandwidth_gbs if card else None, index=index, source="torch"))
        return devices
    except Exception as exc:
        log.warning("torch.cuda could not describe the GPUs (%s)", exc)
        return []


def process_memory(index: int) -> int | None:
    """Memory this process holds on CUDA device ``index`` (torch numbering) as NVML reports it, or None when NVML
    cannot say (no driver, or per-process accounting unavailable, as inside some containers)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        order = _visible_order(os.environ.get("CUDA_VISIBLE_DEVICES"), len(handles),
                               lambda i: _text(pynvml.nvmlDeviceGetUUID(handles[i])))
        physical = order[index] if index < len(order) else None
        if physical is None:
            return None
        pid = os.getpid()
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            for proc in getattr(pynvml, getter)(handles[physical]):
                used = getattr(proc, "usedGpuMemory", None)
                if proc.pid == pid and used is not None and used < _NOT_AVAILABLE:
                    return int(used)
        return None
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
