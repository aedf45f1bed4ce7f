"""Row blocks through shared memory between a client and a shard on the same machine.

gRPC moves a large message at a fraction of what the loopback socket carries (its HTTP/2 framing and copies
cost more than the bytes), so a client on the shard's machine moves row blocks through memory both map:

- the client creates an anonymous memory file (``memfd``) of a fixed size, reserves its pages
  (``posix_fallocate``: a full memory limit fails here, never as a ``SIGBUS`` later), seals its size, writes a
  random nonce at its start, and sends the server the path ``/proc/<pid>/fd/<fd>`` (``AttachBuffer``);
- the server opens that path (it exists only on this machine, for processes of the same user), checks that the
  file's size is sealed (no one can shrink it under the server's map), that it is the user's and starts with
  the nonce, maps it and answers an id;
- a pull names the id and a byte range the client reserved: the server gathers the rows straight into it; a
  push names the range its gradients were written to: the server reads them there when it applies their step
  before answering (async mode, or one sync trainer), else copies them out first;
- a client that dies or drops its buffer without detaching leaves its file mapped only by the server: the
  server drops the buffers whose owner is gone (the process of ``/proc/<pid>``, by its start time: a reused
  pid is another process) or whose descriptor no longer names the file (closed, or reused for another file).

A client that cannot attach (another machine or container, no ``memfd``) sends its row blocks inline.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import secrets
import stat
import threading
import weakref

import numpy as np

ALIGN = 64  # offsets and sizes of reserved ranges: cache-line aligned rows
NONCE_BYTES = 32
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW if hasattr(fcntl, "F_SEAL_SHRINK") else 0
_PROC_FD = re.compile(r"/proc/(\d+)/fd/\d+")  # a client's buffer path: its process and descriptor


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, ``/proc/<pid>/stat``'s 22nd field); None if it
    is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return None
    return int(fields[19])


class ClientBuffer:
    """A client's shared memory file and the byte ranges of it in use (first fit, freed explicitly).

    Raises:
        OSError: the platform has no sealable ``memfd``, or the memory cannot be reserved.
    """

    def __init__(self, size: int) -> None:
        if not hasattr(os, "memfd_create") or not _SEALS:
            raise OSError("no sealable memfd on this platform")
        self.size = size
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self.fd = os.memfd_create("megaclass-ps-buffer", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.posix_fallocate(self.fd, 0, size)  # pages reserved now: a full limit fails here
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            self.map = mmap.mmap(self.fd, size)
        except OSError:
            os.close(self.fd)
            raise
        # a buffer dropped without close() gives its memory back all the same (the descriptor is a plain int)
        self._close = weakref.finalize(self, _unmap_and_close, self.map, self.fd)
        self.map[:NONCE_BYTES] = self.nonce
        self.path = f"/proc/{os.getpid()}/fd/{self.fd}"
        self._used: dict[int, int] = {}  # offset -> bytes
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> int | None:
        """Offset of ``nbytes`` free bytes (aligned), now in use; None when no range is free."""
        nbytes = -(-max(nbytes, 1) // ALIGN) * ALIGN
        with self._lock:
            start = ALIGN  # the nonce's line stays as written
            for offset in sorted(self._used):
                if offset - start >= nbytes:
                    break
                start = offset + self._used[offset]
            if start + nbytes > self.size:
                return None
            self._used[start] = nbytes
            return start

    def release(self, offset: int) -> None:
        with self._lock:
            del self._used[offset]

    def view(self, offset: int, nbytes: int) -> memoryview:
        return memoryview(self.map)[offset : offset + nbytes]

    def close(self) -> None:
        """Unmap and close (once; ranges may still be released after, as bookkeeping)."""
        self._close()
        self.fd = -1


def _unmap_and_close(mapped: mmap.mmap, fd: int) -> None:
    try:
        mapped.close()
    except BufferError:  # a view is still held: the map goes with it
        pass
    os.close(fd)


class AttachedBuffer:
    """A client's buffer as a shard maps it; ranges are checked before every use."""

    def __init__(self, path: str, nonce: bytes, *, max_bytes: int) -> None:
        """Open and check the file at ``path``.

        Raises:
            ValueError: the file is not a sealed memory file of this user starting with ``nonce``.
        """
        if not (NONCE_BYTES // 2 <= len(nonce) <= 2 * NONCE_BYTES):
            raise ValueError(f"nonce: {len(nonce)} bytes, expected {NONCE_BYTES // 2} to {2 * NONCE_BYTES}")
        if not _SEALS:
            raise ValueError("shared buffers need a sealable memfd, which this platform lacks")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise ValueError(f"path {path!r}: cannot open it here ({error.strerror})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise ValueError(f"path {path!r}: not a regular file of this server's user")
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                seals = 0
            if seals & _SEALS != _SEALS:
                raise ValueError(f"path {path!r}: not a memory file with its size sealed")
            if not 2 * ALIGN <= info.st_size <= max_bytes:
                raise ValueError(f"path {path!r}: {info.st_size} bytes, expected {2 * ALIGN} to {max_bytes}")
            self.map = mmap.mmap(fd, info.st_size)
        finally:
            os.close(fd)  # the map keeps the memory
        self._path, self._file = path, (info.st_dev, info.st_ino)
        if self.map[: len(nonce)] != nonce:
            raise ValueError(f"path {path!r}: does not start with the nonce")
        self.size = info.st_size
        owner = _PROC_FD.fullmatch(path)
        started = _start_time(int(owner.group(1))) if owner else None
        self._owner = (int(owner.group(1)), started) if owner and started is not None else None

    def owner_holds_it(self) -> bool:
        """Whether the process that named its file descriptor still runs and the descriptor still names this
        file (always True when the path named no process's descriptor)."""
        if self._owner is None:
            return True
        pid, started = self._owner
        try:
            info = os.stat(self._path)
        except OSError:
            return False  # the descriptor was closed, or the process is gone
        return (info.st_dev, info.st_ino) == self._file and _start_time(pid) == started

    def array(self, offset: int, nbytes: int, *, what: str) -> np.ndarray:
        """The ``nbytes`` bytes at ``offset`` as a writable ``uint8`` array over the shared memory.

        Raises:
            ValueError: naming ``what``, when the range is misaligned or outside the buffer.
        """
        if offset % ALIGN or not ALIGN <= offset <= self.size - nbytes:
            raise ValueError(
                f"{what}: {nbytes} bytes at buffer offset {offset} are not inside the buffer's "
                f"[{ALIGN}, {self.size}) at a multiple of {ALIGN}"
            )
        return np.frombuffer(self.map, dtype=np.uint8, count=nbytes, offset=offset)
