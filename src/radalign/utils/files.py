"""Writing files that other people and other processes read: whole or not at all, with the user's permissions.

A run folder sits on a shared file system and is read while it is written (TensorBoard, a colleague's
``radalign.load``, the next resume). Every file a run shares is written next to its final name (same file system,
so the rename is atomic), flushed, given the mode the user's umask asks for (temporary-file helpers create files
0600, which locks colleagues out), and only then renamed into place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def default_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file under the current umask (0644 under 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename is still atomic, just not yet durable
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str) -> None:
    """``path`` holds ``data`` whole, or keeps what it held: readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, default_mode())
    os.replace(tmp, path)


def share_file(path: Path) -> None:
    """Give a file written by a library (safetensors creates 0600 files) the mode the umask asks for."""
    os.chmod(path, default_mode())


def publish_folder(staged: Path, final: Path) -> None:
    """Replace ``final`` with the fully written folder ``staged`` (a sibling of it, made with ``mkdir``, which
    honours the umask, not ``tempfile.mkdtemp``, which makes it 0700).

    Two renames: the old folder steps aside, the new one takes its name, the old one is removed. A reader sees the
    old folder or the new one, never a mix; a crash between the renames leaves the old one beside, not lost.
    """
    staged, final = Path(staged), Path(final)
    for file in staged.rglob("*"):
        if file.is_file():
            with file.open("rb") as f:
                os.fsync(f.fileno())
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
