"""Atomic outputs, for every writer (mxc-convert, fine-tuning outputs and checkpoints, chat's web pages).

A directory is written under a hidden temporary name beside its target and renamed into place only when
complete; a replaced target is swapped out first and put back if the rename fails, so an interrupted run
never leaves a half-written model, checkpoint or page, nor loses the one it was replacing. Folders created
on the way are removed again on failure. A file goes through a temporary file in its directory and
`os.replace`.

Modes: what is created here gets the mode the user's umask gives any new file or folder (0644 / 0755 by
default): not `tempfile`'s 0600 / 0700, which the rename would carry over to the published output, so
that a teammate could not read a model directory on a shared disk. `readable_as_umask` gives a file that a
library wrote with a mode of its own (MindSpore's `save_checkpoint` writes 0400) the same mode.
"""
import contextlib
import json
import os
import shutil
import threading
import uuid
from typing import Callable, Iterator, List, Optional, Union

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (from /proc where it is there; `os.umask` can only be read by setting it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets: 0666 less the umask (0644 by default)."""
    return 0o666 & ~current_umask()


def readable_as_umask(path: str) -> None:
    os.chmod(path, file_mode())


def missing_parents(path: str) -> List[str]:
    """The folders above `path` that do not exist yet, outermost first."""
    missing = []
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    return missing[::-1]


def make_sibling_dir(path: str, what: str) -> str:
    """A new hidden directory beside `path` (`.<name>.<what>-<random>`), made by `os.mkdir`, so with the mode
    the umask gives."""
    while True:
        sibling = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{what}-{uuid.uuid4().hex[:12]}")
        try:
            os.mkdir(sibling)
            return sibling
        except FileExistsError:
            continue


def publish(tmp: str, path: str, before_replacing: Optional[Callable[[], None]] = None) -> None:
    """Rename the finished directory `tmp` onto `path`. An existing `path` is first renamed aside (after
    `before_replacing()`, which may refuse by raising), put back if the rename fails, and removed last."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    if before_replacing is not None:
        before_replacing()
    old_parent = make_sibling_dir(path, "old")
    old = os.path.join(old_parent, "old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old_parent, ignore_errors=True)


def remove_partial(tmp: Optional[str], created: List[str]) -> None:
    """Undo a failed write: the temporary directory, then the folders created for it (if still empty)."""
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    for folder in reversed(created):
        try:
            os.rmdir(folder)  # only if still empty
        except OSError:
            pass


@contextlib.contextmanager
def atomic_dir(path: str, before_replacing: Optional[Callable[[], None]] = None) -> Iterator[str]:
    """Yield a temporary directory; when the block completes it replaces `path` (see `publish`); when it
    raises, the temporary directory and the folders created for it are removed."""
    path = os.path.abspath(path)
    created = missing_parents(path)
    tmp = None
    try:
        for folder in created:
            os.mkdir(folder)
        tmp = make_sibling_dir(path, "partial")
        yield tmp
        publish(tmp, path, before_replacing)
    except BaseException:
        remove_partial(tmp, created)
        raise


def write_file(path: str, data: Union[str, bytes]) -> str:
    """Write `data` (text as UTF-8) to `path` through a temporary file in the same directory (created, with
    its parents, if missing): a failure never leaves a half-written file."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial-{uuid.uuid4().hex[:12]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to any new file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str, obj) -> None:
    """`obj` as indented JSON, written atomically."""
    write_file(path, json.dumps(obj, indent=2) + "\n")
