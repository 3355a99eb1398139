"""Directory writes that a kill at any moment leaves whole: a directory holds either all of
the old content or all of the new, never a mix, and never goes missing.

A save or merge writes its directory in full under a temporary name beside the target,
fsyncs it, and swaps it in with one rename: rename(2) when the target does not exist,
renameat2(RENAME_EXCHANGE) when it does (Linux 3.15+, glibc 2.28+; the old content then sits
under the temporary name and is deleted). Where the exchange is not available the old
directory is renamed aside first, which leaves a moment in which the target is missing
(documented in docs/adapter-format.md). Temporary names are `.{name}.lora-{kind}-{pid}-{random}`,
so the next run finds the leftovers of a killed one by name and removes them once that
process is gone. Nothing here knows about adapters or checkpoints.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil

__all__ = ["exchange", "fsync_dir", "new_temp_dir", "remove_leftovers", "replace_dir", "umask",
           "write_file"]


def write_file(path: str, data, write=None) -> None:
    """`data` in a new file at `path` (mode as a plain open gives it under the umask),
    flushed and fsynced. `write(f, data)` writes it (default f.write)."""
    with open(path, "xb") as f:
        (write or (lambda f, d: f.write(d)))(f, data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    """Make renames and new entries in directory `path` durable (POSIX; a no-op elsewhere)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prefix(name: str, kind: str) -> str:
    return f".{name}.lora-{kind}-"


def new_temp_dir(parent: str, name: str, kind: str) -> str:
    """A new empty directory beside `parent/name`, named so remove_leftovers finds it."""
    path = os.path.join(parent, f"{_prefix(name, kind)}{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(path, 0o700)
    return path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(parent: str, name: str, kind: str) -> int:
    """Delete the temporary directories that killed runs of `kind` on `parent/name` left
    (those whose process is gone); returns how many."""
    prefix, removed = _prefix(name, kind), 0
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: str, b: str) -> bool:
    """Swap the paths a and b in one atomic step; False where the system cannot (not Linux,
    an old kernel or libc, a filesystem without it), OSError for a real failure."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def replace_dir(new: str, target: str) -> None:
    """Put directory `new` at `target` (which may exist: its content is replaced as one), then
    delete the old content. `new` must be fsynced; the parent is fsynced here."""
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.lexists(target):
        os.rename(new, target)
    elif exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # now the old content
    else:
        aside = new + "-old"
        os.rename(target, aside)
        os.rename(new, target)
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(parent)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
