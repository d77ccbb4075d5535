"""Writing run outputs safely: atomic files and folders, writability and free-space checks, and one-line
messages for storage faults (disk full, read-only file system, permission denied).

The rule everywhere: a file or folder is written under a temporary name next to its final place, flushed to
disk, and renamed into place only when complete, so a kill at any moment leaves either the old version or
the new one, never a mix. Standard library only (no torch), so any module may use it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from typing import Any

# errno -> how the one-line message names the cause
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# Libraries that write through their own C/C++/Rust code lose the errno; these phrases keep it.
_MESSAGE_CAUSES = (
    ("no space left on device", errno.ENOSPC), ("os error 28", errno.ENOSPC),
    ("disk quota exceeded", errno.EDQUOT), ("os error 122", errno.EDQUOT),
    ("read-only file system", errno.EROFS), ("os error 30", errno.EROFS),
    ("permission denied", errno.EACCES), ("os error 13", errno.EACCES),
)
# ... and these say only that a write failed (torch.save on a full disk: "unexpected pos"), so the folder is
# probed with a small write to learn why.
_WRITE_FAILURES = ("unexpected pos", "failed writing", "pytorchstreamwriter", "inline_container", "write failed")


class StorageError(OSError):
    """A write failed for a reason outside the program (disk full, read-only, no permission). The message
    is one line naming the path and the cause, and what was kept; the CLI prints it as `calibrl: error:`."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_

    def __str__(self) -> str:
        return str(self.args[0])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes (for this user) on the file system that holds `path` or, if absent, its nearest parent."""
    return shutil.disk_usage(_existing_ancestor(os.fspath(path))).free


def _errno_of(exc: BaseException) -> int | None:
    """The storage errno behind `exc` (itself, its causes, or named in a library's message), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return exc.errno
        text = str(exc).lower()
        for phrase, code in _MESSAGE_CAUSES:
            if phrase in text:
                return code
        exc = exc.__cause__ or exc.__context__
    return None


def probe_write(folder: str | os.PathLike, size: int = 64 * 1024) -> OSError | None:
    """Try to create, fill (`size` bytes), flush and delete a file in `folder`: None if that works, else the
    OSError (ENOSPC on a full disk, EROFS, EACCES, ...)."""
    folder = os.fspath(folder)
    path = None
    try:
        fd, path = tempfile.mkstemp(prefix=".calibrl-probe-", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e
    finally:
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass
    return None


def storage_cause(exc: BaseException, folder: str | os.PathLike | None = None) -> tuple[int, str] | None:
    """(errno, cause in words) when `exc` is a storage fault, else None.

    A library error that only says the write failed (torch.save on a full disk) is resolved by probing
    `folder` with a small write; call this before deleting the partial files, or the space is back.
    """
    code = _errno_of(exc)
    if code is None and folder is not None and os.path.isdir(folder):
        text = str(exc).lower()
        if isinstance(exc, OSError) or any(p in text for p in _WRITE_FAILURES):
            probe = probe_write(folder)
            code = probe.errno if probe is not None and probe.errno in STORAGE_ERRNOS else None
    if code is None:
        return None
    cause = STORAGE_ERRNOS[code]
    if code in (errno.ENOSPC, errno.EDQUOT) and folder is not None:
        cause += f" ({human_bytes(free_bytes(folder))} free)"
    return code, cause


def check_writable(path: str | os.PathLike, what: str = "output folder") -> None:
    """Raise StorageError (one line) unless files can be created in folder `path` (or, if it does not exist
    yet, in its nearest existing parent, where it would be created). Writes and deletes a small probe file:
    permission bits say nothing for root or on a read-only mount."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise StorageError(f"{what} {path} exists and is not a folder")
    target = _existing_ancestor(path)
    if not os.path.isdir(target):
        raise StorageError(f"{what} {path}: {target} is not a folder")
    err = probe_write(target, size=1)
    if err is not None:
        cause = STORAGE_ERRNOS.get(err.errno, err.strerror or str(err))
        where = "" if os.path.abspath(target) == os.path.abspath(path) else f" (in {target})"
        raise StorageError(f"{what} {path} is not writable{where}: {cause}", err.errno)


def check_file_writable(path: str | os.PathLike, what: str = "output file") -> None:
    """`check_writable` for the folder a file `path` will be written to."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise StorageError(f"{what} {path} is a folder")
    check_writable(os.path.dirname(os.path.abspath(path)), what=f"{what} {path}: folder")


def check_free_space(path: str | os.PathLike, needed: int, what: str) -> None:
    """Raise StorageError (one line) if the file system of `path` has less than `needed` bytes free."""
    free = free_bytes(path)
    if free < needed:
        raise StorageError(f"{path}: only {human_bytes(free)} free, but {what} needs about {human_bytes(needed)}; "
                           "free some space or choose another output_dir", errno.ENOSPC)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file under `path`, then the folders, to the disk (a rename is durable only after that)."""
    path = os.fspath(path)
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not fsync folders; the rename is then as durable as they allow
        pass
    finally:
        os.close(fd)


def publish_dir(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the complete folder `staging` to `final` (same file system) in one rename, after flushing it.

    An existing `final` is first moved aside and deleted after the new one is in place, so at every moment
    a kill leaves one whole version (at worst under the aside name, which `remove_aside` cleans up)."""
    staging, final = os.fspath(staging), os.fspath(final)
    fsync_tree(staging)
    aside = None
    if os.path.lexists(final):
        aside = aside_name(final)
        os.rename(final, aside)
    os.rename(staging, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def aside_name(final: str) -> str:
    head, tail = os.path.split(os.path.abspath(final))
    return os.path.join(head, f".old-{tail}-{os.getpid()}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, flushed, then renamed over it.
    A storage fault raises StorageError naming the path (the old file, if any, is left as it was)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(folder)
    except OSError as e:
        found = storage_cause(e, folder if os.path.isdir(folder) else None)
        if found is None:
            raise
        raise StorageError(f"could not write {path}: {found[1]}", found[0]) from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent, allow_nan=False) + "\n")
