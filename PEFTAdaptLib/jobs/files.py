"""Writing inside a job folder without following links, and checking output paths before any work.

A job folder may come from elsewhere (copied, unpacked, shared with a colleague) and whoever wrote it may have
planted symbolic links: `events.jsonl → ~/.bashrc` would have the worker append to the user's file, `.lock` would
truncate it. So every file PEFTAdapt writes in a job folder is opened without following a link (`O_NOFOLLOW`) and
must be a regular file, replaced files are written under a fresh name and renamed over the old one (a rename
replaces a link, never its target), folders are made fresh and swapped in the same way, and the worker, the
builder and the client refuse a job folder that holds a link anywhere (docs/security.md).
"""
from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a planted FIFO must not block the open
#: places no job folder or output may be written to (kernel interfaces, not storage)
VIRTUAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


def _link_error(path: Path) -> InputError:
    return InputError(f"{path}: is a symbolic link (to {os.readlink(path)}); a job folder must not contain links "
                      "— remove it")


def _not_regular(path: Path) -> InputError:
    return InputError(f"{path}: is not a regular file of its own (a device, a pipe or a hard link to another file); "
                      "a job folder holds only files PEFTAdapt wrote — remove it")


def open_job_file(path: Path, mode: str = "a"):
    """Open a job file for appending (`a`, `ab`) or for reading and writing (`r+`), creating it; a link, a hard link
    or anything but a regular file at `path` is refused (InputError) instead of being written through."""
    flags = {"a": os.O_WRONLY | os.O_APPEND, "r+": os.O_RDWR}[mode.rstrip("b")]
    if not NOFOLLOW and os.path.islink(path):  # Windows: no O_NOFOLLOW
        raise _link_error(path)
    try:
        fd = os.open(path, flags | os.O_CREAT | NOFOLLOW | NONBLOCK, 0o644)
    except OSError:
        if os.path.islink(path):
            raise _link_error(path) from None
        if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
            raise _not_regular(path) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:  # a hard link shares another file's bytes
        os.close(fd)
        raise _not_regular(path)
    if NONBLOCK:
        os.set_blocking(fd, True)
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def write_file(path: Path, data: str | bytes) -> Path:
    """Replace `path` atomically: written to a new `<name>.tmp` (whatever that name held is removed first, a link
    included) and renamed over `path`, so a reader never sees half a file and no link is followed."""
    tmp = path.with_name(path.name + ".tmp")
    remove(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def remove(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a folder tree, if present."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def job_subfolder(path: Path) -> Path:
    """A folder inside a job folder to write into: made if missing; a link is refused."""
    path.mkdir(exist_ok=True)
    if path.is_symlink():
        raise _link_error(path)
    return path


def replace_folder(job_dir: Path, name: str, write: Callable[[Path], None]) -> Path:
    """`write` fills a fresh `.<name>.writing/`, which is then swapped in as `<name>/` by two renames: a kill at any
    instant leaves the old folder (as `.<name>.previous/` between the renames) or the new one, complete."""
    final, staging, previous = job_dir / name, job_dir / f".{name}.writing", job_dir / f".{name}.previous"
    remove(staging)
    staging.mkdir()
    write(staging)
    remove(previous)
    if os.path.lexists(final):
        os.replace(final, previous)
    os.replace(staging, final)
    remove(previous)
    return final


def refuse_linked_folder(job_dir: Path) -> None:
    """Refuse a job folder that is itself a symbolic link (dangling or not): the job would be written, and an
    `--overwrite` would empty, wherever it points. Links among its parent folders (/tmp on macOS) are fine."""
    if os.path.islink(job_dir):
        raise InputError(f"{job_dir}: is a symbolic link (to {os.readlink(job_dir)}); give the real folder path")


def refuse_links(folder: Path) -> None:
    """Refuse a job folder holding a symbolic link at any depth (links are not followed while looking)."""
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            if os.path.islink(os.path.join(root, name)):
                raise _link_error(Path(root) / name)


def check_writable(path: Path, what: str) -> None:
    """Refuse, in one line and before any work, an output path that cannot be made: one inside a file, in a folder
    this user cannot write, or in /proc, /sys or /dev. `path` is the folder to create or write in."""
    path = Path(os.path.abspath(path))
    for root in VIRTUAL_ROOTS:
        if path == root or root in path.parents:
            raise InputError(f"{path}: {what} cannot be written in {root} (a kernel interface, not storage)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{path}: {what} cannot be made: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{path}: {what} cannot be written: no write permission in {existing}")
