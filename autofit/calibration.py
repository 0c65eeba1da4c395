"""Calibration kept between runs: how measured memory on a card compared with the estimate, per configuration.

A probe records, for each passing trial, the ratio of measured peak reserved memory to the estimate's
``min_reserved``; later plans for the same model, card, method, precision, checkpointing, optimizer and library
versions scale their estimates by the mean ratio. It also records what the process holds on the card outside
PyTorch's allocator (NVML's process memory less ``torch.cuda.memory_reserved`` at the same moment: the CUDA context,
loaded kernels, library workspaces), per card, PyTorch and CUDA release and module loading mode; later plans on that
card take the largest such measurement in place of the assumed context. The store is a small SQLite database in autofit's cache folder
(``$AUTOFIT_CACHE`` or ``~/.cache/autofit``), shared with the probe's Optuna studies. Every write is one transaction,
so the file is never half-written, and several processes can share it; a database another process holds locked is
waited for, a read-only one is read, a cache path that cannot be used leaves autofit running without the cache (said
once), and only a file that is not a database, or holds another program's tables, is moved aside with a warning and a
fresh one started.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from autofit.errors import CacheError

log = logging.getLogger(__name__)

SCHEMA = 1
_OUR_TABLES = {"autofit_meta", "autofit_calibration", "autofit_context"}
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


def context_versions() -> str:
    """What the memory outside PyTorch's allocator depends on besides the card: the PyTorch and CUDA releases (their
    kernels and workspaces) and CUDA's module loading mode."""
    import torch

    loading = "eager" if os.environ.get("CUDA_MODULE_LOADING", "LAZY").upper() == "EAGER" else "lazy"
    return f"torch {torch.__version__}, cuda {torch.version.cuda}, {loading} loading"


# SQLite result codes (sqlite.org/rescode.html): a file that is not a database or is damaged, and a database another
# connection holds. Only the first two are corruption; a lock is waited out and never taken for it.
_CORRUPT_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
_BUSY_CODES = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED
BUSY_SECONDS = 10.0  # each statement waits this long for another process's lock (sqlite3's busy timeout)
LOCK_SECONDS = 60.0  # and opening or recording retries that long in all before it gives up on the cache
_WARNED: set[str] = set()


def _code(err: sqlite3.Error) -> int | None:
    code = getattr(err, "sqlite_errorcode", None)  # Python 3.11+
    return None if code is None else code & 0xFF  # the primary code, without the extended bits


def _is_busy(err: sqlite3.Error) -> bool:
    code = _code(err)
    if code is not None:
        return code in _BUSY_CODES
    return "locked" in str(err) or "busy" in str(err)


def _is_corrupt(err: sqlite3.Error) -> bool:
    code = _code(err)
    if code is not None:
        return code in _CORRUPT_CODES
    return not isinstance(err, sqlite3.OperationalError) and ("not a database" in str(err) or "malformed" in str(err))


def _writable(path: Path) -> bool:
    """Whether SQLite can write ``path``: the file (when it exists) and its folder, where the journal goes."""
    return os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))


def warn_once(message: str) -> None:
    """Logs ``message`` as a warning the first time only: an unusable cache is said once per process."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def open_store() -> "Store | None":
    """The default store, or None (with one warning per process) when the cache is off or cannot be used."""
    if cache_root() is None:
        return None
    try:
        return Store()
    except CacheError as err:
        warn_once(f"{err}; running without the calibration cache")
        return None


class Store:
    """The calibration table. ``Store()`` opens the default database; ``Store(path)`` another file.

    Several processes may share it: every write is one ``BEGIN IMMEDIATE`` transaction, and a database another
    process holds is waited for (``BUSY_SECONDS`` per statement, ``LOCK_SECONDS`` in all), never taken for a corrupt
    one. A read-only database is opened read-only (calibrations are read, not recorded). Raises ``CacheError`` when
    the cache cannot be used: off, a path under a file, an unwritable folder without a database, or a lock that
    outlasts ``LOCK_SECONDS``.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else database_path()
        if self.path is None:
            raise CacheError("the cache is off (AUTOFIT_CACHE=off)")
        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise CacheError(f"the cache path {folder} is a file, not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CacheError(f"cannot use the cache folder {folder} ({err.strerror or err})") from None
        if self.path.exists() and not self.path.is_file():
            raise CacheError(f"the cache database {self.path} is not a file")
        self.readonly = not _writable(self.path)
        if self.readonly and not self.path.exists():
            raise CacheError(f"the cache folder {folder} is read-only and holds no database")
        self._conn = self._open()

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            uri = f"file:{self.path}?mode=ro"
            return sqlite3.connect(uri, uri=True, timeout=BUSY_SECONDS, isolation_level=None)
        return sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None)

    def _open(self) -> sqlite3.Connection:
        deadline = time.monotonic() + LOCK_SECONDS
        moved = False
        while True:
            conn = None
            try:
                conn = self._connect()
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
                    if self.readonly or moved:
                        raise CacheError(f"the cache database {self.path} holds tables autofit did not write")
                    self._move_aside("it holds tables autofit did not write" if foreign else
                                     f"its schema is {schema}, not {SCHEMA}")
                    moved = True
                    continue
                if not self.readonly:
                    self._write(conn, self._create)
                elif "autofit_calibration" not in tables:
                    conn.close()
                    raise CacheError(f"the cache database {self.path} is read-only and holds no calibrations")
                return conn
            except sqlite3.Error as err:
                if conn is not None:
                    conn.close()
                if _is_busy(err):
                    if time.monotonic() < deadline:
                        time.sleep(0.2)
                        continue
                    raise CacheError(f"the cache database {self.path} stayed locked by another process for "
                                     f"{LOCK_SECONDS:.0f} s") from None
                if (_is_corrupt(err) or "integrity check" in str(err)) and not moved and not self.readonly:
                    self._move_aside(f"it is not a readable database ({err})")
                    moved = True
                    continue
                raise CacheError(f"cannot use the cache database {self.path} ({err})") from None

    @staticmethod
    def _create(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS autofit_meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute("INSERT OR IGNORE INTO autofit_meta VALUES ('schema', ?)", (str(SCHEMA),))
        conn.execute("CREATE TABLE IF NOT EXISTS autofit_calibration (key TEXT PRIMARY KEY, model TEXT, "
                     "card TEXT, method TEXT, quantization TEXT, precision TEXT, checkpointing INTEGER, "
                     "optimizer TEXT, versions TEXT, ratio REAL, samples INTEGER, updated REAL)")
        conn.execute("CREATE TABLE IF NOT EXISTS autofit_context (card TEXT, versions TEXT, bytes INTEGER, "
                     "samples INTEGER, updated REAL, PRIMARY KEY (card, versions))")

    @staticmethod
    def _write(conn: sqlite3.Connection, body):
        """Runs ``body(conn)`` in one immediate transaction: the write lock is taken first, so two processes that
        read and then write never deadlock (SQLite answers that with an immediate "database is locked")."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body(conn)
            conn.execute("COMMIT")  # may wait for readers; on failure the transaction is rolled back whole
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def _move_aside(self, why: str) -> None:
        aside = self.path.with_name(f"{self.path.name}.aside-{int(time.time())}")
        log.warning("moving %s aside to %s: %s", self.path, aside, why)
        os.replace(self.path, aside)

    def ratio(self, key: Key) -> tuple[float, int] | None:
        """(mean measured/predicted ratio, samples) for ``key``, or None."""
        row = self._conn.execute("SELECT ratio, samples FROM autofit_calibration WHERE key=?", (key.text(),)).fetchone()
        return (float(row[0]), int(row[1])) if row else None

    def record(self, key: Key, ratio: float) -> tuple[float, int]:
        """Adds one measured/predicted ratio to ``key``'s running mean; returns the new (mean, samples). A read-only
        or long-locked database keeps what it had (with one warning) and the ratio is returned unrecorded."""
        def add(conn):
            row = conn.execute("SELECT ratio, samples FROM autofit_calibration WHERE key=?", (key.text(),)).fetchone()
            mean, n = (float(row[0]), int(row[1])) if row else (0.0, 0)
            mean, n = (mean * n + ratio) / (n + 1), n + 1
            conn.execute("INSERT OR REPLACE INTO autofit_calibration VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                         (key.text(), key.model, key.card, key.method, key.quantization, key.precision,
                          int(key.checkpointing), key.optimizer, key.versions, mean, n, time.time()))
            return mean, n

        return self._record(add, (ratio, 1))

    def context(self, card: str, versions: str) -> tuple[int, int] | None:
        """(the largest memory measured outside the allocator, measurements) on ``card`` with ``versions``
        (``context_versions()``), or None."""
        try:
            row = self._conn.execute("SELECT bytes, samples FROM autofit_context WHERE card=? AND versions=?",
                                     (card, versions)).fetchone()
        except sqlite3.OperationalError:  # a read-only database from before the table existed
            return None
        return (int(row[0]), int(row[1])) if row else None

    def record_context(self, card: str, versions: str, nbytes: int) -> tuple[int, int]:
        """Adds one measurement of the memory outside the allocator on ``card``; returns the new (largest, count).
        Read-only or long-locked databases keep what they had, as ``record`` says."""
        def add(conn):
            row = conn.execute("SELECT bytes, samples FROM autofit_context WHERE card=? AND versions=?",
                               (card, versions)).fetchone()
            largest, n = (max(int(row[0]), nbytes), int(row[1]) + 1) if row else (nbytes, 1)
            conn.execute("INSERT OR REPLACE INTO autofit_context VALUES (?,?,?,?,?)",
                         (card, versions, largest, n, time.time()))
            return largest, n

        return self._record(add, (nbytes, 1))

    def _record(self, add, unrecorded):
        if self.readonly:
            warn_once(f"the cache database {self.path} is read-only: calibrations are read, not recorded")
            return unrecorded
        deadline = time.monotonic() + LOCK_SECONDS
        while True:
            try:
                return self._write(self._conn, add)
            except sqlite3.OperationalError as err:
                if _is_busy(err) and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                warn_once(f"calibration not recorded in {self.path} ({err})")
                return unrecorded

    def entries(self) -> list[dict]:
        cursor = self._conn.execute("SELECT model, card, method, quantization, precision, checkpointing, optimizer, "
                                    "versions, ratio, samples, updated FROM autofit_calibration ORDER BY updated DESC")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def clear(self) -> int:
        """Forgets every calibration and every probe study; returns how many calibrations there were. Raises
        ``CacheError`` for a read-only database."""
        if self.readonly:
            raise CacheError(f"the cache database {self.path} is read-only; make it writable to clear it")

        def delete(conn):
            count = conn.execute("SELECT COUNT(*) FROM autofit_calibration").fetchone()[0]
            conn.execute("DELETE FROM autofit_calibration")
            conn.execute("DELETE FROM autofit_context")
            return count

        try:
            n = self._write(self._conn, delete)
        except sqlite3.OperationalError as err:
            raise CacheError(f"cannot clear the cache database {self.path} ({err})") from None
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
