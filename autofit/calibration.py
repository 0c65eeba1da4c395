"""Calibration kept between runs: how measured memory on a card compared with the estimate, per configuration.

A probe records, for each passing trial, the ratio of measured peak reserved memory to the estimate's
``min_reserved``; later plans for the same model, card, method, precision, checkpointing, optimizer and library
versions scale their estimates by the mean ratio. The store is a small SQLite database in autofit's cache folder
(``$AUTOFIT_CACHE`` or ``~/.cache/autofit``), shared with the probe's Optuna studies. Every write is one transaction,
so the file is never half-written; a file that is not a database, or holds another program's tables, is moved aside
with a warning and a fresh one started.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = 1
_OUR_TABLES = {"autofit_meta", "autofit_calibration"}
# tables Optuna's RDB storage creates in the same file
_OPTUNA_TABLES = {"studies", "study_directions", "study_user_attributes", "study_system_attributes", "trials",
                  "trial_user_attributes", "trial_system_attributes", "trial_params", "trial_values",
                  "trial_intermediate_values", "trial_heartbeats", "version_info", "alembic_version"}


def cache_root() -> Path | None:
    """autofit's cache folder, or None when ``AUTOFIT_CACHE`` is ``off``."""
    root = os.environ.get("AUTOFIT_CACHE")
    if root is not None and root.lower() in ("off", "0", "no", "false", ""):
        return None
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "autofit"


def database_path() -> Path | None:
    root = cache_root()
    return None if root is None else root / "autofit.db"


@dataclass(frozen=True, kw_only=True, slots=True)
class Key:
    """What a calibration is specific to."""

    model: str  # the model's name and config fingerprint
    card: str
    method: str
    quantization: str
    precision: str
    checkpointing: bool
    optimizer: str
    versions: str

    def text(self) -> str:
        return "|".join(str(getattr(self, f)) for f in self.__slots__)

    @classmethod
    def of(cls, spec, card_name: str, cfg) -> "Key":
        """The key of a step configuration (``autofit.simulate.StepConfig``) of ``spec`` on the card so named."""
        return cls(model=f"{spec.name}@{spec.fingerprint}", card=card_name, method=cfg.method,
                   quantization=cfg.quantization, precision=cfg.precision, checkpointing=cfg.gradient_checkpointing,
                   optimizer=cfg.optimizer, versions=versions())


def versions() -> str:
    import peft
    import torch
    import transformers

    from autofit import __version__

    return f"autofit {__version__}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"


class Store:
    """The calibration table. ``Store()`` opens the default database; ``Store(path)`` another file."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else database_path()
        if self.path is None:
            raise ValueError("the cache is off (AUTOFIT_CACHE=off)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = self._open()

    def _open(self) -> sqlite3.Connection:
        for _ in range(2):
            try:
                conn = sqlite3.connect(self.path, timeout=30)
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise sqlite3.DatabaseError("integrity check failed")
                foreign = tables - _OUR_TABLES - _OPTUNA_TABLES
                schema = None
                if "autofit_meta" in tables:
                    row = conn.execute("SELECT value FROM autofit_meta WHERE key='schema'").fetchone()
                    schema = int(row[0]) if row else None
                if foreign or ("autofit_meta" in tables and schema != SCHEMA) or (tables and not tables & _OUR_TABLES
                                                                                   and not tables <= _OPTUNA_TABLES):
                    conn.close()
                    self._move_aside("it holds tables autofit did not write" if foreign else
                                     f"its schema is {schema}, not {SCHEMA}")
                    continue
                with conn:
                    conn.execute("CREATE TABLE IF NOT EXISTS autofit_meta (key TEXT PRIMARY KEY, value TEXT)")
                    conn.execute("INSERT OR IGNORE INTO autofit_meta VALUES ('schema', ?)", (str(SCHEMA),))
                    conn.execute("CREATE TABLE IF NOT EXISTS autofit_calibration (key TEXT PRIMARY KEY, model TEXT, "
                                 "card TEXT, method TEXT, quantization TEXT, precision TEXT, checkpointing INTEGER, "
                                 "optimizer TEXT, versions TEXT, ratio REAL, samples INTEGER, updated REAL)")
                return conn
            except sqlite3.DatabaseError as err:
                self._move_aside(f"it is not a readable database ({err})")
        raise RuntimeError(f"cannot open a calibration database at {self.path}")

    def _move_aside(self, why: str) -> None:
        aside = self.path.with_name(f"{self.path.name}.aside-{int(time.time())}")
        log.warning("moving %s aside to %s: %s", self.path, aside, why)
        os.replace(self.path, aside)

    def ratio(self, key: Key) -> tuple[float, int] | None:
        """(mean measured/predicted ratio, samples) for ``key``, or None."""
        row = self._conn.execute("SELECT ratio, samples FROM autofit_calibration WHERE key=?", (key.text(),)).fetchone()
        return (float(row[0]), int(row[1])) if row else None

    def record(self, key: Key, ratio: float) -> tuple[float, int]:
        """Adds one measured/predicted ratio to ``key``'s running mean; returns the new (mean, samples)."""
        with self._conn:
            row = self._conn.execute("SELECT ratio, samples FROM autofit_calibration WHERE key=?",
                                     (key.text(),)).fetchone()
            mean, n = (float(row[0]), int(row[1])) if row else (0.0, 0)
            mean, n = (mean * n + ratio) / (n + 1), n + 1
            self._conn.execute("INSERT OR REPLACE INTO autofit_calibration VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                               (key.text(), key.model, key.card, key.method, key.quantization, key.precision,
                                int(key.checkpointing), key.optimizer, key.versions, mean, n, time.time()))
        return mean, n

    def entries(self) -> list[dict]:
        cursor = self._conn.execute("SELECT model, card, method, quantization, precision, checkpointing, optimizer, "
                                    "versions, ratio, samples, updated FROM autofit_calibration ORDER BY updated DESC")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def clear(self) -> int:
        """Forgets every calibration and every probe study; returns how many calibrations there were."""
        with self._conn:
            n = self._conn.execute("SELECT COUNT(*) FROM autofit_calibration").fetchone()[0]
            self._conn.execute("DELETE FROM autofit_calibration")
        try:
            import optuna

            storage = optuna.storages.RDBStorage(self.url)
            for study in optuna.get_all_study_summaries(storage):
                optuna.delete_study(study_name=study.study_name, storage=storage)
        except Exception as err:  # no studies table yet, or optuna missing: nothing to delete
            log.debug("no probe studies to clear (%s)", err)
        return n

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def close(self) -> None:
        self._conn.close()
