"""Paths a command reads and writes: checked before any heavy import (nothing here imports torch).

A `gmae` command checks what it is given -- the images exist, the checkpoint
exists, the output folder can be written -- before it imports torch, so a typo
is answered at once and not after the seconds torch takes to load (or the
minutes a run takes to reach its first write).

Also here: the names of a run's checkpoints, and the run-folder lock, which
keeps a second process from writing the same run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
from pathlib import Path
from typing import Iterator

from ..errors import GMAEError

#: Accepted image file extensions (compared case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

LOCK_NAME = ".gmae-lock"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def image_files(paths: list[str]) -> list[str]:
    """The images named by `paths`: a file as given, a folder as the images directly in it (sorted).

    GMAEError for a path that does not exist, a folder without images, or two
    images with the same name (their figures, NAME_<readout>.png, would
    overwrite each other).
    """
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            inside = sorted(f for f in os.listdir(path) if is_image_name(f) and os.path.isfile(os.path.join(path, f)))
            if not inside:
                raise GMAEError(f"folder {path} holds no images ({' '.join(IMG_EXTENSIONS)}, any case); "
                                "give image files or a folder of them")
            found += [os.path.join(path, f) for f in inside]
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise GMAEError(f"image {path} does not exist; give image files or folders of images")
    seen: dict[str, str] = {}
    for path in found:
        stem = Path(path).stem
        if stem in seen:
            raise GMAEError(f"images {seen[stem]} and {path} have the same name, so their figures would "
                            "overwrite each other; rename one or run them separately")
        seen[stem] = path
    return found


def check_exists(path: str | Path, what: str, hint: str) -> None:
    if not os.path.exists(path):
        raise GMAEError(f"{what} {path} does not exist; {hint}")


def check_output_folder(path: str | Path, what: str = "--out") -> Path:
    """`path` as a Path if it is, or can be made, a folder this process can write; else one GMAEError.

    Nothing is created: the nearest existing folder on the way is what is checked.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GMAEError(f"{what} {path} is a file, not a folder; give a folder (new or existing)")
    _check_writable_ancestor(path, what, path)
    return path


def check_output_file(path: str | Path, what: str = "--out") -> Path:
    """`path` as a Path if a file can be written there (its folder exists or can be made); else one GMAEError."""
    path = Path(path)
    if path.is_dir():
        raise GMAEError(f"{what} {path} is a folder; give a file name")
    _check_writable_ancestor(path.parent, what, path)
    return path


def _check_writable_ancestor(folder: Path, what: str, given: Path) -> None:
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise GMAEError(f"{what} {given}: {existing} is a file, so no folder can be made there; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GMAEError(f"{what} {given}: the folder {existing} is not writable (permission denied); "
                        "choose a folder you can write")


def checkpoint_path(out: str | Path, step: int) -> Path:
    return Path(out) / f"checkpoint-{step:07d}.pt"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Checkpoints in `out`, oldest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


# --------------------------------------------------------------------------- run-folder lock


@contextlib.contextmanager
def run_lock(folder: str | Path, what: str = "--out") -> Iterator[Path]:
    """Hold the run folder `folder` (made if needed) for this process while the block runs.

    A second process that asks for the same folder gets a GMAEError naming the
    holder. The lock is the operating system's lock on ``folder/.gmae-lock``
    (flock), which the kernel drops when its process ends, however it ends:
    a lock left by a process that died (kill -9, a crash) is never in the way.
    The file holds the holder's PID and host, for the message. A folder made
    here and left empty is removed again, so a run refused at its start leaves
    nothing behind.
    """
    folder = Path(folder)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _acquire(path, folder, what)
    try:
        yield folder
    finally:
        # Unlink before closing (closing unlocks): a process waiting on the old file sees it is
        # gone and takes a new one, never a lock on a file no one else can find.
        with contextlib.suppress(OSError):
            if fd is not None:
                os.unlink(path)
        if fd is not None:
            os.close(fd)
        if made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds if nothing was written


def _acquire(path: Path, folder: Path, what: str) -> int | None:
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            held = _lock(fd)
        except OSError as e:  # a file system without locks (some network mounts)
            os.close(fd)
            import warnings

            warnings.warn(f"cannot lock {folder} ({e.strerror}); make sure no other gmae process writes it",
                          stacklevel=3)
            return None
        if not held:
            holder = _read_holder(fd)
            os.close(fd)
            raise GMAEError(f"{what} {folder} is in use by another gmae process ({holder}); wait for it to end "
                            "or choose another folder")
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            return fd
        os.close(fd)  # the previous holder removed the file as we opened it: take the new one
    raise GMAEError(f"{what} {folder}: could not take its lock file {path}; try again")


def _lock(fd: int) -> bool:
    """Try to lock `fd` without waiting: True if taken, False if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip() if hasattr(os, "pread") else ""
    except OSError:
        text = ""
    return text or "holder unknown"
