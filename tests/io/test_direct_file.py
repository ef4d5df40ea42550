"""SequentialFile: O_DIRECT writes through an aligned staging buffer, with a buffered fallback."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from moefuse.io import direct_file
from moefuse.io.direct_file import ALIGNMENT, STAGING_BYTES, SequentialFile

# Write sizes around the block and staging sizes: empty, one byte, unaligned, exactly a block,
# more than the staging buffer in one call, and many small writes crossing a staging boundary.
SIZES = {
    "empty": [],
    "one byte": [1],
    "unaligned": [3, ALIGNMENT - 1, 5],
    "one block": [ALIGNMENT],
    "large": [STAGING_BYTES + 7, 2 * STAGING_BYTES],
    "small across staging": [STAGING_BYTES - 10] + [3] * 9,
}


def _payload(sizes):
    chunks = [os.urandom(size) for size in sizes]
    return chunks, b"".join(chunks)


def _write(path: Path, chunks, direct: bool) -> SequentialFile:
    handle = SequentialFile(path, direct)
    for chunk in chunks:
        handle.write(memoryview(chunk))
    handle.close()
    return handle


@pytest.mark.parametrize("case", SIZES)
@pytest.mark.parametrize("direct", [True, False])
def test_file_holds_exactly_the_bytes_written(tmp_path, case, direct):
    chunks, expected = _payload(SIZES[case])
    path = tmp_path / "out.bin"
    path.write_bytes(b"x" * (3 * ALIGNMENT))  # an existing file is truncated
    handle = _write(path, chunks, direct)
    assert path.read_bytes() == expected
    assert handle.size == len(expected)


def test_direct_is_used_where_the_file_system_allows_it(tmp_path):
    probe = tmp_path / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except (OSError, AttributeError):
        pytest.skip("this file system refuses O_DIRECT")
    assert _write(tmp_path / "out.bin", [b"abc"], direct=True).direct


def test_falls_back_when_open_refuses_direct(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_file.os, "open", refusing_open)
    chunks, expected = _payload([5, STAGING_BYTES + 1])
    handle = _write(tmp_path / "out.bin", chunks, direct=True)
    assert not handle.direct
    assert (tmp_path / "out.bin").read_bytes() == expected


def test_falls_back_when_a_direct_write_is_refused(tmp_path, monkeypatch):
    real_write = os.write
    refused = []

    def refusing_write(fd, data):
        if not refused:
            refused.append(True)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct_file.os, "write", refusing_write)
    chunks, expected = _payload([STAGING_BYTES + 11, 17])
    handle = _write(tmp_path / "out.bin", chunks, direct=True)
    assert refused and not handle.direct
    assert (tmp_path / "out.bin").read_bytes() == expected


def test_other_write_errors_are_raised(tmp_path, monkeypatch):
    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_file.os, "write", full_disk)
    handle = SequentialFile(tmp_path / "out.bin", direct=True)
    handle.write(b"abc")
    with pytest.raises(OSError, match="No space"):
        handle.close()
    handle.close()  # closed after the error: a second close does nothing


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no tmpfs at /dev/shm")
def test_tmpfs_refuses_direct_and_still_gets_the_bytes(tmp_path):
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        chunks, expected = _payload([ALIGNMENT + 1, 9])
        handle = _write(Path(folder) / "out.bin", chunks, direct=True)
        assert (Path(folder) / "out.bin").read_bytes() == expected
        assert handle.size == len(expected)


def test_abort_closes_without_writing_the_staged_bytes(tmp_path):
    handle = SequentialFile(tmp_path / "out.bin", direct=True)
    handle.write(b"abc")
    handle.abort()
    assert (tmp_path / "out.bin").read_bytes() == (b"" if handle.direct else b"abc")
    handle.close()  # nothing left to write
    assert (tmp_path / "out.bin").stat().st_size == (0 if handle.direct else 3)
