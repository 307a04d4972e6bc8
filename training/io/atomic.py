"""Atomic file writes: a temporary file in the target folder, then a rename (or an exclusive link).

A crash, a signal or a full disk never leaves half a file where a user's file (or the previous
version) was, and a file another process wrote meanwhile is never silently replaced when the
caller asked not to overwrite. Temporary files carry the writer's process id in their name
(``.<name>.<pid>.<random>.tmp``): the process removes its own on SIGTERM/SIGINT/SIGHUP (once
:func:`remove_temporaries_on_signals` is called, as the CLI does), and the next write to the same
target removes those of writers that no longer run (a SIGKILL cannot be caught).
The temporary file gets the permissions a plain ``open()`` would give.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from training.errors import InputError

# Temporary files this process has open (removed on a signal); guarded: writers may be threads.
_LIVE: set[str] = set()
_LIVE_LOCK = threading.Lock()
_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")

_OS_REASONS = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENAMETOOLONG: "the file name is too long",
    errno.EISDIR: "it is a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a part of the path is a file, not a folder",  # from mkdir: links are checked apart
    errno.ELOOP: "the path has a symbolic-link loop",
}


def default_file_mode() -> int:
    """The mode a plain ``open(..., "w")`` would give (mkstemp's 0600 would hide files from others)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def os_error_reason(e: OSError) -> str:
    """A user's words for why a file operation failed."""
    return _OS_REASONS.get(e.errno, e.strerror or type(e).__name__)


def cannot_write(path: Path, e: OSError) -> InputError:
    return InputError(f"{path}: cannot write here ({os_error_reason(e)}); choose another output location")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove temporary files left for ``path`` by writers that no longer run; returns them."""
    path = Path(path)
    pattern = re.compile(re.escape(_temp_prefix(path)) + r"(\d+)\..+\.tmp(\.nii(\.gz)?)?$")
    removed = []
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in candidates:
        m = pattern.match(p.name)
        if m and not _process_alive(int(m.group(1))):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def check_writable(path: Path) -> None:
    """Raise :class:`InputError` now if ``path`` cannot be written (before any long work): makes
    the missing folders and a temporary file there, then removes them all (a refusal that comes
    later, e.g. for a bad dataset, leaves nothing behind)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise InputError(f"{path}: is a folder; give a file name")
        created = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with _temporary(path, suffix=".tmp"):
                pass
        finally:
            for d in created:  # innermost first
                d.rmdir()
    except OSError as e:
        raise cannot_write(path, e) from None


@contextmanager
def _temporary(path: Path, suffix: str) -> Iterator[str]:
    fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    with _LIVE_LOCK:
        _LIVE.add(tmp)
    try:
        yield tmp
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(tmp)
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def atomic_output(path: Path, suffix: str = ".tmp", overwrite: bool = True) -> Iterator[str]:
    """Yield a temporary file name in ``path``'s folder; once the block ends without an error the
    file becomes ``path`` in one step, else it is removed.

    With ``overwrite=False`` the file is linked into place exclusively: if ``path`` exists by then
    (another process wrote it meanwhile), :class:`InputError` is raised and nothing is replaced.
    File-system errors (read-only, full, permissions) become :class:`InputError`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        with _temporary(path, suffix) as tmp:
            yield tmp
            os.chmod(tmp, default_file_mode())
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise InputError(
                        f"{path}: already exists (written meanwhile by another run?); remove it or "
                        "allow overwriting"
                    ) from None
    except OSError as e:
        raise cannot_write(path, e) from None


def atomic_write_text(path: Path, text: str, overwrite: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), overwrite)


def atomic_write_bytes(path: Path, data: bytes, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename: never half a file."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def remove_temporaries_on_signals() -> None:
    """On SIGTERM, SIGINT or SIGHUP remove this process's temporary files, then die of the
    signal as before (the exit status still says which). Call once, from the main thread."""
    for name in _SIGNALS:
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        previous = signal.getsignal(sig)
        if getattr(previous, "removes_temporaries", False):  # installed already (main() runs twice in tests)
            continue
        signal.signal(sig, _cleanup_then(sig, previous))


def _cleanup_then(sig: int, previous) -> Callable:
    def handler(signum, frame) -> None:
        with _LIVE_LOCK:
            live = list(_LIVE)
        for tmp in live:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)

    handler.removes_temporaries = True
    return handler
