"""One run per output folder: an exclusive lock file naming its holder (pid and host).

The lock is ``run.lock`` in the folder, held from :meth:`RunLock.acquire` to
:meth:`RunLock.release`. Its content (pid, host, start time, command) names the holder; the
kernel's ``flock`` on it makes taking it race-free and is dropped when the holding process
dies, however it dies. A second run into the folder stops at once, naming the holder.

A lock file left by a process that is gone (same host, no process holding the flock, or the
recorded pid no longer running where ``flock`` is not supported) is taken over, and
:attr:`RunLock.previous` names the old holder so the caller can say so. A lock file written on
another host is never taken over automatically: whether that process still runs cannot be
checked from here, so the message says how to remove the file.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from dataclasses import asdict, dataclass
from typing import Optional

from .errors import RunFolderError

__all__ = ["LOCK_NAME", "LockHolder", "RunLock"]

LOCK_NAME = "run.lock"


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a lock."""
    pid: int
    host: str
    started: str = ""
    command: str = ""

    @classmethod
    def this_process(cls) -> "LockHolder":
        return cls(pid=os.getpid(), host=socket.gethostname(),
                   started=datetime.datetime.now().isoformat(timespec="seconds"), command=" ".join(sys.argv))

    def describe(self) -> str:
        started = f", started {self.started}" if self.started else ""
        command = f": {self.command}" if self.command else ""
        return f"process {self.pid} on host {self.host}{started}{command}"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # exists, owned by another user
        return True
    return True


def _try_flock(fd: int) -> Optional[bool]:
    """True: locked; False: another open file holds it; None: this filesystem has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return True


def _read_holder(fd: int) -> Optional[LockHolder]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode("utf-8", "replace")
    try:
        fields = json.loads(text)
        return LockHolder(pid=int(fields["pid"]), host=str(fields["host"]), started=str(fields.get("started", "")),
                          command=str(fields.get("command", "")))
    except (ValueError, KeyError, TypeError):
        return None


def _write_holder(fd: int, holder: LockHolder) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(asdict(holder)) + "\n").encode("utf-8"))
    os.fsync(fd)


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


class RunLock:
    """The exclusive lock of one output folder."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.previous: Optional[LockHolder] = None    # a gone holder whose lock file was taken over
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunFolderError naming its holder."""
        me = LockHolder.this_process()
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = _try_flock(fd)
                holder = _read_holder(fd)
                if locked is False:
                    raise RunFolderError(self._busy(holder))
                if locked and not _same_file(fd, self.path):   # released and removed meanwhile: try again
                    os.close(fd)
                    continue
                if holder is not None and holder.pid != me.pid and not self._gone(holder, me, locked):
                    raise RunFolderError(self._busy(holder))
                _write_holder(fd, me)
            except BaseException:
                os.close(fd)
                raise
            self._fd, self.previous = fd, holder if holder is not None and holder.pid != me.pid else None
            return self
        raise RunFolderError(f"could not lock {self.path}: it keeps being replaced by other processes")

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                os.unlink(self.path)
        finally:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def _gone(holder: LockHolder, me: LockHolder, flock_held: Optional[bool]) -> bool:
        """Whether the run that wrote ``holder`` has certainly ended."""
        if holder.host != me.host:
            return False             # cannot be checked from this host
        if flock_held:
            return True              # same host: a live holder would still hold the flock
        return not _pid_running(holder.pid)

    def _busy(self, holder: Optional[LockHolder]) -> str:
        who = holder.describe() if holder is not None else "a process that has not written its name yet"
        text = (f"output folder {self.folder} is in use by another run ({who}). Wait for it to finish, or give this "
                "run its own folder with --tag NAME (or --output DIR).")
        if holder is not None and holder.host != socket.gethostname():
            text += (f" Whether that process still runs cannot be checked from host {socket.gethostname()}: if it "
                     f"has ended, delete {self.path} and start again.")
        return text
