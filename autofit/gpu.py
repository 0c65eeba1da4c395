"""Know the card: which GPU a plan is for, how much memory it has, and how fast it computes and moves data.

A card comes from one of three places: a detected device (NVML through the official ``nvidia-ml-py`` binding,
falling back to ``torch.cuda``), the built-in catalog (``rtx3060``, ``A100 80GB``, ...), or a bare memory size
(``12GiB``). The catalog's figures, each with its source, live in ``autofit/catalog/gpus.json``; this module loads
and checks it once. Every quirk of NVML lives in this module. Bytes are ints; GiB appears only when printing.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

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
        """Architecture family from the compute capability: pascal, volta, turing, ampere, ada, hopper, blackwell,
        unknown."""
        cc = self.compute_capability
        if cc is None:
            return "unknown"
        if cc[0] in (10, 12):  # data-centre Blackwell is sm_100/103, GeForce and RTX PRO Blackwell sm_120/121
            return "blackwell"
        return {(6, 0): "pascal", (6, 1): "pascal", (7, 0): "volta", (7, 5): "turing", (8, 0): "ampere", (8, 6): "ampere", (8, 7): "ampere",
                (8, 9): "ada", (9, 0): "hopper"}.get(cc, "unknown")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------------------
# What the driver reports as total memory.
#
# cudaMemGetInfo's total (torch.cuda.mem_get_info, get_device_properties().total_memory) is the card's memory less
# what the driver keeps back for itself. Public deviceQuery outputs on Linux, cited at each card in gpus.json, show it
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
# clock (https://www.techpowerup.com/gpu-specs/), confirmed against review spec tables noted at each card. In
# gpus.json such a card gives {"geforce_rule": {"sms": ..., "boost_mhz": ...}} and the loader applies the rule.
def _geforce_tflops(sms: int, boost_mhz: int) -> float:
    return round(sms * 512 * boost_mhz * 1e6 / 1e12, 1)


# Cards without tensor cores (Pascal, the GTX 16 series) run PyTorch's fp16 matmuls with FP32 compute (cuBLAS's
# default compute type for half inputs), so their rate is the FP32 one: CUDA cores x 2 FLOP per FMA x boost clock.
# Measured: a GTX 1080 Ti reaches 10.5 TFLOPS in an fp32 Linear and 10.3 in an fp16 one
# (gist.github.com/ypwhs/a156353cb19e780e323be054821af015); a Tesla P40 10.07 and 10.02, a P4 4.96 and 4.80
# (github.com/zzc0721/torch-performance-test-data, database.md). In gpus.json such a card gives
# {"cuda_core_rule": {"cores": ..., "boost_mhz": ...}}.
def _cuda_core_tflops(cores: int, boost_mhz: int) -> float:
    return round(cores * 2 * boost_mhz * 1e6 / 1e12, 2)


# A desktop GeForce card usually drives the screen: the display server, the compositor and a browser with hardware
# acceleration hold memory on it before training starts. How much varies widely: public nvidia-smi listings show
# under 100 MiB for a bare desktop (Xorg 28 MiB and gnome-shell 46 MiB, NVIDIA/nvidia-docker#1264) and 4.3 GiB on a
# desktop RTX 4060 running the COSMIC desktop (pop-os/cosmic-epoch#1591). An assumption, then: a catalog card of a
# desktop GeForce section is planned with DISPLAY_ALLOWANCE held by others; laptop cards (Optimus: the integrated GPU
# drives the screen) and data-centre cards get none. ``with_reserved_by_others`` overrides it (0 for a headless card);
# a detected card reports what others really hold.
DISPLAY_ALLOWANCE = 512 * MiB


@dataclass(frozen=True, kw_only=True, slots=True)
class CatalogCard:
    """A card in the built-in catalog. ``nominal_bytes`` is the size on the box, in binary units (12 GB = 12 GiB).

    ``reported_bytes`` is the total the driver reports where a public source shows it; otherwise ``total_bytes``
    applies the documented rule. ``name`` is the name NVML and torch report, so detected cards find their entry.
    """

    key: str
    name: str
    aliases: tuple[str, ...] = ()
    section: str = "datacentre-workstation"
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

    @property
    def drives_display(self) -> bool:
        """A desktop GeForce card, assumed to drive the screen (see ``DISPLAY_ALLOWANCE``)."""
        return self.section in _DESKTOP_SECTIONS and "Laptop" not in self.name

    def info(self) -> GpuInfo:
        """This card as a ``GpuInfo``: all its memory free but ``DISPLAY_ALLOWANCE`` on a desktop GeForce card."""
        total = self.total_bytes
        others = DISPLAY_ALLOWANCE if self.drives_display else 0
        return GpuInfo(name=self.name, key=self.key, total_bytes=total, free_bytes=total - others,
                       used_by_others_bytes=others, compute_capability=self.compute_capability,
                       bf16=self.compute_capability >= (8, 0), peak_tflops_16=self.peak_tflops_16,
                       bandwidth_gbs=self.bandwidth_gbs, source="catalog")


def with_reserved_by_others(card: GpuInfo, reserved: int) -> GpuInfo:
    """``card`` with ``reserved`` bytes held by other processes (a display, another job) instead of what it says.

    Raises ``GpuError`` for a negative count or one the card does not have.
    """
    if not _is_int(reserved) or reserved < 0:
        raise GpuError(f"reserved_by_others must be a byte count >= 0; got {reserved!r}")
    if reserved >= card.total_bytes:
        raise GpuError(f"reserved_by_others ({fmt_bytes(reserved)}) leaves nothing of {card.name}'s "
                       f"{fmt_bytes(card.total_bytes)}")
    return replace(card, used_by_others_bytes=reserved, free_bytes=card.total_bytes - reserved)


_DESKTOP_SECTIONS = ("pascal-geforce", "turing-gtx16", "turing-geforce", "ampere-geforce", "ada-geforce",
                     "blackwell-geforce")


# ---------------------------------------------------------------------------------------------------------------
# Names: everything a user might type for a card, folded to one form.

_SEPARATORS = re.compile(r"[\s_\-]+")
_VENDOR_WORDS = re.compile(r"\b(?:nvidia|geforce|tesla|gpu)\b")
_NOT_ALNUM = re.compile(r"[^a-z0-9]")


def _norm(text: str) -> str:
    """``'NVIDIA GeForce RTX 4060 Laptop GPU'`` -> ``'rtx4060laptop'``: case, separators and vendor words dropped."""
    text = _SEPARATORS.sub(" ", text.lower())
    return _NOT_ALNUM.sub("", _VENDOR_WORDS.sub(" ", text))


# ---------------------------------------------------------------------------------------------------------------
# The catalog lives in autofit/catalog/gpus.json: one object per card, with the source of each figure beside it as
# data (FIELD_source), so a figure cannot lose its citation in an edit. Its "about" says what each field means;
# "sources" spells out the abbreviations the source strings use. Checked once on import: a typo in the file should
# stop autofit at once, naming the card and field, rather than plan for a card with a wrong or missing figure.

_CATALOG_FILE = Path(__file__).parent / "catalog" / "gpus.json"
_CATALOG_NAME = "gpus.json"  # how errors name the file: short, the message must stay one line
_CATALOG_FIELDS = ("about", "sources", "compute_capability_source", "sections", "cards")
_FIGURES = ("reported_bytes", "peak_tflops_16", "bandwidth_gbs")  # each needs FIELD_source unless null (unknown)
_CARD_REQUIRED = ("key", "name", "aliases", "section", "nominal_gib", "ecc", "compute_capability", *_FIGURES)
_CARD_OPTIONAL = (*(f"{figure}_source" for figure in _FIGURES), "note")


@functools.cache
def _load_catalog() -> tuple[CatalogCard, ...]:
    """The cards of ``autofit/catalog/gpus.json`` in file order, checked by ``_parse_catalog``; read once."""
    try:
        data = json.loads(_CATALOG_FILE.read_text(encoding="utf-8"), object_pairs_hook=_object_once)
    except (OSError, ValueError) as exc:  # ValueError covers JSONDecodeError and UnicodeDecodeError
        raise GpuError(f"cannot read the GPU catalog {_CATALOG_FILE}: {exc}") from None
    return _parse_catalog(data)


def _object_once(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object whose fields each appear once: json keeps the last of a repeated field without a word."""
    entry: dict[str, object] = {}
    for field, value in pairs:
        if field in entry:
            key = dict(pairs).get("key")
            where = f"card {key}" if isinstance(key, str) else "an object"
            raise GpuError(f"{_CATALOG_NAME}: {where}: field {field!r} appears twice")
        entry[field] = value
    return entry


def _parse_catalog(data: object) -> tuple[CatalogCard, ...]:
    """``CatalogCard``s from the parsed catalog file, in its order (the first variant of an NVML name owns it).

    Raises ``GpuError`` with one line naming the card and field for an unknown or missing field, a value of the
    wrong type, a figure without its source, or a key or alias another card already answers to (compared as
    ``resolve`` reads them, after ``_norm``).
    """
    if not isinstance(data, dict):
        raise GpuError(f"{_CATALOG_NAME}: the top level must be a JSON object, got {type(data).__name__}")
    _check_fields(_CATALOG_NAME, data, _CATALOG_FIELDS, ())
    for field in ("about", "compute_capability_source"):
        _want(_is_text(data[field]), _CATALOG_NAME, field, "a non-empty string", data[field])
    for field in ("sources", "sections"):
        table = data[field]
        _want(isinstance(table, dict) and all(_is_text(k) and _is_text(v) for k, v in table.items()),
              _CATALOG_NAME, field, "an object of non-empty strings", table)
    _want(isinstance(data["cards"], list) and bool(data["cards"]), _CATALOG_NAME, "cards", "a non-empty list",
          data["cards"])
    cards: list[CatalogCard] = []
    owners: dict[str, tuple[int, str]] = {}  # folded name -> (position, key) of the first card to claim it
    for position, entry in enumerate(data["cards"]):
        card = _parse_card(entry, position, data["sections"])
        for field, name in [("key", card.key), *(("aliases", alias) for alias in card.aliases)]:
            claim = (position, card.key)
            owner = owners.setdefault(_norm(name), claim)
            if owner is not claim:  # a second card, or the same card twice (an alias that folds to its own key)
                raise GpuError(f"{_CATALOG_NAME}: card {card.key}: {field}: {name!r} is already a name of {owner[1]} "
                               f"(card #{owner[0] + 1})")
        cards.append(card)
    return tuple(cards)


def _parse_card(entry: object, position: int, sections: dict[str, str]) -> CatalogCard:
    """One card object of the catalog file as a ``CatalogCard``; ``position`` names it when its key is unusable."""
    if not isinstance(entry, dict):
        raise GpuError(f"{_CATALOG_NAME}: card #{position + 1} must be a JSON object, got {entry!r}")
    key = entry.get("key")
    if not _is_text(key):
        raise GpuError(f"{_CATALOG_NAME}: card #{position + 1}: key must be a non-empty string, got {key!r}")
    where = f"{_CATALOG_NAME}: card {key}"
    _check_fields(where, entry, _CARD_REQUIRED, _CARD_OPTIONAL)

    def want(ok: bool, field: str, expected: str) -> None:
        _want(ok, where, field, expected, entry[field])

    want(_is_text(entry["name"]), "name", "a non-empty string")
    aliases = entry["aliases"]
    want(isinstance(aliases, list) and all(_is_text(a) for a in aliases), "aliases", "a list of non-empty strings")
    want(isinstance(entry["section"], str) and entry["section"] in sections, "section",
         f"one of {', '.join(sections)}")
    want(_is_int(entry["nominal_gib"]) and entry["nominal_gib"] > 0, "nominal_gib", "a positive whole number of GiB")
    want(isinstance(entry["ecc"], bool), "ecc", "true or false")
    cc = entry["compute_capability"]
    want(isinstance(cc, list) and len(cc) == 2 and all(_is_int(v) and v >= 0 for v in cc), "compute_capability",
         "[major, minor] as two whole numbers")
    reported = entry["reported_bytes"]
    want(reported is None or (_is_int(reported) and reported > 0), "reported_bytes",
         "a positive number of bytes or null")
    peak = entry["peak_tflops_16"]
    expected = ('a positive number, null, {"geforce_rule": {"sms": N, "boost_mhz": N}} or '
                '{"cuda_core_rule": {"cores": N, "boost_mhz": N}}')
    if isinstance(peak, dict):
        rules = {"geforce_rule": ({"sms", "boost_mhz"}, _geforce_tflops),
                 "cuda_core_rule": ({"cores", "boost_mhz"}, _cuda_core_tflops)}
        name = next(iter(peak), None)
        rule = peak.get(name)
        want(len(peak) == 1 and name in rules and isinstance(rule, dict) and set(rule) == rules[name][0]
             and all(_is_int(v) and v > 0 for v in rule.values()), "peak_tflops_16", expected)
        peak = rules[name][1](**rule)
    else:
        want(peak is None or _is_positive(peak), "peak_tflops_16", expected)
    bandwidth = entry["bandwidth_gbs"]
    want(bandwidth is None or _is_positive(bandwidth), "bandwidth_gbs", "a positive number or null")
    for figure in _FIGURES:
        source = entry.get(f"{figure}_source")
        if entry[figure] is None and source is not None:  # a null figure is unknown: say why in note, not here
            raise GpuError(f"{where}: {figure}_source is given but {figure} is null; explain an unknown figure "
                           f"in note")
        if entry[figure] is not None and not _is_text(source):
            raise GpuError(f"{where}: {figure} has no {figure}_source (a non-empty string), got {source!r}")
    if "note" in entry:
        want(_is_text(entry["note"]), "note", "a non-empty string")
    return CatalogCard(key=key, name=entry["name"], aliases=tuple(aliases), section=entry["section"],
                       nominal_bytes=entry["nominal_gib"] * GiB,
                       reported_bytes=reported, ecc=entry["ecc"], compute_capability=(cc[0], cc[1]),
                       peak_tflops_16=None if peak is None else float(peak),
                       bandwidth_gbs=None if bandwidth is None else float(bandwidth))


def _check_fields(where: str, entry: dict, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    unknown = [field for field in entry if field not in required and field not in optional]
    if unknown:
        raise GpuError(f"{where}: unknown field {unknown[0]!r}; the fields are {', '.join(required + optional)}")
    missing = [field for field in required if field not in entry]
    if missing:
        raise GpuError(f"{where}: missing field {missing[0]!r}")


def _want(ok: bool, where: str, field: str, expected: str, value: object) -> None:
    if not ok:
        raise GpuError(f"{where}: {field} must be {expected}, got {value!r}")


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_positive(value: object) -> bool:
    """A finite number > 0 (JSON lets NaN and Infinity through; bools are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


CATALOG: tuple[CatalogCard, ...] = _load_catalog()


def _derived_names(card: CatalogCard) -> list[str]:
    """Names implied by a card's key and NVML name: ``3060``, ``rtx3060 12gb``, ``4060 laptop``, ..."""
    size = f"{card.nominal_bytes // GiB}gb"
    names = []
    for base in (_norm(card.name), _norm(card.key)):
        short = base[3:] if base.startswith(("rtx", "gtx")) and base[3:4].isdigit() else None
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


def _edits(a: str, b: str) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) that turn ``a`` into ``b``: the optimal string
    alignment distance, so a typed ``3600`` is one edit from ``3060`` and two from ``3090``."""
    rows = [list(range(len(b) + 1))]
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            row.append(min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (ca != cb)))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def _closest_keys(text: str, n: int = 3) -> list[str]:
    """Up to ``n`` catalog keys that look most like ``text``, best first.

    Ranked by the fewest edits to any name of a card (``_edits``, digits included: ``rtx3600`` is a swapped
    ``rtx3060``), then by how far model numbers of the same length are apart (``rtx3070x`` suggests the 3060 before
    the 2070), then by catalog order. Names more than a third of the text's length away are not suggested.
    """
    norm = _norm(text)
    number = _MODEL_NUMBER.search(norm)
    best: dict[str, tuple[int, float]] = {}
    for alias, card in _INDEX.items():
        other = _MODEL_NUMBER.search(alias)
        comparable = number and other and len(number.group()) == len(other.group())
        distance = abs(int(number.group()) - int(other.group())) if comparable else float("inf")
        best[card.key] = min(best.get(card.key, (10**9, float("inf"))), (_edits(norm, alias), distance))
    limit = max(2, len(norm) // 3)
    ranked = sorted((key for key, (edits, _) in best.items() if edits <= limit),
                    key=lambda key: (*best[key], _POSITION[key]))
    return ranked[:n]


# ---------------------------------------------------------------------------------------------------------------
# Specs: what resolve() accepts.

_CUDA_DEVICE = re.compile(r"cuda(?::(.*))?", re.IGNORECASE)
_SIZE_SPEC = re.compile(r"-?\d+(?:\.\d+)?\s*(?:[kmgt]i?b?|b)", re.IGNORECASE)  # a unit is required, see resolve()
_NO_GPU = "no CUDA GPU detected; name the card you plan for, e.g. gpu='rtx3060' or gpu='12GiB'"


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
        raise GpuError("empty GPU spec; name the card you plan for, e.g. gpu='rtx3060' or gpu='12GiB'")
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


@dataclass(frozen=True, kw_only=True, slots=True)
class HostSpeed:
    """What this machine's CPU sustains as torch uses it: an fp32 matmul rate (TFLOPS) and a copy rate (GB/s, bytes
    read plus written), measured by ``host_speed``."""

    matmul_tflops: float
    bandwidth_gbs: float
    threads: int
    source: str  # "measured" now, or "cached" from an earlier measurement on this machine


# The calibration: a 1024 x 1024 x 1024 fp32 matmul (2.1 GFLOP, the shape of a small model's layers at a few hundred
# tokens) and a 64 MiB copy, each timed after a warm-up, the median of five; about half a second on two cores.
_HOST_MATMUL_N = 1024
_HOST_COPY_BYTES = 64 * MiB
_HOST_REPEATS = 5
HOST_SPEED_FILE = "host_speed.json"


@functools.cache
def host_speed() -> HostSpeed:
    """This CPU's sustained fp32 matmul and memory rates, measured once per machine and torch setup.

    The result is kept in autofit's cache folder (``host_speed.json``, keyed by CPU model, torch version and thread
    count), so only the first plan on a machine pays for it; with the cache off it is measured once per process.
    Never raises: an unusable cache file is measured over.
    """
    import torch

    from autofit import calibration
    from autofit.files import write_atomic

    key = f"{_cpu_model()}|torch {torch.__version__}|{torch.get_num_threads()} threads"
    root = calibration.cache_root()
    path = root / HOST_SPEED_FILE if root is not None else None
    if path is not None:
        try:
            cached = json.loads(path.read_text()).get(key)
            if cached:
                return HostSpeed(matmul_tflops=float(cached["matmul_tflops"]),
                                 bandwidth_gbs=float(cached["bandwidth_gbs"]), threads=torch.get_num_threads(),
                                 source="cached")
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass
    speed = measure_host_speed()
    matmul, bandwidth = speed.matmul_tflops, speed.bandwidth_gbs
    if path is not None:
        try:
            table = json.loads(path.read_text()) if path.exists() else {}
            table = table if isinstance(table, dict) else {}
        except (OSError, ValueError):
            table = {}
        table[key] = {"matmul_tflops": matmul, "bandwidth_gbs": bandwidth}
        try:
            write_atomic(path, json.dumps(table, indent=1))
        except OSError as exc:
            log.debug("could not keep the host calibration in %s (%s)", path, exc)
    return speed


def measure_host_speed() -> HostSpeed:
    """This CPU's fp32 matmul and copy rates measured now (``host_speed`` measures once and keeps the result)."""
    import time

    import torch

    def median_seconds(fn) -> float:
        fn()  # warm-up: thread pool, allocation, caches
        times = []
        for _ in range(_HOST_REPEATS):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    n = _HOST_MATMUL_N
    a, b = torch.randn(n, n), torch.randn(n, n)
    matmul = 2 * n**3 / median_seconds(lambda: torch.mm(a, b)) / 1e12
    src = torch.empty(_HOST_COPY_BYTES // 4)
    dst = torch.empty_like(src)
    bandwidth = 2 * _HOST_COPY_BYTES / median_seconds(lambda: dst.copy_(src)) / 1e9
    return HostSpeed(matmul_tflops=matmul, bandwidth_gbs=bandwidth, threads=torch.get_num_threads(),
                     source="measured")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _sized(text: str) -> GpuInfo:
    """A generic card with ``text`` of memory (``12GiB``): no catalog figures.

    No bf16 is assumed: a card known only by its size may be a Turing or Pascal card, where a bf16 plan fails at
    once, while an fp16 plan runs everywhere (with a gradient scaler). Pass ``precision="bf16-mixed"`` to plan bf16 on it.
    """
    if text.startswith("-"):
        raise GpuError(f"GPU memory size {text!r} is negative; give a positive size like 12GiB")
    total = parse_size(text)
    if total <= 0:
        raise GpuError(f"GPU memory size {text!r} is zero; give a positive size like 12GiB")
    return GpuInfo(name=f"{fmt_bytes(total)} card", key=None, total_bytes=total, free_bytes=total,
                   used_by_others_bytes=0, compute_capability=None, bf16=False, peak_tflops_16=None,
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
                       f"e.g. gpu='rtx3060' or gpu='12GiB'")
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
