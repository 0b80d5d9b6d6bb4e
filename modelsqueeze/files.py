"""Opening the files a command reads: regular files only, opened without blocking and sized
before they are read, so a named pipe, a device or a huge sparse file is one clear error (never a
hang, an endless read or gigabytes of memory). And naming the output in a failed write."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import BinaryIO, Iterator

from modelsqueeze.errors import ModelSqueezeError

_KINDS = {stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


_writing: ContextVar[Path | None] = ContextVar("writing", default=None)


@contextmanager
def writing(path: str | os.PathLike, what: str = "it") -> Iterator[None]:
    """An OSError of the writes inside (a full disk, a quota: the OS names no file, or names a
    staging file) becomes one error naming `path`, the output the user asked for. Nested uses
    name the outermost output. Writes are staged and renamed, so the previous file stays."""
    if _writing.get() is not None:
        yield
        return
    token = _writing.set(Path(path))
    try:
        yield
    except BrokenPipeError:  # stdout closed: the CLI ends quietly, as Unix tools do
        raise
    except OSError as exc:
        raise ModelSqueezeError(f"{path}: cannot write {what}: {exc.strerror or exc} (nothing was replaced)") from None
    finally:
        _writing.reset(token)


def kind_of(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def check_regular(path: str | os.PathLike, what: str) -> os.stat_result:
    """The stat of `path` (links followed) if it is a regular file; else one clear error."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelSqueezeError(f"{path}: no such file") from None
    except OSError as exc:
        raise ModelSqueezeError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelSqueezeError(f"{path}: is {kind_of(st.st_mode)}, expected {what}")
    return st


def open_input(path: str | os.PathLike, what: str) -> BinaryIO:
    """`path` opened for reading if it is a regular file. The open does not block (a named pipe
    swapped in after a stat would otherwise wait for a writer forever), and the check is made on
    the opened file itself."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ModelSqueezeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ModelSqueezeError(f"{path}: is a directory, expected {what}") from None
    except OSError as exc:
        raise ModelSqueezeError(f"{path}: cannot read: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ModelSqueezeError(f"{path}: is {kind_of(st.st_mode)}, expected {what}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_input(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> bytes:
    """The whole of a regular file, refused before reading when it is over `max_bytes`."""
    with open_input(path, what) as handle:
        size = os.fstat(handle.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise ModelSqueezeError(f"{path}: {size:,} bytes, over the {max_bytes:,}-byte limit for {what}")
        try:
            return handle.read()
        except OSError as exc:
            raise ModelSqueezeError(f"{path}: cannot read: {exc.strerror or exc}") from None


def memory_bytes() -> int:
    """This machine's physical memory: no file or tensor a command reads may claim more."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 1 << 62
