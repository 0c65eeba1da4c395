"""The SQLite calibration cache as shared state: concurrent processes, locks, read-only and mistyped paths, and a
truly corrupt file. No calibration is ever lost to a lock, and a locked database is never taken for a corrupt one."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from autofit import calibration
from autofit.cli import main
from autofit.errors import CacheError

ROOT = Path(__file__).resolve().parents[1]


def key(name: str) -> calibration.Key:
    return calibration.Key(model=name, card="rtx3060", method="full", quantization="none", precision="bf16",
                           checkpointing=False, optimizer="adamw_torch_fused", versions="test")


def with_calibrations(path: Path, n: int = 3) -> None:
    store = calibration.Store(path)
    for i in range(n):
        store.record(key(f"model-{i}"), 1.0 + i / 10)
    store.close()


def aside(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".aside-" in p.name]


WRITER = """
import os, sys, time
from autofit import calibration
path, me, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
print("ready", flush=True)
while not os.path.exists(go):  # both start together, so their records interleave
    time.sleep(0.01)
def key(name):
    return calibration.Key(model=name, card="rtx3060", method="full", quantization="none", precision="bf16",
                           checkpointing=False, optimizer="adamw_torch_fused", versions="test")
for i in range(n):
    store = calibration.Store(path)  # open, record, close: as many probe processes do, interleaved
    store.record(key("shared"), 1.0)
    store.record(key(me), 2.0)
    store.close()
"""


def test_two_processes_recording_at_once_lose_nothing(tmp_path):
    path = tmp_path / "autofit.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    n, go = 100, tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, str(n), str(go)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name in ("first", "second")]
    assert [w.stdout.readline().strip() for w in writers] == ["ready", "ready"]
    go.touch()
    errors = [w.communicate(timeout=120)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    entries = {e["model"]: e for e in calibration.Store(path).entries()}
    assert entries["shared"]["samples"] == 2 * n  # every record of both processes counted once
    assert entries["first"]["samples"] == entries["second"]["samples"] == n
    assert aside(tmp_path) == [] and "moving" not in "".join(errors)


def test_a_locked_database_is_waited_for_not_moved_aside(tmp_path, monkeypatch):
    path = tmp_path / "autofit.db"
    with_calibrations(path)
    monkeypatch.setattr(calibration, "BUSY_SECONDS", 0.1)
    monkeypatch.setattr(calibration, "LOCK_SECONDS", 0.5)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process mid-write, for longer than autofit waits
    try:
        with pytest.raises(CacheError, match="stayed locked by another process"):
            calibration.Store(path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert aside(tmp_path) == [] and len(calibration.Store(path).entries()) == 3


def test_a_lock_released_in_time_is_waited_out(tmp_path, monkeypatch):
    path = tmp_path / "autofit.db"
    with_calibrations(path)
    monkeypatch.setattr(calibration, "BUSY_SECONDS", 0.1)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(0.6, lambda: (holder.execute("ROLLBACK"), holder.close()))
    release.start()
    started = time.monotonic()
    store = calibration.Store(path)
    store.record(key("model-0"), 1.0)
    release.join()
    assert time.monotonic() - started >= 0.5 and aside(tmp_path) == []
    assert {e["model"]: e["samples"] for e in store.entries()} == {"model-0": 2, "model-1": 1, "model-2": 1}


def test_a_read_only_database_is_read_and_kept(tmp_path, monkeypatch, caplog):
    path = tmp_path / "autofit.db"
    with_calibrations(path)
    before = path.read_bytes()
    monkeypatch.setattr(calibration, "_writable", lambda p: False)  # as a read-only file system reports it
    monkeypatch.setattr(calibration, "_WARNED", set())
    store = calibration.Store(path)
    assert store.readonly and len(store.entries()) == 3
    with caplog.at_level(logging.WARNING):
        store.record(key("model-0"), 9.0)
        store.record(key("model-0"), 9.0)
    assert caplog.text.count("read-only: calibrations are read, not recorded") == 1
    with pytest.raises(CacheError, match="read-only"):
        store.clear()
    store.close()
    assert path.read_bytes() == before and aside(tmp_path) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes read-only files anyway")
def test_a_read_only_database_on_disk(tmp_path):
    path = tmp_path / "autofit.db"
    with_calibrations(path)
    path.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        store = calibration.Store(path)
        assert store.readonly and len(store.entries()) == 3
        store.close()
    finally:
        tmp_path.chmod(0o755)
    assert aside(tmp_path) == []


def test_a_read_only_empty_cache_folder_runs_without_a_cache(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv("AUTOFIT_CACHE", str(folder))
    monkeypatch.setattr(calibration, "_writable", lambda p: False)
    monkeypatch.setattr(calibration, "_WARNED", set())
    with pytest.raises(CacheError, match="read-only and holds no database"):
        calibration.Store()
    assert calibration.open_store() is None
    code = main(["cache", "list"])
    out = capsys.readouterr().out
    assert code == 0 and "not usable" in out and "0 calibrations" in out
    assert main(["cache", "clear"]) == 2 and "cannot clear the cache" in capsys.readouterr().err


def test_a_cache_path_under_a_file(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("AUTOFIT_CACHE", str(blocker / "cache"))
    with pytest.raises(CacheError, match="cannot use the cache folder"):
        calibration.Store()
    assert main(["cache", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["usable"] is False


def test_a_truly_corrupt_database_is_still_moved_aside(tmp_path, caplog):
    path = tmp_path / "autofit.db"
    with_calibrations(path)
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # the schema page, overwritten
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        store = calibration.Store(path)
    assert store.entries() == [] and len(aside(tmp_path)) == 1 and "not a readable database" in caplog.text
