"""Write a file front to back past the page cache (O_DIRECT), for checkpoint shards.

A merge writes every output byte once and never reads it back, so a buffered write only costs:
the kernel must allocate a fresh page-cache page for every 4 KiB (on a virtual machine that
hands free memory back to its host, each such page is also a host page fault), and where the
inputs do not fit in memory, the output evicts their cached pages. With O_DIRECT the device reads
the bytes straight from user memory, which must be aligned to its blocks: bytes are gathered in
an aligned staging buffer and written in whole blocks; the last block is padded with zeros and
the file is then truncated to its true length.

Where the file system refuses O_DIRECT (tmpfs and some FUSE or network file systems answer
EINVAL, at open or at the first write), the file falls back to plain unbuffered `write` calls
and stays correct.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from typing import Optional

ALIGNMENT = 4096  # bytes; a multiple of every common logical block size
STAGING_BYTES = 8 << 20


class SequentialFile:
    """A new file at `path` (truncated if it exists), written in order with `write`."""

    def __init__(self, path: os.PathLike, direct: bool = True):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._fd: Optional[int] = None
        if self.direct:
            try:
                self._fd = os.open(path, flags | os.O_DIRECT, 0o666)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                self.direct = False
        if self._fd is None:
            self._fd = os.open(path, flags, 0o666)
        self._staging = mmap.mmap(-1, STAGING_BYTES) if self.direct else None  # page-aligned
        self._staged = 0
        self.size = 0  # bytes written so far

    def write(self, data) -> None:
        """Append the bytes of `data` (any object with the buffer protocol)."""
        with memoryview(data) as whole, whole.cast("B") as view:
            self.size += len(view)
            if self._staging is None:
                self._write_all(view)
                return
            done = 0
            while done < len(view):
                take = min(len(view) - done, STAGING_BYTES - self._staged)
                self._staging[self._staged:self._staged + take] = view[done:done + take]
                self._staged += take
                done += take
                if self._staged == STAGING_BYTES:
                    self._write_staged(STAGING_BYTES)

    def close(self) -> None:
        """Write what is staged and close; the file then holds exactly the bytes written."""
        if self._fd is None:
            return
        try:
            if self._staged:
                padded = -(-self._staged // ALIGNMENT) * ALIGNMENT
                self._staging[self._staged:padded] = bytes(padded - self._staged)
                self._write_staged(padded)
                os.ftruncate(self._fd, self.size)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without writing what is staged (the caller discards the file)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._staging is not None:
            self._staging.close()
            self._staging = None

    def _write_staged(self, nbytes: int) -> None:
        # Views released on the way out, even on error, so that the mapping can be closed.
        with memoryview(self._staging) as staging, staging[:nbytes] as block:
            self._write_all(block)
        self._staged = 0

    def _write_all(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            try:
                with view[done:] as rest:
                    done += os.write(self._fd, rest)
            except OSError as error:
                if not (self.direct and error.errno == errno.EINVAL):
                    raise
                # The file system takes O_DIRECT at open but not for writes: write through the
                # page cache from here on (a refused write wrote nothing).
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False
