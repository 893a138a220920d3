"""One writer per rankings store: an exclusive ``flock`` on ``OUT/.lock``.

The kernel releases a ``flock`` when its holder exits, however it exits (``kill -9`` included), so a
lock left behind by a dead process never blocks the next run: the file may remain, the lock does
not. The file records the holder (pid, host, start time) for the refusal message and is removed on
a clean exit. Under ``torchrun`` only rank 0 takes the lock: the job's other ranks are the same
writer, working on other shards.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from prtool.errors import PrtoolError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


class StoreLock:
    """``with StoreLock(out):`` holds the store for this process or raises a one-line :class:`PrtoolError`."""

    def __init__(self, store: Path):
        self.store = Path(store)
        self.path = self.store / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(os.read(fd, 4096))
                os.close(fd)
                raise PrtoolError(f"rankings store {self.store} is being written by another `prtool rank` ({holder}): "
                                  "let it finish (then rerun this command to verify the store), or stop it and rerun "
                                  "this command to resume") from None
            except OSError as exc:  # a filesystem without locks: say so, and go on unprotected
                log.warning("cannot lock %s (%s): make sure no other `prtool rank` writes this store", self.path, exc)
                os.close(fd)
                return
            if _same_file(fd, self.path):
                self._fd = fd
            else:  # the previous holder removed the file between our open and our lock: take the new one
                os.close(fd)
        previous = os.read(self._fd, 4096)
        if previous.strip():
            log.info("%s: the run that held it (%s) is no longer running; taking over", self.path, _describe(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(me).encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding the lock, so no one locks a file about to vanish
        os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"
